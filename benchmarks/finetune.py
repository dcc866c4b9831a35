"""Fine-tuning step benchmark: one LoRA step and one full step, ours vs the HF reference's recipe.

A step = forward with labels, backward, one AdamW update of the trained tensors. Variants:
  ours       chunked loss (no fp32 logits of the whole sequence) + gradient checkpointing
  reference  the way the official GLM-4V fine-tuning recipe runs the same step: a plain forward
             with fp32 logits of the whole sequence, no checkpointing. Written with our modules
             (GLM4V.loss_chunk_size = None, checkpointing off): the numbers are about the method.
each with LoRA (rank --lora-rank on every decoder Linear, fp32 adapters) and as a full step (every
parameter trained: gradients + AdamW moments for all of them).

CPU (default): the narrow fixture, fp32, one row of image + --text-tokens text tokens (all
answer tokens learned). Each variant runs in a fresh process; memory = growth of the process's
peak RSS during its first step (Linux VmHWM reset just before; approximate, the allocator's reuse
blurs it). The machine these numbers come from is shared by several jobs: step times are noisy
(median of --steps), memory is not.

--real (CUDA): the real GLM-4V-9B shapes (all 40 decoder and 63 ViT blocks, 1120 px image + 256
text tokens) with random bf16 weights; LoRA only (a full AdamW step of 13.9B parameters does not fit
one GPU). Memory = torch.cuda.max_memory_allocated over the step, weights included: the goal is
one LoRA step within 32 GB.

    python benchmarks/finetune.py                 # CPU, narrow fixture
    python benchmarks/finetune.py --real          # CUDA, real shapes
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402
from train import MANIFEST, cpu_model_and_batch, first_step_peak_then_times, make_batch  # noqa: E402

from glm4v_core import GLM4V, GLM4VConfig  # noqa: E402
from glm4v_core.transforms import lora as transforms_lora

VARIANTS = [("ours", "lora"), ("reference", "lora"), ("ours", "full"), ("reference", "full")]
GB = 1e9


def prepare(model: GLM4V, method: str, kind: str, rank: int) -> torch.optim.Optimizer:
    """Trainable tensors + optimizer for one variant; method picks the loss path and checkpointing."""
    if kind == "lora":
        transforms_lora.add_lora(model, transforms_lora.LoRAConfig.from_presets(["decoder"], rank=rank))
    else:
        model.requires_grad_(True)
    model.loss_chunk_size = GLM4V.loss_chunk_size if method == "ours" else None
    model.gradient_checkpointing(method == "ours")
    model.train()
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def step(model: GLM4V, batch: dict, optimizer: torch.optim.Optimizer) -> float:
    loss = model(batch["input_ids"], batch["pixel_values"], labels=batch["labels"]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def trainable_numbers(model: GLM4V) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    return {"trainable_params": sum(p.numel() for p in params),
            "total_params": sum(p.numel() for p in model.parameters())}


def run_variant_cpu(method: str, kind: str, text_tokens: int, steps: int, rank: int) -> dict:
    model, batch = cpu_model_and_batch(1, text_tokens)
    model.requires_grad_(False)
    optimizer = prepare(model, method, kind, rank)
    value, peak, reset, times = first_step_peak_then_times(lambda: step(model, batch, optimizer), steps)
    return {"method": method, "kind": kind, "loss_value": value, "peak_rss_growth_bytes": peak, "hwm_reset": reset,
            "step_s_median": statistics.median(times), "step_s_best": min(times), **trainable_numbers(model)}


def run_real(text_tokens: int, steps: int, rank: int, methods: list[str], config: GLM4VConfig | None = None,
             device: str = "cuda") -> list[dict]:
    """One LoRA step per method on random bf16 weights (the real config unless one is given; the
    smoke test runs it on CPU with the tiny config, where no memory is recorded)."""
    cuda = device == "cuda"
    c = config or GLM4VConfig.from_hf(json.loads(MANIFEST.read_text())["config"])
    model = GLM4V.from_config(c, seed=0, dtype=torch.bfloat16, device=device)
    prompt = torch.tensor([c.vocab_size - 221, c.vocab_size - 219, c.vocab_size - 216, 198,  # [gMASK] <sop> <|user|> \n
                           c.boi_token_id, c.pad_token_id, c.eoi_token_id, 3, 4, 5, c.vocab_size - 215])
    pixels = torch.randn(1, 3, c.vision.image_size, c.vision.image_size)
    batch = {k: v.to(device) for k, v in make_batch(c, prompt, pixels, 1, text_tokens).items()}
    model.requires_grad_(False)
    transforms_lora.add_lora(model, transforms_lora.LoRAConfig.from_presets(["decoder"], rank=rank))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    weights = torch.cuda.memory_allocated() if cuda else None
    results = []
    for method in methods:
        model.loss_chunk_size = GLM4V.loss_chunk_size if method == "ours" else None
        model.gradient_checkpointing(method == "ours")
        model.train()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            value = step(model, batch, optimizer)
            sync()
        except torch.cuda.OutOfMemoryError:
            results.append({"method": method, "kind": "lora", "oom": True})
            optimizer.zero_grad(set_to_none=True)
            continue
        peak = torch.cuda.max_memory_allocated() if cuda else None
        times = []
        for _ in range(steps):
            sync()
            t0 = time.perf_counter()
            step(model, batch, optimizer)
            sync()
            times.append(time.perf_counter() - t0)
        results.append({"method": method, "kind": "lora", "loss_value": value, "peak_allocated_bytes": peak,
                        "weights_and_adapters_bytes": weights, "within_32GB": cuda and peak <= 32 * 2**30,
                        "step_s_median": statistics.median(times), "step_s_best": min(times),
                        **trainable_numbers(model)})
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real", action="store_true", help="CUDA: real shapes, random bf16 weights, LoRA")
    p.add_argument("--text-tokens", type=int, default=256, help="text tokens of the row (besides the image)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (after the measured one)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--methods", default="ours,reference", help="--real: which methods to run, in order")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "method,kind": one CPU variant
    args = p.parse_args()
    if args.worker:
        method, kind = args.worker.split(",")
        print(json.dumps(run_variant_cpu(method, kind, args.text_tokens, args.steps, args.lora_rank)))
        return 0
    if args.real:
        if not torch.cuda.is_available():
            print("--real needs a CUDA GPU", file=sys.stderr)
            return 2
        results = run_real(args.text_tokens, args.steps, args.lora_rank, args.methods.split(","))
        print(f"One LoRA step (rank {args.lora_rank}, decoder) of GLM-4V-9B shapes, random bf16 weights, "
              f"1120 px image + {args.text_tokens} text tokens, {torch.cuda.get_device_name()}")
        print(f"{'method':<10} {'peak GB':>9} {'within 32 GB':>13} {'step s':>8} {'loss':>8}")
        for r in results:
            if r.get("oom"):
                print(f"{r['method']:<10} {'OOM':>9}")
                continue
            print(f"{r['method']:<10} {r['peak_allocated_bytes'] / GB:9.2f} {str(r['within_32GB']):>13} "
                  f"{r['step_s_median']:8.3f} {r['loss_value']:8.4f}")
        write_result("finetune_cuda", {"model": "GLM-4V-9B shapes, bf16 random weights, all blocks",
                                       "text_tokens": args.text_tokens, "image_px": 1120, "lora_rank": args.lora_rank,
                                       "memory_metric": "peak_allocated_bytes (weights included)",
                                       "variants": results})
        return 0
    results = []
    for method, kind in VARIANTS:  # a fresh process each: peaks do not leak between variants
        cmd = [sys.executable, __file__, "--worker", f"{method},{kind}", "--text-tokens", str(args.text_tokens),
               "--steps", str(args.steps), "--lora-rank", str(args.lora_rank)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"Fine-tuning step (narrow fixture, fp32, CPU; 1 row: image + {args.text_tokens} text tokens), "
          "forward + backward + AdamW. Shared machine: step times are noisy.")
    print(f"{'kind':<6} {'method':<10} {'trainable':>10} {'peak mem MB':>12} {'step ms':>9} {'loss':>8}")
    for r in results:
        print(f"{r['kind']:<6} {r['method']:<10} {r['trainable_params']:>10} {r['peak_rss_growth_bytes'] / 1e6:12.1f} "
              f"{r['step_s_median'] * 1e3:9.1f} {r['loss_value']:8.4f}")
    write_result("finetune_cpu", {"model": "narrow fixture, fp32", "rows": 1, "text_tokens": args.text_tokens,
                                  "lora_rank": args.lora_rank, "steps": args.steps,
                                  "memory_metric": "peak_rss_growth_bytes (first step)",
                                  "note": "shared 2-core machine: step times are noisy", "variants": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
