"""Training step benchmark: peak memory and step time with and without the chunked loss and
activation checkpointing, plus the computed memory budget of one LoRA step of the real 9B.

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

Then prints the LoRA budget of the real 9B (weights, adapters + grads + AdamW, activations,
logits) from tests/fixtures/real_manifest.json, and writes JSON to benchmarks/results/.

    python benchmarks/train.py                  # CPU, narrow fixture
    python benchmarks/train.py --device cuda    # real shapes, few layers
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
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


# --- the LoRA budget of the real model -----------------------------------------------------------

@dataclasses.dataclass
class Budget:
    weights: float          # frozen bf16 base weights
    adapters: float         # LoRA A and B (fp32), their grads (fp32) and AdamW's two moments (fp32)
    activations: float      # what the decoder keeps for backward (vision frozen: kept nothing)
    vision_working: float   # one ViT block's working set (run without a graph)
    logits: float           # loss: plain (full fp32 logits + their grad) or chunked

    @property
    def total(self) -> float:
        return self.weights + self.adapters + self.activations + max(self.vision_working, self.logits)


def lora_budget(rank: int, text_tokens: int, checkpointing: bool, chunked: bool, counted: int) -> Budget:
    """Bytes of one LoRA step of the real glm-4v-9b at 1120 px: LoRA of `rank` on every decoder
    linear (qkv, dense, dense_h_to_4h, dense_4h_to_h), the vision tower and everything else frozen,
    bf16 activations, attention by a flash kernel (keeps out + log-sum-exp, no score matrix)."""
    manifest = json.loads(MANIFEST.read_text())
    config = GLM4VConfig.from_hf(manifest["config"])
    c, v = config, config.vision
    bf16, fp32 = 2, 4
    weights = manifest["total_parameters"] * bf16
    adapted = [shape for name, (shape, _) in manifest["parameters"].items()
               if name.startswith("transformer.encoder.layers.") and name.endswith(".weight") and len(shape) == 2]
    lora_params = sum(rank * (rows + cols) for rows, cols in adapted)
    adapters = lora_params * (fp32 + fp32 + 2 * fp32)
    T = text_tokens + v.num_image_tokens + 2 - 3  # 1602 image rows replace the 3 placeholder tokens
    H, ffn, nq = c.hidden_size, c.ffn_hidden_size, c.num_heads * c.head_dim
    # kept per token per decoder layer (elements): block input, attn-norm out (qkv and LoRA input),
    # q/k/v after rotary, attention out (+ its reshaped copy: dense's input), residual and mlp-norm
    # out, gate and up (silu's and the product's inputs), silu(gate), the product (down's input)
    per_token_layer = 2 * H + c.qkv_size + 2 * nq + 2 * H + 2 * ffn + ffn + ffn
    per_token_layer += 4 * rank  # the LoRA A outputs
    full = T * per_token_layer * bf16
    activations = (c.num_layers * T * H * bf16 + full) if checkpointing else c.num_layers * full
    L = v.grid ** 2 + 1
    vision_working = L * (3 * v.hidden_size + 2 * v.intermediate_size) * bf16
    logits = (counted * min(8192, c.vocab_size) * fp32 + counted * H * bf16) if chunked else \
        T * c.vocab_size * (bf16 + fp32 + fp32)
    return Budget(weights, adapters, activations, vision_working, logits)


def print_budget(rank: int, text_tokens: int) -> list[dict]:
    rows = []
    print(f"\nMemory budget of one LoRA step of the real glm-4v-9b: 1120 px image + {text_tokens} text tokens, "
          f"batch 1, LoRA rank {rank} on every decoder linear, bf16 base frozen, AdamW, flash attention")
    print(f"{'checkpointing':<14} {'loss':<8} {'weights':>8} {'adapters':>9} {'activations':>12} "
          f"{'vision blk':>10} {'logits':>8} {'total GB':>9}")
    for loss, checkpointing in VARIANTS:
        b = lora_budget(rank, text_tokens, checkpointing, loss == "chunked", counted=text_tokens)
        print(f"{'on' if checkpointing else 'off':<14} {loss:<8} {b.weights / GB:8.2f} {b.adapters / GB:9.3f} "
              f"{b.activations / GB:12.2f} {b.vision_working / GB:10.2f} {b.logits / GB:8.3f} {b.total / GB:9.2f}")
        rows.append({"loss": loss, "checkpointing": checkpointing, **dataclasses.asdict(b), "total": b.total})
    print("(vision blk and logits never coexist: the peak takes the larger; add ~1-2 GB of CUDA context and "
          "allocator slack. Full fine-tuning would add 13.9e9 x (2 grad + 8 AdamW + 4 fp32 master) bytes.)")
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
    budget = print_budget(args.lora_rank, 256)
    name = "train_cuda" if cuda else "train_cpu"
    write_result(name, {**shape, "rows": rows, "text_tokens": text_tokens, "steps": args.steps,
                        "memory_metric": mem_key, "variants": results,
                        "lora_budget_9b": {"image_px": 1120, "text_tokens": 256, "rank": args.lora_rank,
                                           "rows": budget}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
