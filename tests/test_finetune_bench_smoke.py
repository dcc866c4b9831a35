"""benchmarks/finetune.py: one tiny step of each variant runs; both methods compute the same loss
and LoRA trains only the adapters."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import finetune as bench  # noqa: E402


def test_every_variant_steps_with_the_same_loss():
    results = [bench.run_variant_cpu(method, kind, text_tokens=24, steps=1, rank=4) for method, kind in bench.VARIANTS]
    losses = [r["loss_value"] for r in results]
    assert max(losses) - min(losses) < 1e-5
    by = {(r["method"], r["kind"]): r for r in results}
    assert by["ours", "lora"]["trainable_params"] == by["reference", "lora"]["trainable_params"]
    assert by["ours", "lora"]["trainable_params"] < by["ours", "full"]["trainable_params"] / 10
    assert by["ours", "full"]["trainable_params"] == by["ours", "full"]["total_params"]
