"""benchmarks/finetune.py: one tiny step of each variant runs; both methods compute the same loss
and LoRA trains only the adapters."""
import sys

from helpers.paths import BENCHMARKS  # noqa: E402

sys.path.insert(0, str(BENCHMARKS))
import finetune as bench  # noqa: E402
from helpers.paths import FIXTURES


def test_every_variant_steps_with_the_same_loss():
    results = [bench.run_variant_cpu(method, kind, text_tokens=24, steps=1, rank=4) for method, kind in bench.VARIANTS]
    losses = [r["loss_value"] for r in results]
    assert max(losses) - min(losses) < 1e-5
    by = {(r["method"], r["kind"]): r for r in results}
    assert by["ours", "lora"]["trainable_params"] == by["reference", "lora"]["trainable_params"]
    assert by["ours", "lora"]["trainable_params"] < by["ours", "full"]["trainable_params"] / 10
    assert by["ours", "full"]["trainable_params"] == by["ours", "full"]["total_params"]


def test_real_mode_code_path_on_cpu_with_the_tiny_config():
    """--real's step on CPU with the tiny config (no memory recorded): both methods, same loss."""
    from glm4v_core import GLM4VConfig
    config = GLM4VConfig.from_json(FIXTURES / "tiny" / "config.json")
    results = bench.run_real(text_tokens=24, steps=1, rank=4, methods=["ours", "reference"], config=config,
                             device="cpu")
    assert [r["method"] for r in results] == ["ours", "reference"]
    assert abs(results[0]["loss_value"] - results[1]["loss_value"]) < 1e-2  # bf16: chunked vs plain rounding
    assert results[0]["trainable_params"] < results[0]["total_params"] / 10
