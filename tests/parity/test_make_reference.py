"""`glm4v make-reference` through a stand-in of the checkpoint's HF remote code, and the round trip to parity.

The stand-in (tests/reference_standin/) follows the real GLM-4V remote code's transformers conventions and
module tree, with glm4v_core's math inside: these tests check the plumbing (auto_map + trust_remote_code,
hooks, recording, file format, parity on recordings); the numerics are checked against the HF-made fixtures.
"""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.paths import FIXTURES, ROOT, STANDIN
from safetensors.torch import load_file

from glm4v_core import cli
from glm4v_core.config import GLM4VConfig
from glm4v_core.parity import cli as parity_cli
from glm4v_core.parity import make_reference as parity_make_reference
from glm4v_core.parity import preflight as parity_preflight
from glm4v_core.parity.capture import SpillWriter, rows_to_positions
from glm4v_core.parity.make_reference import CaptureError, Case
from glm4v_core.parity.make_reference_cli import cases_from_args
from glm4v_core.processing import tokenizer as processing_tokenizer
from glm4v_core.processing.chat import build_inputs
from glm4v_core.processing.image import load_image

IMAGE = FIXTURES / "images" / "gradient_rgb_97x61.png"
PROMPTS = ["What is in this picture?", "Write one line about the sea, please."]


def standin_checkpoint(folder: Path, fixtures_dir: Path, edit: tuple[str, str, str] | None = None) -> Path:
    """The tiny fixture (config.json with auto_map, bf16 weights) plus the stand-in remote code.
    `edit` = (file, old, new) perturbs the code: every `old` of that file (which must hold it) becomes
    `new`. Each folder needs its own name (transformers caches remote code by folder name)."""
    shutil.copytree(fixtures_dir / "tiny", folder)
    for src in STANDIN.glob("*.py"):
        text = src.read_text()
        if edit and src.name == edit[0]:
            assert edit[1] in text, f"{edit[1]!r} is not in the stand-in's {src.name}"
            text = text.replace(edit[1], edit[2])
        (folder / src.name).write_text(text)
    return folder


def record(checkpoint: Path, out: Path, *extra: str) -> int:
    args = ["make-reference", "--checkpoint", str(checkpoint), "--out", str(out), "--trust-remote-code",
            "--image", str(IMAGE), "--image", "none"]
    for p in PROMPTS:
        args += ["--prompt", p]
    return cli.main(args + list(extra))


def parity_json(checkpoint: Path, ref: Path, capsys, *extra: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = parity_cli.main(["--checkpoint", str(checkpoint), "--reference", str(ref / "reference.safetensors"),
                            "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def recorded(hf_modules, tmp_path_factory, fixtures_dir):
    """One recording through the unperturbed stand-in: an image + text case and a text-only case, in fp32
    and (--with-bf16) cast to bf16."""
    root = tmp_path_factory.mktemp("standin")
    checkpoint = standin_checkpoint(root / "standin_ok", fixtures_dir)
    assert record(checkpoint, root / "ref", "--with-bf16") == 0
    return checkpoint, root / "ref"


def test_round_trip_make_reference_then_parity_passes(recorded, capsys):
    checkpoint, ref = recorded
    code, report = parity_json(checkpoint, ref, capsys)
    assert code == 0 and report["ok"], report
    assert sorted(report["cases"]) == ["p00", "p01"]
    image_stages = [s["name"] for s in report["cases"]["p00"]["stages"]]
    assert image_stages == ["vision.patch_embed", "vision.vit_out", "vision.conv_out", "vision.glu_out", "image_embeds",
                            "position_ids", "embeddings", "decoder.layer0", "decoder.layer1", "final_norm", "logits",
                            "greedy_tokens"]
    text_stages = [s["name"] for s in report["cases"]["p01"]["stages"]]
    assert text_stages == image_stages[5:]


def test_recording_holds_our_ids_and_pixels_and_describes_itself(recorded, fixtures_dir):
    checkpoint, ref = recorded
    tensors = load_file(str(ref / "reference.safetensors"))
    meta = json.loads((ref / "reference.json").read_text())
    config = GLM4VConfig.from_json(checkpoint / "config.json")
    tok = processing_tokenizer.resolve_tokenizer(None, checkpoint, config)
    ours = build_inputs(tok, [{"role": "user", "content": PROMPTS[0], "image": str(IMAGE)}], config.vision.image_size)
    assert torch.equal(tensors["input_ids_p00"], ours.input_ids)
    assert torch.equal(tensors["pixel_values_p00"][0], load_image(IMAGE, 56))
    assert "pixel_values_p01" not in tensors and "vision_vit_out_p01" not in tensors
    assert meta["inputs"]["p00"]["input_ids"] == ours.input_ids[0].tolist()
    assert meta["generation"]["p00"] == tensors["gen_tokens_p00"][0].tolist()
    import transformers
    assert meta["versions"]["transformers"] == transformers.__version__ and meta["dtype"] == "float32"
    assert set(meta["reference_code"]) == {"configuration_chatglm.py", "modeling_chatglm.py", "visual.py"}
    assert {n: t["shape"] for n, t in meta["tensors"].items()} == {n: list(t.shape) for n, t in tensors.items()}
    # 4 image tokens replace 3 placeholders and share one position
    pos = tensors["position_ids_p00"][0]
    boi = ours.input_ids[0].tolist().index(config.boi_token_id)
    assert pos[boi + 1:boi + 5].tolist() == [boi + 1] * 4 and pos[-1] == ours.input_ids.shape[1] - 1
    assert not list(ref.parent.glob(".ref.*")), "temporary folders left behind"


def test_hooks_capture_what_the_real_reference_recorded(hf_modules, tmp_path, fixtures_dir):
    """Fed the fixture's own inputs, the recorder's hooked tensors equal the HF-made fixture's (within the fp32
    bound): each hook sits on the module that produced the fixture's tensor of that name."""
    import transformers
    checkpoint = standin_checkpoint(tmp_path / "standin_hooks", fixtures_dir)
    model = parity_make_reference.load_reference(transformers, checkpoint, torch.float32, "cpu")
    fixture = load_file(str(fixtures_dir / "tiny" / "reference.safetensors"))
    spill = SpillWriter(tmp_path / "spill")
    with torch.no_grad():
        tokens = parity_make_reference.record_case(model, "a", fixture["input_ids_a"], fixture["pixel_values_a"],
                                                   spill, 2, 16, "cpu")
    spill.finish(tmp_path / "rec.safetensors", {})
    got = load_file(str(tmp_path / "rec.safetensors"))
    assert tokens == fixture["gen_tokens_a"][0].tolist()
    assert torch.equal(got["position_ids_a"], fixture["position_ids_a"])
    for name in ("vision_patch_embed_a", "vision_vit_out_a", "vision_conv_out_a", "vision_glu_out_a", "image_embeds_a",
                 "hidden_states_a", "final_norm_out_a", "logits_a", "gen_step_logits_a"):
        diff = (got[name] - fixture[name]).abs().max().item()
        assert got[name].shape == fixture[name].shape, (name, diff)
        assert diff <= 1e-4 * (1 + fixture[name].abs().max().item()), (name, diff)


def test_negative_control_perturbed_reference_fails_parity(hf_modules, tmp_path, fixtures_dir, capsys):
    """The stand-in gives its image rows consecutive positions: parity fails there, and on the logits."""
    consecutive_positions = ("modeling_chatglm.py", "position_ids[i, boi + 1].repeat(num_patches)",
                             "position_ids[i, boi + 1] + torch.arange(num_patches)")
    checkpoint = standin_checkpoint(tmp_path / "standin_bad_positions", fixtures_dir, consecutive_positions)
    assert record(checkpoint, tmp_path / "ref") == 0
    code, report = parity_json(checkpoint, tmp_path / "ref", capsys)
    assert code == 1 and not report["ok"]
    failed = [s["name"] for s in report["cases"]["p00"]["stages"] if not s["ok"]]
    assert failed[0] == "position_ids" and "logits" in failed, failed
    assert report["cases"]["p01"]["ok"]  # the text-only case has no image rows


def test_with_bf16_parity_judges_our_bf16_run(recorded, capsys):
    """--with-bf16 records the reference's own bf16 error: parity --dtype bfloat16 then applies the bf16 criteria
    (2x that error on the logits, argmax, greedy tokens) instead of refusing."""
    checkpoint, ref = recorded
    observed = json.loads((ref / "reference.json").read_text())["tolerances_observed"]
    assert 1e-3 < observed["bf16_vs_fp32_logits_a_maxabs"] < 1 and observed["bf16_vs_fp32_image_embeds_a_maxabs"] > 0
    code, report = parity_json(checkpoint, ref, capsys, "--dtype", "bfloat16")
    assert code == 0 and report["ok"], report
    stages = {s["name"]: s for s in report["cases"]["p00"]["stages"]}
    assert stages["logits"]["tol"] == 2 * observed["bf16_vs_fp32_logits_a_maxabs"]
    assert stages["logits vs reference bf16"]["max_abs"] == 0.0  # same math in the stand-in: bit for bit
    assert stages["greedy_tokens"]["ok"]


def test_layer_cap_and_bf16_recording(recorded, tmp_path, capsys):
    """--layers 1 records the embeddings and the first layer only; a bf16 recording is shown, not judged,
    except for the exact stages."""
    checkpoint, _ = recorded
    out = tmp_path / "ref_bf16"
    assert record(checkpoint, out, "--layers", "1", "--dtype", "bfloat16", "--max-new-tokens", "3") == 0
    tensors = load_file(str(out / "reference.safetensors"))
    assert tensors["hidden_states_p00"].shape[0] == 2 and tensors["gen_tokens_p00"].shape == (1, 3)
    assert json.loads((out / "reference.json").read_text())["dtype"] == "bfloat16"
    # the reference loaded in bf16 computes what --with-bf16's cast computes
    assert torch.equal(tensors["logits_p00"], load_file(str(recorded[1] / "reference.safetensors"))["logits_p00_bf16"])
    code, report = parity_json(checkpoint, out, capsys)
    assert code == 0, report
    stages = {s["name"]: s for s in report["cases"]["p00"]["stages"]}
    assert "decoder.layer0" in stages and "decoder.layer1" not in stages
    assert stages["logits"]["tol"] is None and "bf16 recording" in stages["logits"]["note"]
    assert stages["logits"]["max_abs"] > 1e-3  # bf16 vs our fp32: clearly nonzero, and shown
    assert stages["position_ids"]["tol"] == 0.0


def test_missing_transformers_names_the_install_command(monkeypatch, tmp_path, fixtures_dir, capsys):
    checkpoint = standin_checkpoint(tmp_path / "standin_no_transformers", fixtures_dir)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    code = cli.main(["make-reference", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "r"),
                     "--trust-remote-code"])
    err = capsys.readouterr().err
    assert code == 1 and "pip install -e '.[reference]'" in err and "transformers==4.44.2" in err
    assert not (tmp_path / "r").exists()


def test_remote_code_without_the_expected_modules_is_named_and_leaves_nothing(hf_modules, tmp_path, fixtures_dir,
                                                                              capsys):
    rename_conv = ("visual.py", "self.conv", "self.downsample")
    checkpoint = standin_checkpoint(tmp_path / "standin_renamed", fixtures_dir, rename_conv)
    (checkpoint / "model.safetensors.index.json").write_text(
        (checkpoint / "model.safetensors.index.json").read_text().replace("vision.conv.", "vision.downsample."))
    for shard in checkpoint.glob("model-*.safetensors"):  # keep the weights loadable under the new name
        tensors = load_file(str(shard))
        from safetensors.torch import save_file
        save_file({k.replace("vision.conv.", "vision.downsample."): v for k, v in tensors.items()}, str(shard),
                  metadata={"format": "pt"})
    assert record(checkpoint, tmp_path / "ref") == 1
    err = capsys.readouterr().err
    assert "transformer.vision.conv" in err and "module" in err
    assert not (tmp_path / "ref").exists() and not list(tmp_path.glob(".ref.*"))


def test_remote_code_that_skips_a_hooked_module_is_named(hf_modules, tmp_path, fixtures_dir, capsys):
    """A forward that never runs a hooked module (here the final norm) would leave a stage unrecorded: refused."""
    skip_final_norm = ("modeling_chatglm.py", "return self.final_layernorm(hidden_states), presents, all_hidden, None",
                       "return hidden_states, presents, all_hidden, None")
    checkpoint = standin_checkpoint(tmp_path / "standin_no_final_norm", fixtures_dir, skip_final_norm)
    assert record(checkpoint, tmp_path / "ref") == 1
    assert "did not run module(s) ['transformer.encoder.final_layernorm']" in capsys.readouterr().err
    assert not (tmp_path / "ref").exists()


def test_memory_estimate_refuses_before_loading_unless_forced(recorded, tmp_path, monkeypatch, capsys):
    checkpoint, _ = recorded
    monkeypatch.setattr(parity_preflight, "available_cpu_memory", lambda: 1024)
    monkeypatch.setattr(parity_make_reference, "load_reference", lambda *a: pytest.fail("loaded despite the estimate"))
    assert record(checkpoint, tmp_path / "ref") == 1
    err = capsys.readouterr().err
    assert "not enough memory" in err and "--dtype bfloat16" in err and "--force" in err
    assert re.search(r"0\.81M parameters in float32: 3\.1 MiB of weights", err), err
    monkeypatch.setattr(parity_make_reference, "load_reference",
                        lambda *a: (_ for _ in ()).throw(CaptureError("reached")))
    assert record(checkpoint, tmp_path / "ref", "--force") == 1
    assert "reached" in capsys.readouterr().err


def test_argument_errors(tmp_path, fixtures_dir, capsys):
    assert [c.image for c in cases_from_args(["a", "b", "c"], [str(IMAGE), "none"])] == [IMAGE, None, None]
    assert cases_from_args([], [str(IMAGE)]) == [Case("p00", parity_make_reference.DEFAULT_PROMPT, IMAGE)]
    with pytest.raises(CaptureError, match="2 --image flags for 1 --prompt"):
        cases_from_args(["a"], [str(IMAGE), str(IMAGE)])
    with pytest.raises(CaptureError, match="no such file"):
        cases_from_args(["a"], [str(tmp_path / "missing.png")])
    with pytest.raises(CaptureError, match="empty"):
        cases_from_args([" "], [])
    (tmp_path / "exists").mkdir()
    checkpoint = standin_checkpoint(tmp_path / "standin_arguments", fixtures_dir)
    base = ["make-reference", "--checkpoint", str(checkpoint), "--trust-remote-code"]
    assert cli.main(base + ["--out", str(tmp_path / "exists")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(base + ["--out", str(tmp_path / "r"), "--layers", "3"]) == 1
    assert "--layers must be in 0..2" in capsys.readouterr().err
    assert cli.main(base + ["--out", str(tmp_path / "r"), "--prompt", "x " * 3000]) == 1
    assert "seq_length = 2048" in capsys.readouterr().err
    # the fixture folder alone names the remote code in auto_map but does not ship it
    assert cli.main(["make-reference", "--checkpoint", str(fixtures_dir / "tiny"), "--out", str(tmp_path / "r"),
                     "--trust-remote-code"]) == 1
    assert "needs configuration_chatglm.py, which is not in" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_rotary_rows_map_back_to_positions():
    table = torch.randn(10, 3, 2)
    assert rows_to_positions(table, table[[0, 4, 5, 5, 5, 6]]).tolist() == [0, 4, 5, 5, 5, 6]
    with pytest.raises(CaptureError, match="not in its rotary table"):
        rows_to_positions(table, table[[1]] + 1e-6)


def test_transformers_is_imported_only_by_make_reference():
    """Importing every glm4v module (make_reference included) does not import transformers; only
    make_reference.py mentions it in an import, and only inside a function."""
    code = ("import sys, pkgutil, importlib, glm4v_core, glm4v_kernels, glm4v_conversion, glm4v_conversion.cli\n"
            "for m in pkgutil.walk_packages(glm4v_core.__path__, 'glm4v_core.'):\n"
            "    m.name.endswith('__main__') or importlib.import_module(m.name)\n"
            "assert 'transformers' not in sys.modules, 'transformers imported'; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
    importers = []
    for folder in ("src", "kernels", "conversion", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for line in path.read_text().splitlines():
                if re.match(r"\s*(import|from)\s+transformers\b", line):
                    importers.append((path.name, line.startswith((" ", "\t"))))
    assert importers == [("make_reference.py", True)], importers


@pytest.mark.gpu
def test_round_trip_on_cuda(hf_modules, tmp_path, fixtures_dir, capsys):
    """The device path: the stand-in recorded on CUDA (TF32 off, CUDA memory in the estimate), parity on CUDA."""
    checkpoint = standin_checkpoint(tmp_path / "standin_cuda", fixtures_dir)
    assert record(checkpoint, tmp_path / "ref", "--device", "cuda") == 0
    assert "cuda memory free" in capsys.readouterr().err
    code, report = parity_json(checkpoint, tmp_path / "ref", capsys, "--device", "cuda")
    assert code == 0 and report["ok"], report
