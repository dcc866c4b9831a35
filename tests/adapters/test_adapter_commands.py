"""The commands around adapters: --adapter DIR of a PEFT folder on generate / parity / serve (checked
before the weights load), `glm4v adapter convert` both ways, `glm4v adapter merge` (fp32 base, int4
base), and `glm4v finetune --adapter` (continue from ours or PEFT) / `--adapter-format peft`."""
import argparse
import json
import shutil

import pytest
import torch
from helpers.adapters import TOL, hf_logits, inputs, ours_logits, randomize
from helpers.paths import FIXTURES

import glm4v_core
from glm4v_conversion.quantize import quantize_checkpoint
from glm4v_core import cli
from glm4v_core.errors import CLIError
from glm4v_core.generation.cli import check_adapter_flag
from glm4v_core.parity import cli as parity_cli
from glm4v_core.training import adapter_cli, export
from glm4v_core.training import cli as training_cli
from glm4v_core.transforms import adapter_files, lora
from glm4v_core.transforms.lora import LoRAConfig

peft = pytest.importorskip("peft")
TINY = FIXTURES / "tiny"
DATA = FIXTURES / "finetune" / "train.jsonl"


@pytest.fixture(scope="module")
def peft_dir(hf_base, tmp_path_factory):
    """A PEFT folder as peft saves it: ViT and decoder targets, a rank_pattern (per-layer ranks)."""
    model = peft.get_peft_model(hf_base(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value",
                                "dense_4h_to_h"], rank_pattern={"encoder.layers.0.mlp.dense_4h_to_h": 2}))
    randomize(model)
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ours_file(tmp_path_factory):
    model = glm4v_core.load_model(TINY)
    glm4v_core.add_lora(model, LoRAConfig.from_presets(["decoder", "projector"], rank=2, alpha=4.0))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for adapter in lora.adapters_of(model).values():
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.1)
    return glm4v_core.save_adapters(model, tmp_path_factory.mktemp("ours") / "adapter.safetensors")


def adapted(path, checkpoint=TINY):
    model = glm4v_core.load_model(checkpoint)
    glm4v_core.load_adapters(model, path)
    return model


def test_generate_parity_and_serve_take_a_peft_folder(peft_dir, tmp_path, capsys, monkeypatch):
    assert cli.main(["generate", "--device", "cpu", "--max-new-tokens", "4", "--adapter", str(peft_dir), "Hi"]) == 0
    config = glm4v_core.GLM4VConfig.from_json(TINY / "config.json")
    assert check_adapter_flag(peft_dir, config) == peft_dir  # what glm4v serve runs before loading
    args = argparse.Namespace(adapter=peft_dir)
    assert parity_cli.check_adapter(args, TINY, config) == peft_dir
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps({**json.loads((peft_dir / "adapter_config.json")
                                                                        .read_text()), "use_dora": True}))
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    capsys.readouterr()
    assert cli.main(["generate", "--device", "cpu", "--adapter", str(broken), "Hi"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"glm4v: error: --adapter {broken}: ") and "DoRA" in err[0], err
    with pytest.raises(CLIError, match="DoRA"):
        check_adapter_flag(broken, config)


def test_convert_both_ways(peft_dir, ours_file, hf_base, tmp_path, capsys):
    batch = inputs(glm4v_core.load_model(TINY).config)
    assert adapter_cli.main(["convert", str(ours_file), str(tmp_path / "as_peft"), "--to", "peft",
                             "--checkpoint", str(TINY)]) == 0
    peft_model = peft.PeftModel.from_pretrained(hf_base(), tmp_path / "as_peft")
    torch.testing.assert_close(hf_logits(peft_model, batch), ours_logits(adapted(ours_file), batch), rtol=0, atol=TOL)
    assert adapter_cli.main(["convert", str(tmp_path / "as_peft"), str(tmp_path / "back.safetensors"),
                             "--to", "glm4v"]) == 0  # B block-diagonal again per part: the same tensors
    back, original = adapted(tmp_path / "back.safetensors"), adapted(ours_file)
    assert back.lora_config.split_fused and back.lora_config.rank == original.lora_config.rank
    assert all(torch.equal(t, lora.adapter_state(original)[n]) for n, t in lora.adapter_state(back).items())
    capsys.readouterr()
    assert adapter_cli.main(["convert", str(peft_dir), str(tmp_path / "x.safetensors"), "--to", "glm4v"]) == 1
    assert "per-layer ranks" in capsys.readouterr().err  # the rank_pattern: only PEFT holds it
    assert adapter_cli.main(["convert", str(peft_dir), str(tmp_path / "as_peft"), "--to", "peft"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert adapter_cli.main(["convert", str(peft_dir), str(tmp_path / "y"), "--to", "peft", "--checkpoint",
                             str(FIXTURES / "text_tiny")]) == 1  # ViT targets on a text-only base
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unexpected ['base_model.model.transformer.vision" in err[0] and "text_tiny" in err[0]


@pytest.mark.parametrize("which", ["ours", "peft"])
def test_merge_onto_an_fp32_base_keeps_the_logits(peft_dir, ours_file, tmp_path, which):
    path = ours_file if which == "ours" else peft_dir
    out = tmp_path / "merged"
    assert adapter_cli.main(["merge", "--checkpoint", str(TINY), "--adapter", str(path), "--out", str(out),
                             "--dtype", "float32"]) == 0
    merged = glm4v_core.load_model(out)
    assert (out / "config.json").exists() and not (out / "glm4v_native.json").exists()  # the HF layout
    batch = inputs(merged.config)
    unmerged = ours_logits(adapted(path), batch)
    torch.testing.assert_close(ours_logits(merged, batch), unmerged, rtol=0, atol=1e-5)
    assert (unmerged - ours_logits(glm4v_core.load_model(TINY), batch)).abs().max() > 100 * TOL


def test_merge_onto_an_int4_base_dequantizes_first(ours_file, tmp_path):
    """Bound as for finetune --save-merged over QLoRA: the int4 kernels' own distance from their
    dequantized weights, twice, plus fp32 rounding of the sums."""
    int4 = tmp_path / "int4"
    quantize_checkpoint(TINY, int4, "int4", 32)
    out = tmp_path / "merged"
    assert adapter_cli.main(["merge", "--checkpoint", str(int4), "--adapter", str(ours_file), "--out", str(out),
                             "--dtype", "float32"]) == 0
    batch = inputs(glm4v_core.load_model(TINY).config)
    base_q = ours_logits(glm4v_core.load_model(int4), batch)
    kernel_err = (base_q - ours_logits(export.merge_dequantized(glm4v_core.load_model(int4), torch.float32),
                                       batch)).abs().max().item()
    unmerged = ours_logits(adapted(ours_file, int4), batch)
    err = (ours_logits(glm4v_core.load_model(out), batch) - unmerged).abs().max().item()
    bound = 2 * kernel_err + 1e-4 * unmerged.abs().max().item()
    assert err <= bound and (unmerged - base_q).abs().max().item() > 20 * bound, (err, bound)


def finetune(out, *args):
    return training_cli.main(["--data", str(DATA), "--out", str(out), "--no-progress", "--checkpoint", str(TINY),
                              "--max-steps", "2", *args])


def test_finetune_continues_from_a_peft_folder_and_writes_peft(peft_dir, hf_base, tmp_path, capsys):
    """The adapters start from the folder (a tiny --lr moves them by ~1e-9: a fresh init would be far), and
    OUT/adapter/ is a PEFT folder that peft loads with the logits of our own load of it. Its per-layer
    ranks are checkpointed as plain tensors, and a --resume with the same --adapter continues exactly."""
    out = tmp_path / "run"
    args = ("--adapter", str(peft_dir), "--adapter-format", "peft", "--lr", "1e-9", "--save-every", "1")
    assert finetune(out, *args) == 0
    assert f"the LoRA adapters of {peft_dir}" in capsys.readouterr().err
    assert not (out / "adapter.safetensors").exists()
    start, end = adapted(peft_dir), adapted(adapter_files.resolve_adapter(out))
    assert adapter_files.resolve_adapter(out) == out / "adapter"
    for name, adapter in lora.adapters_of(start).items():  # the update: per-layer scales are folded into B
        torch.testing.assert_close(lora.adapters_of(end)[name].delta_weight(), adapter.delta_weight(), rtol=0,
                                   atol=1e-6)
    batch = inputs(end.config)
    peft_model = peft.PeftModel.from_pretrained(hf_base(), out / "adapter")
    torch.testing.assert_close(hf_logits(peft_model, batch), ours_logits(end, batch), rtol=0, atol=TOL)
    losses = [json.loads(line)["loss"] for line in (out / "loss.jsonl").read_text().splitlines()]
    shutil.rmtree(out / "checkpoints" / "step-000002")
    shutil.rmtree(out / "adapter")
    assert finetune(out, "--resume", str(out), "--adapter-format", "peft", "--lr", "1e-9", "--save-every", "1") == 1
    assert f"--adapter {str(peft_dir)!r} -> None" in capsys.readouterr().err  # the run began with --adapter
    assert finetune(out, *args, "--resume", str(out)) == 0
    assert [json.loads(line)["loss"] for line in (out / "loss.jsonl").read_text().splitlines()] == losses
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_finetune_continues_from_our_file(ours_file, tmp_path):
    out = tmp_path / "run"
    assert finetune(out, "--adapter", str(ours_file), "--lr", "1e-2") == 0
    end = adapted(out)
    assert end.lora_config == adapter_files.read_adapter_config(ours_file)  # rank, alpha, targets from the file
    moved = max((lora.adapter_state(end)[n] - t).abs().max().item()
                for n, t in lora.adapter_state(adapted(ours_file)).items())
    assert 0 < moved < 0.1  # two steps of lr 1e-2 from the file's values


@pytest.mark.parametrize("extra, words", [
    (["--lora-rank", "4"], "--lora-rank cannot be combined"),
    (["--train", "vision"], "--train cannot be combined"),
    ([], "add --adapter-format peft"),  # per-layer ranks, and the glm4v format asked for
])
def test_finetune_adapter_conflicts_are_one_line(peft_dir, tmp_path, capsys, extra, words):
    assert finetune(tmp_path / "run", "--adapter", str(peft_dir), *extra) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and str(peft_dir) in err[0], err
    assert not (tmp_path / "run").exists()


def test_the_command_mirrors_match_the_library():
    assert training_cli.ADAPTER_FORMATS == adapter_files.ADAPTER_FORMATS
    assert set(adapter_cli.FORMATS) == set(adapter_files.ADAPTER_FORMATS)


def test_no_runtime_module_imports_peft():
    """peft is the tests' reference only: the library reads and writes its folders with safetensors and json."""
    import ast

    from helpers.paths import ROOT
    for path in (ROOT / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "peft" for n in names), path
