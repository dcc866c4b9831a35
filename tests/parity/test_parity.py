"""Parity against the HF reference fixtures, stage by stage, and negative controls proving it can fail."""
import json

import pytest
import torch
from helpers.parity import half_split_rotary

from glm4v_core.model import decoder as model_decoder
from glm4v_core.parity import cli as parity_cli
from glm4v_core.parity import exact_kernels as parity_exact_kernels
from glm4v_core.parity import report as parity_report
from glm4v_core.parity import run as parity_run
from glm4v_core.parity.run import run_parity

FIXTURES = ("tiny", "narrow")
STAGES_A = ["vision.patch_embed", "vision.vit_out", "vision.conv_out", "vision.glu_out", "image_embeds",
            "position_ids", "embeddings", "decoder.layer0", "final_norm", "logits", "greedy_tokens"]


def _describe(reports):
    return parity_report.format_report(reports, "test")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fixture", FIXTURES)
def test_parity_all_cases_pass(fixtures_dir, fixture, dtype):
    reports = run_parity(fixtures_dir / fixture, dtype=dtype)
    assert [r.name for r in reports] == ["a", "b", "c", "d"]
    assert all(r.ok for r in reports), _describe(reports)
    stages_a = [s.name for s in reports[0].stages]
    for name in STAGES_A:
        assert name in stages_a, f"stage {name} not compared for case a: {stages_a}"
    n_layers = json.loads((fixtures_dir / fixture / "config.json").read_text())["num_layers"]
    assert f"decoder.layer{n_layers - 1}" in stages_a
    assert "attention_mask" in [s.name for s in reports[2].stages]  # padded image batch
    if dtype == torch.float32:
        for r in reports:
            assert r.logits_max_abs <= 1e-4


@pytest.mark.parametrize("fixture", FIXTURES)
def test_bf16_logits_bit_exact_with_reference_kernels(fixtures_dir, fixture):
    """Following the spec exactly reproduces the reference's bf16 logits bit for bit."""
    (report_a, *_) = run_parity(fixtures_dir / fixture, dtype=torch.bfloat16)
    stage = next(s for s in report_a.stages if s.name == "logits vs reference bf16")
    assert stage.max_abs == 0.0, _describe([report_a])


def test_fp32_parity_runs_without_tf32_and_restores_the_settings(fixtures_dir, monkeypatch):
    """On CUDA, cuDNN convolutions default to TF32, too coarse for fp32 parity: the run turns TF32
    off (convolutions and matmuls) and gives the caller's settings back afterwards."""
    settings = parity_exact_kernels.tf32_settings()
    state = lambda: [getattr(owner, name) for owner, name, _ in settings]  # noqa: E731
    tf32 = "tf32" if settings[0][1] == "fp32_precision" else True
    seen = []
    real_run_case = parity_run.run_case
    monkeypatch.setattr(parity_run, "run_case", lambda *a: seen.append(state()) or real_run_case(*a))
    before = state()
    try:
        for owner, name, _ in settings:
            setattr(owner, name, tf32)
        reports = run_parity(fixtures_dir / "tiny")
        after = state()
    finally:
        for (owner, name, _), value in zip(settings, before, strict=True):
            setattr(owner, name, value)
    exact = [value for _, _, value in settings]
    assert seen and all(s == exact for s in seen), seen
    assert after == [tf32, tf32]
    assert all(r.ok for r in reports)




def test_negative_control_wrong_rotary_pairing_fails(fixtures_dir, monkeypatch):
    monkeypatch.setattr(model_decoder, "apply_rotary", half_split_rotary)
    reports = run_parity(fixtures_dir / "tiny")
    assert not any(r.ok for r in reports)
    first_bad = next(s for s in reports[0].stages if not s.ok)
    assert first_bad.name == "decoder.layer0"  # the bisect points at the first drifting stage
    assert reports[0].logits_max_abs > 1e-2


def test_negative_control_consecutive_image_positions_fails(fixtures_dir, consecutive_image_positions):
    reports = {r.name: r for r in run_parity(fixtures_dir / "tiny")}
    assert not reports["a"].ok and reports["b"].ok  # text-only case unaffected
    assert next(s for s in reports["a"].stages if not s.ok).name == "position_ids"
    assert reports["a"].logits_max_abs > 1e-2


def test_cli_json_and_exit_code(fixtures_dir, capsys):
    assert parity_cli.main(["--checkpoint", str(fixtures_dir / "tiny"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True
    assert set(out["cases"]) == {"a", "b", "c", "d", "m1", "m2", "m3"}  # multi_image cases too
    assert all(0 <= c["logits_max_abs"] <= 1e-4 for c in out["cases"].values())


def test_cli_default_is_bundled_tiny_and_table(capsys):
    assert parity_cli.main([]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "decoder.layer1" in out and "parity PASSED: 7/7" in out


def test_cli_fails_with_exit_1_on_drift(fixtures_dir, monkeypatch, capsys):
    monkeypatch.setattr(model_decoder, "apply_rotary", half_split_rotary)
    assert parity_cli.main(["--checkpoint", str(fixtures_dir / "tiny")]) == 1
    assert "first stage that drifts: decoder.layer0" in capsys.readouterr().out


def test_cli_missing_reference_is_a_clear_error(tmp_path, fixtures_dir, capsys):
    assert parity_cli.main(["--checkpoint", str(fixtures_dir / "tiny"),
                            "--reference", str(tmp_path / "nope.safetensors")]) == 1
    assert "nope.safetensors" in capsys.readouterr().err


def test_cli_unusable_device_is_a_clear_error(capsys):
    assert parity_cli.main(["--device", "cuda:5" if torch.cuda.is_available() else "cuda"]) == 1
    assert "CUDA" in capsys.readouterr().err


def test_bf16_run_needs_the_reference_bf16_error(fixtures_dir, tmp_path):
    import shutil
    ckpt = tmp_path / "tiny"
    shutil.copytree(fixtures_dir / "tiny", ckpt)
    meta = json.loads((ckpt / "reference.json").read_text())
    del meta["tolerances_observed"]
    (ckpt / "reference.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="tolerances_observed"):
        run_parity(ckpt, dtype=torch.bfloat16)
