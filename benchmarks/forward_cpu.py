"""Time a full fp32 forward (image + text, case a) of the bundled fixtures on CPU.

Reports median and best wall time. The tiny fixture's compute is negligible, so its time per
layer is an upper bound on the per-layer Python overhead of our model code.

    python benchmarks/forward_cpu.py [--repeat 30]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

from glm4v_core import load_model  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


@torch.no_grad()
def time_forward(name: str, repeat: int) -> dict:
    model = load_model(FIXTURES / name, dtype=torch.float32)
    ref = load_file(str(FIXTURES / name / "reference.safetensors"))
    ids, px = ref["input_ids_a"], ref["pixel_values_a"]
    for _ in range(3):
        model(ids, px)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        model(ids, px)
        times.append(time.perf_counter() - t0)
    c = model.config
    return {
        "fixture": name, "tokens": int(model(ids, px).logits.shape[1]),
        "vision_layers": c.vision.num_layers, "decoder_layers": c.num_layers,
        "median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "repeat": repeat,
        "per_layer_ms": min(times) * 1e3 / (c.vision.num_layers + c.num_layers),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=30)
    args = p.parse_args()
    rows = [time_forward(name, args.repeat) for name in ("tiny", "narrow")]
    print(f"{'fixture':<8} {'tokens':>6} {'layers':>7} {'median ms':>10} {'min ms':>8} {'best ms/layer':>14}")
    for r in rows:
        print(f"{r['fixture']:<8} {r['tokens']:>6} {r['vision_layers'] + r['decoder_layers']:>7} "
              f"{r['median_ms']:>10.2f} {r['min_ms']:>8.2f} {r['per_layer_ms']:>14.3f}")
    write_result("forward_cpu", {"results": rows})


if __name__ == "__main__":
    main()
