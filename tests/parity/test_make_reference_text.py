"""`glm4v make-reference` on a text-only GLM-4 checkpoint (glm-4-9b-chat family: no vision_config).

The stand-in remote code (tests/reference_standin/) builds no vision tower for such a config and, as
glm-4-9b-chat's forward has no `images` argument, refuses a call that passes `images=`: a recording
that passes it, hooks a vision module or asks for an image key fails here. Plumbing only; the
numerics are the HF-made text_tiny fixture's.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.paths import FIXTURES, STANDIN
from safetensors.torch import load_file

from glm4v_core import cli
from glm4v_core.config import GLM4VConfig
from glm4v_core.parity import cli as parity_cli
from glm4v_core.parity import make_reference as parity_make_reference
from glm4v_core.parity.capture import CaptureError
from glm4v_core.parity.make_reference import DEFAULT_PROMPT, DEFAULT_TEXT_PROMPT, Case
from glm4v_core.processing import tokenizer as processing_tokenizer
from glm4v_core.processing.chat import build_inputs

IMAGE = FIXTURES / "images" / "gradient_rgb_97x61.png"
PROMPT = "Write one line about the sea, please."
WEIGHTS = ("config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
           "model-00002-of-00002.safetensors")


def text_standin(folder: Path) -> Path:
    """text_tiny's config.json (auto_map to the stand-in modules) and weights, plus the stand-in remote code."""
    folder.mkdir(parents=True)
    for name in WEIGHTS:
        shutil.copy(FIXTURES / "text_tiny" / name, folder / name)
    config = json.loads((folder / "config.json").read_text())
    assert "vision_config" not in config and config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_chatglm.")
    for src in STANDIN.glob("*.py"):
        shutil.copy(src, folder / src.name)
    return folder


def parity_json(checkpoint: Path, ref: Path, capsys, *extra: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = parity_cli.main(["--checkpoint", str(checkpoint), "--reference", str(ref / "reference.safetensors"),
                            "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def recorded(hf_modules, tmp_path_factory):
    """A text checkpoint recorded through the CLI: the default prompt and one given, fp32 then --with-bf16."""
    root = tmp_path_factory.mktemp("text_standin")
    checkpoint = text_standin(root / "standin_text_ok")
    args = ["make-reference", "--checkpoint", str(checkpoint), "--out", str(root / "ref"), "--trust-remote-code",
            "--image", "none", "--prompt", PROMPT, "--max-new-tokens", "4", "--with-bf16"]
    assert cli.main(args) == 0
    default = root / "ref_default"
    assert cli.main(["make-reference", "--checkpoint", str(checkpoint), "--out", str(default),
                     "--trust-remote-code", "--max-new-tokens", "2"]) == 0
    return checkpoint, root / "ref", default


def test_text_checkpoint_round_trip_to_parity(recorded, capsys):
    checkpoint, ref, _ = recorded
    code, report = parity_json(checkpoint, ref, capsys)
    assert code == 0 and report["ok"], report
    stages = [s["name"] for s in report["cases"]["p00"]["stages"]]
    assert stages[0] == "position_ids" and "logits" in stages and not any("vision" in s or "image" in s
                                                                         for s in stages), stages


def test_text_recording_has_no_image_tensors_and_our_ids(recorded):
    checkpoint, ref, _ = recorded
    tensors = load_file(str(ref / "reference.safetensors"))
    meta = json.loads((ref / "reference.json").read_text())
    assert not [n for n in tensors if "image" in n or "vision" in n or "pixel" in n], sorted(tensors)
    config = GLM4VConfig.from_json(checkpoint / "config.json")
    tok = processing_tokenizer.resolve_tokenizer(None, checkpoint, config)
    ours = build_inputs(tok, [{"role": "user", "content": PROMPT}], None)
    assert torch.equal(tensors["input_ids_p00"], ours.input_ids)
    assert tensors["position_ids_p00"][0].tolist() == list(range(ours.input_ids.shape[1]))
    assert set(meta["reference_code"]) == {"configuration_chatglm.py", "modeling_chatglm.py", "visual.py"}
    assert meta["inputs"]["p00"]["image"] is None and meta["inputs"]["p00"]["prompt"] == PROMPT


def test_text_bf16_error_has_no_image_key_and_parity_bf16_passes(recorded, capsys):
    checkpoint, ref, _ = recorded
    observed = json.loads((ref / "reference.json").read_text())["tolerances_observed"]
    assert set(observed) == {"bf16_vs_fp32_logits_a_maxabs", "note"}, observed
    assert 0 < observed["bf16_vs_fp32_logits_a_maxabs"] < 1
    code, report = parity_json(checkpoint, ref, capsys, "--dtype", "bfloat16")
    assert code == 0 and report["ok"], report


def test_text_default_prompt_is_a_text_prompt(recorded, capsys):
    checkpoint, _, default = recorded
    meta = json.loads((default / "reference.json").read_text())
    assert meta["inputs"]["p00"]["prompt"] == DEFAULT_TEXT_PROMPT != DEFAULT_PROMPT
    assert "image" not in DEFAULT_TEXT_PROMPT.lower()
    code, report = parity_json(checkpoint, default, capsys)
    assert code == 0 and report["ok"], report


def test_image_on_a_text_checkpoint_is_refused_up_front(hf_modules, tmp_path, monkeypatch, capsys):
    checkpoint = text_standin(tmp_path / "standin_text_image")
    monkeypatch.setattr(parity_make_reference, "load_reference", lambda *a: pytest.fail("loaded despite the image"))
    capsys.readouterr()
    code = cli.main(["make-reference", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "ref"),
                     "--trust-remote-code", "--image", str(IMAGE), "--prompt", PROMPT])
    err = capsys.readouterr().err
    assert code == 1 and "text-only" in err and "--image none" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "ref").exists()
    with pytest.raises(CaptureError, match=r"case\(s\) p01 have an image"):
        parity_make_reference.make_reference(checkpoint, tmp_path / "ref", [Case("p00", PROMPT, None),
                                                                            Case("p01", PROMPT, IMAGE)],
                                             trust_remote_code=True)


def test_text_preflight_estimates_leave_the_vit_out(tmp_path):
    from glm4v_core.parity import preflight
    config = GLM4VConfig.from_json(FIXTURES / "text_tiny" / "config.json")
    inputs = {"p00": (torch.zeros(1, 10, dtype=torch.long), None)}
    report = preflight.memory_report(FIXTURES / "text_tiny", config, torch.float32, "cpu", inputs, force=True)
    assert "longest prompt 10 positions" in report
    assert preflight.reference_bytes(config, inputs, 2, 4, True) > 0
