"""Training step benchmark: peak memory and step time with and without the chunked loss and
activation checkpointing, plus the planned memory of one LoRA step of the real 9B.

A step = forward with labels, backward, one plain SGD update (stateless, lr 0, so only what the two
switches change is measured). Four variants: loss "plain" (fp32 logits of the whole sequence,
GLM4V.loss_chunk_size = None) or "chunked" (the default), checkpointing off or on.

CPU (default without CUDA): the narrow fixture's weights, fp32, a batch of image + text rows
(case a's image and prompt, then random answer tokens up to --text-tokens, all learned). Each
variant runs in a fresh process; memory = growth of the process's peak RSS during its first
step (Linux VmHWM, reset just before; approximate: the allocator's reuse blurs it), and the bytes
autograd keeps for backward (exact).
CUDA: the real model's shapes (1120 px image + --text-tokens text tokens) in bf16 with random
weights and --layers decoder / --vision-layers ViT blocks (the full 40 + 63 do not fit one GPU
for full fine-tuning); memory = torch.cuda.max_memory_allocated during the step.

Then prints the memory planner's peak of one LoRA step of the real 9B (glm4v_core.training.memory: the
model built without weights from tests/fixtures/real_manifest.json, one real step on fake tensors) for
each variant (--no-plan: skip it), and writes JSON to benchmarks/results/.

    python benchmarks/train.py                  # CPU, narrow fixture
    python benchmarks/train.py --device cuda    # real shapes, few layers
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

from glm4v_core import GLM4V, GLM4VConfig, load_model  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
MANIFEST = FIXTURES / "real_manifest.json"
VARIANTS = [("plain", False), ("chunked", False), ("plain", True), ("chunked", True)]
GB = 1e9


# --- one training step -------------------------------------------------------------------------

def cpu_model_and_batch(rows: int, text_tokens: int) -> tuple[GLM4V, dict]:
    """Narrow fixture, fp32: case a's image and prompt, then random answer tokens (all learned)."""
    model = load_model(FIXTURES / "narrow").requires_grad_(True).train()
    grads = load_file(str(FIXTURES / "narrow" / "grads.safetensors"))
    pixels = load_file(str(FIXTURES / "narrow" / "reference.safetensors"))["pixel_values_a"]
    prompt = grads["input_ids_a"][0, :18]  # up to <|assistant|>: the labels of case a start after it
    return model, make_batch(model.config, prompt, pixels, rows, text_tokens)


def cuda_model_and_batch(rows: int, text_tokens: int, layers: int, vision_layers: int) -> tuple[GLM4V, dict]:
    """The real config with fewer blocks, random bf16 weights on CUDA, a 1120 px image per row."""
    raw = json.loads(MANIFEST.read_text())["config"]
    raw = {**raw, "num_layers": layers, "vision_config": {**raw["vision_config"], "num_hidden_layers": vision_layers}}
    config = GLM4VConfig.from_hf(raw)
    model = GLM4V.from_config(config, seed=0, dtype=torch.bfloat16, device="cuda")
    c = config
    prompt = torch.tensor([c.vocab_size - 221, c.vocab_size - 219, c.vocab_size - 216, 198,  # [gMASK] <sop> <|user|> \n
                           c.boi_token_id, c.pad_token_id, c.eoi_token_id, 3, 4, 5, c.vocab_size - 215])
    pixels = torch.randn(1, 3, c.vision.image_size, c.vision.image_size)
    return model, {k: v.cuda() for k, v in make_batch(c, prompt, pixels, rows, text_tokens).items()}


def make_batch(config: GLM4VConfig, prompt: torch.Tensor, pixels: torch.Tensor, rows: int, text_tokens: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    answer = torch.randint(0, config.vocab_size - 300, (rows, text_tokens - len(prompt)), generator=gen)
    input_ids = torch.cat([prompt.expand(rows, -1), answer], 1)
    labels = torch.cat([torch.full((rows, len(prompt)), -100), answer], 1)
    return {"input_ids": input_ids, "pixel_values": pixels.expand(rows, -1, -1, -1).contiguous(), "labels": labels}


def train_step(model: GLM4V, batch: dict, optimizer: torch.optim.Optimizer) -> tuple[float, int]:
    """One step; returns (loss, bytes autograd kept for backward)."""
    kept = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal kept
        kept += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(batch["input_ids"], batch["pixel_values"], labels=batch["labels"]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), kept


def configure(model: GLM4V, loss: str, checkpointing: bool) -> None:
    model.loss_chunk_size = None if loss == "plain" else GLM4V.loss_chunk_size
    model.gradient_checkpointing(checkpointing)


def run_variant_cpu(loss: str, checkpointing: bool, rows: int, text_tokens: int, steps: int) -> dict:
    model, batch = cpu_model_and_batch(rows, text_tokens)
    configure(model, loss, checkpointing)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the update runs; lr 0 keeps the weights
    (value, kept), peak, reset, times = first_step_peak_then_times(lambda: train_step(model, batch, optimizer), steps)
    return {"loss": loss, "checkpointing": checkpointing, "loss_value": value, "peak_rss_growth_bytes": peak,
            "hwm_reset": reset, "saved_for_backward_bytes": kept, "step_s_median": statistics.median(times),
            "step_s_best": min(times)}


def run_variants_cuda(rows: int, text_tokens: int, steps: int, layers: int, vision_layers: int) -> list[dict]:
    model, batch = cuda_model_and_batch(rows, text_tokens, layers, vision_layers)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the update runs; lr 0 keeps the weights
    results = []
    for loss, checkpointing in VARIANTS:
        configure(model, loss, checkpointing)
        train_step(model, batch, optimizer)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        value, kept = train_step(model, batch, optimizer)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            train_step(model, batch, optimizer)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        results.append({"loss": loss, "checkpointing": checkpointing, "loss_value": value,
                        "peak_allocated_growth_bytes": peak, "weights_bytes": base, "saved_for_backward_bytes": kept,
                        "step_s_median": statistics.median(times), "step_s_best": min(times)})
    return results


def first_step_peak_then_times(run, steps: int) -> tuple[object, int, bool, list[float]]:
    """(first result, peak RSS growth of the first call, whether the high-water mark was reset, seconds
    of each of `steps` further calls): later steps reuse memory the allocator kept, hiding the peak."""
    reset = reset_peak_rss()
    base = peak_rss()
    value = run()
    peak = peak_rss() - base
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return value, peak, reset, times


def peak_rss() -> int:
    """This process's peak RSS in bytes (Linux VmHWM)."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


def reset_peak_rss() -> bool:
    """Writing 5 to clear_refs resets VmHWM to the current RSS (Linux); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --- the LoRA budget of the real model: planned ----------------------------------------------------

def planned_budget(config: Path, rank: int, text_tokens: int) -> list[dict]:
    """The memory planner's peak of one LoRA step (glm4v finetune's: AdamW, rank `rank` on every decoder
    linear, vision frozen) for each variant, on CUDA, of the model `config` describes (no weights read)."""
    from glm4v_core.training.memory_plan import TrainingRequest, plan_training
    rows = []
    for loss, checkpointing in VARIANTS:
        plan = plan_training(TrainingRequest(checkpoint=config, lora_rank=rank, text_tokens=text_tokens,
                                             gradient_checkpointing=checkpointing, chunked_loss=loss == "chunked"))
        rows.append({"loss": loss, "checkpointing": checkpointing, "peak_bytes": plan.peak_bytes,
                     "components": plan.components, "phases": plan.phases})
    return rows


def print_budget(rank: int, text_tokens: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps(json.loads(MANIFEST.read_text())["config"]))
        rows = planned_budget(config, rank, text_tokens)
    print(f"\nPlanned peak of one LoRA step of the real glm-4v-9b (glm4v_core.training.memory, on CUDA, its context "
          f"included): 1120 px image + {text_tokens} text tokens, batch 1, rank {rank} on every decoder linear, bf16 "
          "base frozen, AdamW")
    print(f"{'checkpointing':<14} {'loss':<8} {'weights':>8} {'trained':>8} {'kept':>8} {'recomp':>8} {'loss':>8} "
          f"{'total GiB':>9}")
    for r in rows:
        c = {k: v / 2**30 for k, v in r["components"].items()}
        print(f"{'on' if r['checkpointing'] else 'off':<14} {r['loss']:<8} {c['weights']:8.2f} "
              f"{c['trained_and_optimizer']:8.2f} {c['activations_kept']:8.2f} {c['recomputed_layer']:8.2f} "
              f"{c['loss']:8.2f} {r['peak_bytes'] / 2**30:9.2f}")
    return rows


# --- driver ----------------------------------------------------------------------------------------

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", type=int, default=None, help="batch rows (CPU default 2, CUDA 1)")
    p.add_argument("--text-tokens", type=int, default=None, help="text tokens per row (CPU default 512, CUDA 256)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    p.add_argument("--layers", type=int, default=2, help="CUDA: decoder blocks")
    p.add_argument("--vision-layers", type=int, default=2, help="CUDA: ViT blocks")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--no-plan", action="store_true", help="skip the planned 9B budget")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "loss,checkpointing": one CPU variant
    args = p.parse_args()
    cuda = args.device == "cuda"
    rows = args.rows or (1 if cuda else 2)
    text_tokens = args.text_tokens or (256 if cuda else 512)
    if args.worker:
        loss, ckpt = args.worker.split(",")
        print(json.dumps(run_variant_cpu(loss, ckpt == "1", rows, text_tokens, args.steps)))
        return 0
    if cuda:
        results = run_variants_cuda(rows, text_tokens, args.steps, args.layers, args.vision_layers)
        shape = {"model": f"real shapes, {args.layers} decoder + {args.vision_layers} ViT blocks, bf16, random weights"}
    else:
        results = []
        for loss, checkpointing in VARIANTS:  # a fresh process each: peaks do not leak between variants
            cmd = [sys.executable, __file__, "--worker", f"{loss},{int(checkpointing)}", "--rows", str(rows),
                   "--text-tokens", str(text_tokens), "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        shape = {"model": "narrow fixture, fp32"}
    mem_key = "peak_allocated_growth_bytes" if cuda else "peak_rss_growth_bytes"
    print(f"Training step ({shape['model']}; {rows} row(s) x {text_tokens} text tokens + image), "
          f"forward + backward + SGD update")
    print(f"{'loss':<8} {'checkpointing':<14} {'peak mem MB':>12} {'kept for bwd MB':>16} {'step ms':>9} {'loss':>8}")
    for r in results:
        print(f"{r['loss']:<8} {'on' if r['checkpointing'] else 'off':<14} {r[mem_key] / 1e6:12.1f} "
              f"{r['saved_for_backward_bytes'] / 1e6:16.1f} {r['step_s_median'] * 1e3:9.1f} {r['loss_value']:8.4f}")
    budget = None if args.no_plan else print_budget(args.lora_rank, 256)
    name = "train_cuda" if cuda else "train_cpu"
    write_result(name, {**shape, "rows": rows, "text_tokens": text_tokens, "steps": args.steps,
                        "memory_metric": mem_key, "variants": results,
                        "lora_budget_9b": {"image_px": 1120, "text_tokens": 256, "rank": args.lora_rank,
                                           "rows": budget}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
