"""benchmarks/train.py: one tiny step of each variant runs, and the 9B LoRA budget adds up."""
import sys

from helpers.paths import BENCHMARKS  # noqa: E402

sys.path.insert(0, str(BENCHMARKS))
import train  # noqa: E402


def test_every_variant_steps_with_the_same_loss():
    results = [train.run_variant_cpu(loss, ckpt, rows=1, text_tokens=24, steps=1) for loss, ckpt in train.VARIANTS]
    losses = [r["loss_value"] for r in results]
    assert max(losses) - min(losses) < 1e-5
    kept = {(r["loss"], r["checkpointing"]): r["saved_for_backward_bytes"] for r in results}
    assert kept["chunked", True] < kept["plain", True] < kept["plain", False]


def test_lora_budget_of_the_real_model():
    b = train.lora_budget(rank=8, text_tokens=256, checkpointing=True, chunked=True, counted=256)
    assert b.weights == 13_906_320_896 * 2  # every parameter of the real checkpoint in bf16
    plain = train.lora_budget(rank=8, text_tokens=256, checkpointing=True, chunked=False, counted=256)
    T = 256 - 3 + 1602
    assert plain.logits == T * 151552 * (2 + 4 + 4)  # bf16 logits, their fp32 copy and its gradient
    assert b.logits < plain.logits / 100
    no_ckpt = train.lora_budget(rank=8, text_tokens=256, checkpointing=False, chunked=True, counted=256)
    assert b.activations < no_ckpt.activations / 10
    assert 25e9 < b.total < 35e9
