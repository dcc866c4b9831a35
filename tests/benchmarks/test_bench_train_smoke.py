"""benchmarks/train.py: one tiny step of each variant runs, and the planned LoRA budget adds up."""
import sys

from helpers.paths import BENCHMARKS  # noqa: E402

from glm4v_core import BUNDLED_CHECKPOINT

sys.path.insert(0, str(BENCHMARKS))
import train  # noqa: E402


def test_every_variant_steps_with_the_same_loss():
    results = [train.run_variant_cpu(loss, ckpt, rows=1, text_tokens=24, steps=1) for loss, ckpt in train.VARIANTS]
    losses = [r["loss_value"] for r in results]
    assert max(losses) - min(losses) < 1e-5
    kept = {(r["loss"], r["checkpointing"]): r["saved_for_backward_bytes"] for r in results}
    assert kept["chunked", True] < kept["plain", True] < kept["plain", False]


def test_the_planned_budget_shrinks_with_each_switch():
    """The budget is the memory planner's (the bundled demo's config here; the 9B in test_memory_plan.py)."""
    rows = {(r["loss"], r["checkpointing"]): r for r in train.planned_budget(BUNDLED_CHECKPOINT / "config.json",
                                                                             rank=8, text_tokens=256)}
    assert all(sum(r["components"].values()) == r["peak_bytes"] for r in rows.values())
    plain, chunked = rows["plain", True]["phases"]["loss"], rows["chunked", True]["phases"]["loss"]
    assert plain > chunked  # fp32 logits of every position vs a vocabulary chunk of the counted ones
    kept = {key: r["components"]["activations_kept"] for key, r in rows.items()}
    assert kept["chunked", True] < kept["chunked", False] / 4
