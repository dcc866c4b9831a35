"""`glm4v finetune --fsdp 2` on 2 gloo ranks (CPU) against the one-process run, tiny fixture.

The fixture data mixes image and text-only records and has an odd count, so the sharded run
meets both filler cases (a rank whose share has no image, a rank with an empty share)."""
import argparse
import os
import re
from pathlib import Path

import pytest
import torch
from helpers.paths import FIXTURES
from safetensors.torch import load_file

from glm4v_core import cli, load_model
from glm4v_core.training import cli as training_cli
from glm4v_core.training import config as training_config
from glm4v_core.training.state import read_log
from glm4v_core.transforms import adapter_files

DATA = FIXTURES / "finetune"
LR, STEPS = 1e-3, 2
# Trained weights: Adam divides each update by the root of its second moment, so an element whose
# gradient is at rounding level (~1e-9 here) moves by an amount of order lr in either run: the
# weights agree to 5% of the largest update; the gradients themselves (Adam's first moment) to 1e-4.
WEIGHT_ATOL = 0.05 * LR * STEPS
# LoRA on decoder and projector (the projector only sees image rows), 2 optimizer steps of 2
# micro-batches, gradients not clipped (clipping would hide a wrong gradient scale); the full
# fine-tune clips (the norm of sharded gradients)
LORA = ["--batch-size", "2", "--grad-accum", "2", "--max-steps", str(STEPS), "--lr", str(LR),
        "--train", "decoder,projector", "--max-grad-norm", "0", "--save-every", "1",
        "--eval-data", str(DATA / "eval.jsonl"), "--save-merged"]
FULL = ["--batch-size", "2", "--max-steps", str(STEPS), "--lr", str(LR), "--lora-rank", "0", "--train", "projector"]


def finetune_run(out: Path, *args: str) -> Path:
    code = training_cli.main(["--data", str(DATA / "train.jsonl"), "--out", str(out), "--no-progress", *args])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("fsdp")
    return {"lora_1": finetune_run(tmp / "lora_1", *LORA), "lora_2": finetune_run(tmp / "lora_2", *LORA, "--fsdp", "2"),
            "full_1": finetune_run(tmp / "full_1", *FULL), "full_2": finetune_run(tmp / "full_2", *FULL, "--fsdp", "2")}


def assert_close_tensors(a: dict, b: dict, what: str, rel: float = 1e-4, atol: float = 0.0) -> None:
    """Each tensor within rel x its max-abs, or atol."""
    assert a.keys() == b.keys(), what
    for name in a:
        scale = a[name].float().abs().max().item()
        err = (a[name].float() - b[name].float()).abs().max().item()
        assert err <= max(rel * scale, atol), f"{what}: {name} differs by {err:.3g} (max-abs {scale:.3g})"


def adam_moments(path: Path) -> dict:
    return {n: t for n, t in load_file(path).items() if n.endswith((".exp_avg", ".exp_avg_sq"))}


def test_fsdp_lora_losses_match_one_process(runs):
    train_1, eval_1 = read_log(runs["lora_1"] / "loss.jsonl")
    train_2, eval_2 = read_log(runs["lora_2"] / "loss.jsonl")
    assert [r["step"] for r in train_2] == [1, 2] and len(eval_2) == len(eval_1) == 1  # rank 0 alone logs
    for one, two in zip(train_1 + eval_1, train_2 + eval_2, strict=True):
        key = "loss" if "loss" in one else "eval_loss"
        assert abs(one[key] - two[key]) <= 1e-5 * abs(one[key]), (one, two)
        assert one.get("counted_tokens") == two.get("counted_tokens")  # the global batch's tokens


def test_fsdp_lora_adapters_and_checkpoints_are_the_one_process_files(runs):
    for name in ("adapter.safetensors", "checkpoints/step-000001/trainable.safetensors"):
        assert_close_tensors(load_file(runs["lora_1"] / name), load_file(runs["lora_2"] / name), name, atol=WEIGHT_ATOL)
    for step in ("step-000001", "step-000002"):
        name = f"checkpoints/{step}/optimizer.safetensors"
        assert_close_tensors(adam_moments(runs["lora_1"] / name), adam_moments(runs["lora_2"] / name), name)
    model = load_model(FIXTURES / "tiny")
    adapter_files.load_adapters(model, runs["lora_2"] / "adapter.safetensors")  # the one-process format and metadata
    assert adapter_files.read_adapter_config(runs["lora_2"] / "adapter.safetensors") == model.lora_config
    merged_1, merged_2 = load_model(runs["lora_1"] / "merged"), load_model(runs["lora_2"] / "merged")
    assert_close_tensors(dict(merged_1.named_parameters()), dict(merged_2.named_parameters()), "merged/",
                         atol=WEIGHT_ATOL)


@pytest.mark.parametrize("source, flags", [("lora_2", []), ("lora_1", ["--fsdp", "2"])],
                         ids=["fsdp-checkpoint-in-one-process", "one-process-checkpoint-under-fsdp"])
def test_checkpoints_resume_across_rank_counts(runs, tmp_path, source, flags):
    """Checkpoints hold whole tensors: step 1 of either run continues, in one process or sharded
    (each rank keeps its shard of the stored weights and Adam moments), to the same step 2."""
    resumed = finetune_run(tmp_path / "resumed", *LORA, *flags,
                           "--resume", str(runs[source] / "checkpoints" / "step-000001"))
    one, two = read_log(runs["lora_1"] / "loss.jsonl")[0], read_log(resumed / "loss.jsonl")[0]
    assert [r["step"] for r in two] == [1, 2]
    assert abs(one[1]["loss"] - two[1]["loss"]) <= 1e-5 * one[1]["loss"], (one, two)
    assert_close_tensors(adam_moments(runs["lora_1"] / "checkpoints/step-000002/optimizer.safetensors"),
                         adam_moments(resumed / "checkpoints/step-000002/optimizer.safetensors"), "resumed moments")


def test_fsdp_full_fine_tune_writes_the_one_process_model(runs):
    (train_1, _), (train_2, _) = read_log(runs["full_1"] / "loss.jsonl"), read_log(runs["full_2"] / "loss.jsonl")
    assert [r["loss"] for r in train_2] == pytest.approx([r["loss"] for r in train_1], rel=1e-5)
    one, two = load_model(runs["full_1"] / "model"), load_model(runs["full_2"] / "model")  # loadable checkpoints
    assert_close_tensors(dict(one.named_parameters()), dict(two.named_parameters()), "model/", atol=WEIGHT_ATOL)
    name = "checkpoints/step-000002/optimizer.safetensors"
    assert_close_tensors(adam_moments(runs["full_1"] / name), adam_moments(runs["full_2"] / name), name)
    trained = dict(two.projector.named_parameters())
    base = dict(load_model(FIXTURES / "tiny").projector.named_parameters())
    assert any(not torch.equal(trained[n], base[n]) for n in trained)  # the projector did train


@pytest.mark.parametrize("flags, message", [
    (["--fsdp", "0"], r"--fsdp must be >= 1 \(the number of ranks\), got 0"),
    (["--fsdp", "2", "--batch-size", "3"], r"--fsdp 2 must divide --batch-size 3"),
    (["--fsdp", str(len(os.sched_getaffinity(0)) + 1), "--batch-size", str(len(os.sched_getaffinity(0)) + 1)],
     r"--fsdp \d+ on the CPU runs \d+ processes of at least one core each; this machine gives \d+ core"),
])
def test_bad_fsdp_values_are_refused_before_any_rank_starts(tmp_path, capsys, flags, message):
    code = cli.main(["finetune", "--data", str(DATA / "train.jsonl"), "--out", str(tmp_path / "out"), "--device", "cpu",
                     *flags])  # the `glm4v finetune` command
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("glm4v finetune: error: ") and re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_fsdp_on_cuda_asks_for_one_gpu_per_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(training_config, "check_device", lambda name: torch.device(name))
    args = argparse.Namespace(fsdp=2, device="cuda", batch_size=2)
    with pytest.raises(training_config.FinetuneError,
                       match=r"--fsdp 2 needs 2 GPUs \(one per rank\), this machine has 1"):
        training_config.check_fsdp(args)


@pytest.mark.slow
def test_qlora_under_fsdp_matches_one_process(tmp_path):
    """A quantized base (packed int4 buffers, replicated on every rank) with LoRA adapters (sharded)."""
    from glm4v_conversion.quantize import quantize_checkpoint
    quantize_checkpoint(FIXTURES / "tiny", tmp_path / "int4", "int4", 32)
    args = ["--checkpoint", str(tmp_path / "int4"), "--batch-size", "2", "--max-steps", "2", "--max-grad-norm", "0"]
    one, two = finetune_run(tmp_path / "one", *args), finetune_run(tmp_path / "two", *args, "--fsdp", "2")
    assert [r["loss"] for r in read_log(two / "loss.jsonl")[0]] == pytest.approx(
        [r["loss"] for r in read_log(one / "loss.jsonl")[0]], rel=1e-5)
    name = "checkpoints/step-000002/optimizer.safetensors"
    assert_close_tensors(adam_moments(one / name), adam_moments(two / name), name)
