"""Several images per prompt: time to first token and peak memory for 1, 2 and 4 images.

    python benchmarks/multi_image.py                       # CPU: the narrow fixture, fp32
    python benchmarks/multi_image.py --real --fixtures ""  # real-size GLM-4V-9B, random bf16 weights (CUDA)
    python benchmarks/multi_image.py --real --real-layers 1 --fixtures "" --device cpu   # smoke test

Prompt: [gMASK] <sop> <|user|> N image blocks, 32 text tokens <|assistant|>, batch 1. TTFT (median
and best of --repeat runs after a warm-up) runs from the call to the first token on the host: ViT
over N images in bounded batches, splice, prefill of N * (2 + num_image_tokens) + text cache
slots, first sampling, through glm4v_core.generation.loop.stream_tokens, the loop the library uses.

Peak memory. CUDA: torch.cuda.max_memory_allocated over the runs of one N, minus what was allocated
before them (weights). CPU: torch has no allocator statistics, so each N runs in a fresh child
process and reports the growth of its peak resident set (getrusage ru_maxrss) over its level after
the model is loaded.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402
from generate import random_model, real_config  # noqa: E402  (benchmarks/generate.py)

from glm4v_core import GLM4VConfig, load_model  # noqa: E402
from glm4v_core.generation.loop import stream_tokens  # noqa: E402
from glm4v_core.model.splice import ImageBlock, spliced_length  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
N_TEXT = 32


def prompt(config: GLM4VConfig, n_images: int, seed: int = 0) -> torch.Tensor:
    """(1, L): the chat template's shape with n_images blocks before 32 ordinary ids."""
    special0 = config.pad_token_id  # special ids follow the BPE ranks: <|endoftext|> is the first
    gmask, sop, user, assistant = special0 + 2, special0 + 4, special0 + 7, special0 + 8
    text = torch.randint(0, special0, (N_TEXT,), generator=torch.Generator().manual_seed(seed)).tolist()
    block = [config.boi_token_id, config.pad_token_id, config.eoi_token_id]
    return torch.tensor([[gmask, sop, user, *block * n_images, *text, assistant]])


def time_to_first_token(model, ids: torch.Tensor, pixels: torch.Tensor) -> float:
    start = time.perf_counter()
    steps = stream_tokens(model, ids, pixels, max_new_tokens=1, stop_ids=[])
    next(steps).tokens.cpu()  # the token on the host: what a user waits for
    elapsed = time.perf_counter() - start
    steps.close()
    return elapsed


def measure(model, n_images: int, repeat: int) -> dict:
    """TTFT (median of `repeat` after a warm-up) and, on CUDA, peak memory for one N."""
    c, device = model.config, model.text.embed.weight.device
    ids = prompt(c, n_images).to(device)
    size = c.vision.image_size
    pixels = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(n_images)).to(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    time_to_first_token(model, ids, pixels)  # warm-up: allocator, kernels
    times = [time_to_first_token(model, ids, pixels) for _ in range(repeat)]
    row = {"images": n_images, "prompt_tokens": ids.shape[1],
           "cache_slots": spliced_length(ids, ImageBlock.from_config(c)),
           "ttft_ms": statistics.median(times) * 1e3, "ttft_best_ms": min(times) * 1e3}
    if cuda:
        row["peak_mem_MiB"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        row["peak_mem_method"] = "torch.cuda.max_memory_allocated minus the weights"
    return row


def child(args) -> None:
    """One N in this fresh process; prints one JSON row (CPU peak memory needs a process per N)."""
    model = load_model(FIXTURES / args.fixture, dtype=torch.float32, device="cpu")
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    row = measure(model, args.child, args.repeat)
    row["peak_mem_MiB"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
    row["peak_mem_method"] = "peak RSS growth over the loaded model (getrusage, fresh process per N)"
    print(json.dumps(row))


def cpu_rows(args, fixture: str) -> list[dict]:
    rows = []
    for n in args.images:
        cmd = [sys.executable, __file__, "--child", str(n), "--fixture", fixture, "--repeat", str(args.repeat)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'images':>6} {'prompt':>7} {'slots':>7} {'TTFT ms':>10} {'best ms':>9} {'peak MiB':>9}")
    for r in rows:
        peak = "-" if r["peak_mem_MiB"] is None else f"{r['peak_mem_MiB']:.1f}"
        print(f"{r['images']:>6} {r['prompt_tokens']:>7} {r['cache_slots']:>7} {r['ttft_ms']:>10.2f} "
              f"{r['ttft_best_ms']:>9.2f} {peak:>9}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixtures", default="narrow", help="fixture checkpoints to time on CPU ('' for none)")
    p.add_argument("--images", default="1,2,4", type=lambda s: [int(n) for n in s.split(",")])
    p.add_argument("--repeat", type=int, default=3, help="runs per point; the median is reported")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for --real")
    p.add_argument("--real", action="store_true", help="also time the real-size model with random bf16 weights")
    p.add_argument("--real-layers", type=int, default=None, help="shrink the real model's depth (smoke tests)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--fixture", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child is not None:
        return child(args)
    results: dict = {"text_tokens": N_TEXT, "fixtures": {}, "real": None}
    for name in filter(None, args.fixtures.split(",")):
        rows = cpu_rows(args, name)
        results["fixtures"][name] = rows
        print_table(f"{name} fixture, fp32, cpu", rows)
    if args.real:
        device = torch.device(args.device)
        model = random_model(real_config(args.real_layers), device, torch.bfloat16)
        rows = [measure(model, n, args.repeat) for n in args.images]
        if device.type == "cpu":  # smoke test only: no allocator statistics
            for r in rows:
                r["peak_mem_MiB"], r["peak_mem_method"] = None, "not measured on CPU in --real mode"
        results["real"] = {"dtype": "bfloat16", "layers": model.config.num_layers, "device": str(device),
                           "rows": rows, "note": "random weights; 1120 px images, 1602 cache slots each"}
        print_table(f"GLM-4V-9B real size ({model.config.num_layers} decoder layers), random bf16 weights, {device}",
                    rows)
    if not args.real:
        slug = "cpu"
    elif args.device == "cpu":
        slug = "cpu_real_smoke"  # a shrunken real model: keeps the fixture numbers' file intact
    else:
        slug = torch.cuda.get_device_name().lower().replace(" ", "-")
    write_result(f"multi_image_{slug}", results, args.out)


if __name__ == "__main__":
    main()
