"""Tensor-parallel generation: time to first token and decode tokens/s for 1, 2, ... ranks; on CPU
also `glm4v finetune --fsdp N`'s optimizer step time for 1 and 2 ranks.

    python benchmarks/distributed.py                 # CPU, gloo: mid-size random model (fp32), 1 and 2 ranks,
                                                     # then LoRA fine-tuning steps on the narrow fixture
    python benchmarks/distributed.py --real          # CUDA, NCCL: real-size GLM-4V-9B, random bf16 weights,
                                                     # TP 1/2/4 where there are that many GPUs

On CPU this is a correctness-and-overhead check, not a speed claim: the ranks share the machine's
cores (each gets cores / ranks threads) and every decoder block adds two all-reduces through gloo.
Greedy tokens of every degree must equal those of one rank (recorded as `tokens_equal_1_rank`).
The real model has 2 KV groups, so TP 4 is refused by the sharding plan (each rank must own whole
KV groups); that row records the error instead of numbers. Nothing is recorded for a degree the
machine has no GPUs for.

Fine-tuning rows (CPU only): the trainer of `glm4v finetune --fsdp N` (LoRA rank 8 on the decoder,
global micro-batch 2, so one sample per rank at N = 2) on the narrow fixture and the bundled
fine-tuning data; the step's losses of every degree must equal those of one rank within 1e-5
(`losses_equal_1_rank`). Again overhead, not speed: a step of this size is mostly FSDP's gathers.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402
from generate import mid_size_config, prompt, random_model, real_config  # noqa: E402

from glm4v_core import GLM4VConfig  # noqa: E402
from glm4v_core.generation.loop import stream_tokens  # noqa: E402
from glm4v_core.training import cli as training_cli
from glm4v_core.training import trainer as training_trainer
from glm4v_core.transforms import distributed as transforms_distributed


def time_generation(hf: dict, dtype_name: str, n_text: int, image: bool, new_tokens: int, repeat: int) -> dict:
    """On every rank: the same random model (same seed), sharded when there are several ranks,
    one greedy prompt timed `repeat` times after a warm-up; rank 0's numbers are returned."""
    device = transforms_distributed.init()  # on CPU each rank gets its share of the cores
    ranks = torch.distributed.get_world_size()
    torch.manual_seed(0)
    model = random_model(hf, device, getattr(torch, dtype_name))
    if ranks > 1:
        transforms_distributed.tensor_parallel(model, transforms_distributed.mesh(device))
    c = GLM4VConfig.from_hf(hf)
    ids = torch.tensor([prompt(c, n_text, image)], device=device)
    size = c.vision.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device) if image else None
    ttfts, steps, tokens = [], [], None
    for run in range(repeat + 1):  # run 0 warms up
        start, times, out = time.perf_counter(), [], []
        for step in stream_tokens(model, ids, pixels, max_new_tokens=new_tokens, stop_ids=[]):
            out.append(int(step.tokens[0]))  # on the host: what a user would see
            times.append(time.perf_counter() - start)
        if run:
            ttfts.append(times[0])
            steps.append((times[-1] - times[0]) / (len(times) - 1))
        tokens = out
    step_s = statistics.median(steps)
    return {"ranks": ranks, "ttft_ms": statistics.median(ttfts) * 1e3, "decode_ms_per_step": step_s * 1e3,
            "decode_ms_spread": [min(steps) * 1e3, max(steps) * 1e3], "decode_tok_s": 1 / step_s, "tokens": tokens}


FIXTURES = Path(__file__).parent.parent / "tests" / "fixtures"


def time_finetune_steps(steps: int) -> dict:
    """On every rank: `steps` optimizer steps of `glm4v finetune --fsdp N`'s trainer after one
    warm-up step; rank 0's times and every step's loss."""
    pass
    ranks = torch.distributed.get_world_size()
    with tempfile.TemporaryDirectory() as out:
        args = training_cli.build_parser().parse_args([
            "--checkpoint", str(FIXTURES / "narrow"), "--data", str(FIXTURES / "finetune" / "train.jsonl"),
            "--out", out, "--batch-size", "2", "--max-steps", str(steps + 1), "--fsdp", str(ranks), "--no-progress"])
        trainer = training_trainer.Trainer(args)
        records = [trainer.train_step() for _ in range(steps + 1)]
    times = [r["seconds"] for r in records[1:]]
    return {"ranks": ranks, "step_ms_median": statistics.median(times) * 1e3,
            "step_ms_spread": [min(times) * 1e3, max(times) * 1e3], "losses": [r["loss"] for r in records]}


def finetune_rows(steps: int) -> list[dict]:
    rows = []
    for n in (1, 2):
        row = transforms_distributed.run_ranks(time_finetune_steps, n, steps, device_type="cpu")
        if rows:
            row["losses_equal_1_rank"] = all(abs(a - b) <= 1e-5 * abs(a)
                                             for a, b in zip(rows[0]["losses"], row["losses"], strict=True))
        rows.append(row)
        print(f"finetune --fsdp {n}: {row['step_ms_median']:.0f} ms/step")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--real", action="store_true", help="real-size model on CUDA (NCCL), TP 1/2/4")
    p.add_argument("--ranks", default=None, help="comma-separated degrees (default 1,2 on CPU, 1,2,4 with --real)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3, help="timed runs per degree; the median is reported")
    p.add_argument("--finetune-steps", type=int, default=6, help="CPU: timed fine-tuning steps per degree")
    args = p.parse_args()
    if args.real:
        hf, dtype_name, n_text, image, degrees = real_config(None), "bfloat16", 100, True, "1,2,4"
        gpus = torch.cuda.device_count()
    else:
        hf, dtype_name, n_text, image, degrees = mid_size_config(), "float32", 64, False, "1,2"
    rows = []
    for n in map(int, (args.ranks or degrees).split(",")):
        if args.real and n > gpus:
            print(f"TP {n}: skipped, {gpus} GPU(s) here")
            continue
        try:
            row = transforms_distributed.run_ranks(time_generation, n, hf, dtype_name, n_text, image,
                                                   args.new_tokens, args.repeat,
                                                   device_type="cuda" if args.real else "cpu")
        except transforms_distributed.DistributedError as e:
            row = {"ranks": n, "error": str(e).strip().splitlines()[-1]}
        if "tokens" in row and rows and "tokens" in rows[0]:
            row["tokens_equal_1_rank"] = row["tokens"] == rows[0]["tokens"]
        rows.append(row)
        print(f"TP {n}: " + (row.get("error") or f"TTFT {row['ttft_ms']:.1f} ms, decode {row['decode_tok_s']:.1f} tok/s"
                                                 f" ({row['decode_ms_per_step']:.2f} ms/step)"))
    if sum("error" not in r for r in rows) < 2:
        print("fewer than two degrees measured: nothing recorded")
        return
    model = ("GLM-4V-9B real size, random bf16 weights" if args.real
             else "mid-size random model (benchmarks/generate.py), fp32")
    slug = torch.cuda.get_device_name().lower().replace(" ", "-") if args.real else "cpu"
    numbers = {"model": model, "prompt_text_tokens": n_text, "image": image, "new_tokens": args.new_tokens,
               "batch": 1, "rows": rows}
    if not args.real:
        numbers["finetune"] = {"model": "narrow fixture, fp32, LoRA rank 8 on the decoder",
                               "data": "tests/fixtures/finetune/train.jsonl", "global_batch": 2,
                               "rows": finetune_rows(args.finetune_steps)}
    write_result(f"distributed_{slug}", numbers)


if __name__ == "__main__":
    main()
