"""What `glm4v finetune` leaves on disk: --keep-last, the free-space check made before training,
and --save-merged over a quantized base (QLoRA) merged into a dequantized float checkpoint."""
from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from helpers.paths import FIXTURES

from glm4v_conversion.quantize import quantize_checkpoint
from glm4v_core import load_model
from glm4v_core.training import cli as training_cli
from glm4v_core.training import export as training_export
from glm4v_core.training import trainer as training_trainer
from glm4v_core.training.config import FinetuneConfig, FinetuneError
from glm4v_core.training.state import read_log
from glm4v_core.transforms import adapter_files, lora

DATA = FIXTURES / "finetune" / "train.jsonl"
TINY = FIXTURES / "tiny"


def finetune(out: Path, *args: str) -> int:
    return training_cli.main(["--data", str(DATA), "--out", str(out), "--no-progress", *args])


def steps_kept(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


# -- --keep-last -----------------------------------------------------------------------------------

def after_writing(monkeypatch, step: str, then) -> list[str]:
    """Run `then(folder)` once checkpoint `step` is written (before --keep-last looks); returns the
    names of the checkpoints written."""
    real, written = training_trainer.write_checkpoint, []

    def write(dst, *rest):
        real(dst, *rest)
        written.append(dst.name)
        if dst.name == step:
            then(dst)
        return dst
    monkeypatch.setattr(training_trainer, "write_checkpoint", write)
    return written


def user_files(folder: Path) -> None:
    (folder.parent / "notes").mkdir()  # not a step-N folder
    shutil.copytree(folder, folder.parent / f"{folder.name}-copy")  # nor this one


@pytest.mark.parametrize("keep,kept", [("1", ["step-000004"]), ("2", ["step-000003", "step-000004"]),
                                       (None, [f"step-00000{k}" for k in range(1, 5)])],
                         ids=["keep 1", "keep 2", "keep all"])
def test_keep_last_deletes_only_older_checkpoints_of_this_run(tmp_path, monkeypatch, keep, kept):
    out = tmp_path / "out"
    written = after_writing(monkeypatch, "step-000001", user_files)
    assert finetune(out, "--max-steps", "4", "--save-every", "1", *(["--keep-last", keep] if keep else [])) == 0
    assert written == [f"step-00000{k}" for k in range(1, 5)]
    assert steps_kept(out) == sorted([*kept, "notes", "step-000001-copy"])
    assert [r["step"] for r in read_log(out / "loss.jsonl")[0]] == [1, 2, 3, 4]


def test_keep_last_keeps_a_folder_holding_more_than_a_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "out"
    after_writing(monkeypatch, "step-000001", lambda folder: (folder / "my-notes.txt").write_text("mine"))
    assert finetune(out, "--max-steps", "3", "--save-every", "1", "--keep-last", "1") == 0
    assert steps_kept(out) == ["step-000001", "step-000003"]  # step 1 is not only ours any more
    assert (out / "checkpoints" / "step-000001" / "my-notes.txt").read_text() == "mine"


def test_the_resumed_checkpoint_stays_until_a_newer_one_is_complete(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ["--max-steps", "4", "--save-every", "2", "--keep-last", "1"]
    real = training_trainer.write_checkpoint

    def full_disk_at_step_4(dst, *rest):
        if dst.name == "step-000004":
            raise OSError(28, "No space left on device")
        return real(dst, *rest)
    monkeypatch.setattr(training_trainer, "write_checkpoint", full_disk_at_step_4)
    assert finetune(out, *args) == 1
    assert steps_kept(out) == ["step-000002"]
    assert finetune(out, *args, "--resume", str(out)) == 1  # resumed from step 2; step 4 fails again
    err = capsys.readouterr().err
    assert "resumed from" in err and "No space left on device" in err and "step-000002" in err, err
    assert steps_kept(out) == ["step-000002"]  # the one resumed from: still there
    monkeypatch.undo()
    assert finetune(out, *args, "--resume", str(out)) == 0
    assert steps_kept(out) == ["step-000004"]  # step 2 went once step 4 was complete


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_keep_last_below_one_is_a_usage_error(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as stop:
        finetune(tmp_path / "out", "--keep-last", value)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--keep-last" in err and repr(value) in err and ">= 1" in err, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(FinetuneError, match="--keep-last"):
        FinetuneConfig(data=DATA, out=tmp_path / "out", keep_last=int(value) if value != "two" else value)


# -- free space, up front -----------------------------------------------------------------------

def du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("extra", [["--save-merged"], ["--lora-rank", "0", "--train", "projector"]],
                         ids=["lora, merged", "full fine-tune"])
def test_the_estimate_covers_what_the_run_writes(tmp_path, monkeypatch, extra):
    """The reference is the run itself: the bytes it leaves are at most the estimate, and the
    estimate is not wildly above them (a check that refuses runs that would fit is no check)."""
    planned = []
    real = training_trainer.check_free_space
    monkeypatch.setattr(training_trainer, "check_free_space",
                        lambda out, needed, what: planned.append(needed) or real(out, needed, what))
    out = tmp_path / "out"
    assert finetune(out, "--max-steps", "3", "--save-every", "1", *extra) == 0
    written = du(out)
    assert written <= planned[0] <= 1.5 * written, (written, planned)


def test_too_little_free_space_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 123_456, 123_456))
    out = tmp_path / "out"
    assert finetune(out, "--max-steps", "3", "--save-every", "1") == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("glm4v finetune: error: --out ") and "\n" not in line, line
    assert str(out) in line and "123456 bytes) free" in line and "checkpoint" in line, line
    needed = int(line.split("about ")[1].split("(")[1].split(" bytes")[0])
    assert needed > 123_456
    assert not out.exists() and list(tmp_path.iterdir()) == []


# -- QLoRA --save-merged --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def int4_base(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("qlora") / "int4"
    quantize_checkpoint(TINY, dst, "int4", 32)
    return dst


def sample_inputs(config) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [config.boi_token_id, config.pad_token_id, config.eoi_token_id, *range(17, 29)]
    g = torch.Generator().manual_seed(0)
    size = config.vision.image_size
    return torch.tensor([ids]), torch.rand(1, 3, size, size, generator=g) * 2 - 1


@torch.no_grad()
def logits(model, inputs) -> torch.Tensor:
    return model.eval()(*inputs).logits.float()


@torch.no_grad()
def test_merging_into_the_dequantized_base_keeps_the_logits(int4_base):
    """Merged (dequantize(W) + scale B A, fp32) against the quantized model with its adapters. The
    bound: the quantized kernels' own distance from their dequantized weights (the base with no
    adapter, both ways), twice, plus fp32 rounding of the sums."""
    model = load_model(int4_base)
    inputs = sample_inputs(model.config)
    base_q = logits(model, inputs)
    base_dense = logits(training_export.merge_dequantized(load_model(int4_base), torch.float32), inputs)
    kernel_err = (base_q - base_dense).abs().max().item()
    lora.add_lora(model, lora.LoRAConfig(rank=4, alpha=8.0, targets=lora.TARGET_PRESETS["decoder"]))
    g = torch.Generator().manual_seed(1)
    for adapter in lora.adapters_of(model).values():  # B = 0 at init: give the adapters something to merge
        adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.05)
    unmerged = logits(model, inputs)
    merged = logits(training_export.merge_dequantized(model, torch.float32), inputs)
    assert not lora.adapters_of(model) and not training_export.quantized_linears(model)
    err, effect = (merged - unmerged).abs().max().item(), (unmerged - base_q).abs().max().item()
    bound = 2 * kernel_err + 1e-4 * unmerged.abs().max().item()
    assert err <= bound, f"merged differs by {err:.3g} (bound {bound:.3g})"
    assert effect > 20 * bound, f"the adapters change the logits by only {effect:.3g}: the test would not see them"


def test_qlora_save_merged_end_to_end(tmp_path, int4_base, capsys):
    """`glm4v finetune --save-merged` on an int4 base writes a float HF checkpoint in the base's
    own float dtype (bf16) whose logits are those of the quantized base + the saved adapters, within
    what bf16 storage costs any merged model: bound = twice the error bf16 rounding gives the float
    tiny base with the same adapters merged (the plain LoRA path), plus fp32 rounding."""
    out = tmp_path / "out"
    assert finetune(out, "--checkpoint", str(int4_base), "--max-steps", "4", "--lr", "3e-2", "--save-merged") == 0
    assert "int4-quantized" in capsys.readouterr().err
    merged = load_model(out / "merged")  # HF layout, float: loads like any checkpoint
    assert not (out / "merged" / "glm4v_native.json").exists()
    assert {p.dtype for p in load_model(out / "merged", dtype="bfloat16").parameters()} == {torch.bfloat16}
    inputs = sample_inputs(merged.config)
    reference = load_model(int4_base)
    base_q = logits(reference, inputs)
    adapter_files.load_adapters(reference, out / "adapter.safetensors")
    unmerged = logits(reference, inputs)
    plain = load_model(TINY)
    adapter_files.load_adapters(plain, out / "adapter.safetensors")
    plain_unmerged = logits(plain, inputs)
    plain = lora.remove_lora(plain).to(torch.bfloat16).float()
    bound = 2 * (logits(plain, inputs) - plain_unmerged).abs().max().item() + 1e-4 * unmerged.abs().max().item()
    err = (logits(merged, inputs) - unmerged).abs().max().item()
    assert err <= bound, f"merged/ differs by {err:.3g} (bound {bound:.3g})"
    assert (unmerged - base_q).abs().max().item() > 2 * bound  # the training did move the logits
