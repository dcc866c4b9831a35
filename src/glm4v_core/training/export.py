"""What a fine-tuning run leaves at the end (adapters, a merged or full model), a quantized base
merged into a dequantized model, and how many bytes a run will write (checked before training).

QLoRA --save-merged: requantizing the merged weight (QuantLinear.merge_delta) would round the
trained update away into the int4 / int8 grid, so merged/ is a float checkpoint instead: each
adapted layer's weight is dequantize(W) + scale * B A, summed in fp32, stored in the dtype the base
was quantized from (glm4v_native.json's `dtype`; bfloat16 if it says none). The layers without an
adapter are dequantized alike, so merged/ loads and converts like any float checkpoint.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from glm4v_core.checkpoint import DTYPES, save_model
from glm4v_core.model import ops
from glm4v_core.model.glm4v import GLM4V
from glm4v_core.training.state import plot_loss
from glm4v_core.transforms import adapter_files, lora
from glm4v_core.transforms.dtensor import whole
from glm4v_core.transforms.quant import quantized_linears

PROVENANCE = "glm4v_native.json"  # a native folder's record; a quantized one says its float dtype there


def base_provenance(checkpoint) -> dict:
    """glm4v_native.json of the base folder ({} for an HF folder); load_model has checked it."""
    try:
        record = json.loads((checkpoint / PROVENANCE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def merged_dtype(model: nn.Module, provenance: dict) -> torch.dtype | None:
    """The stored dtype of merged/: None (the model's own) unless the base is quantized."""
    if not quantized_linears(model):
        return None
    return DTYPES.get(str(provenance.get("dtype")), torch.bfloat16)


@torch.no_grad()
def merge_dequantized(model: GLM4V, dtype: torch.dtype) -> GLM4V:
    """Replace every quantized layer, with its adapter if it has one, by a dense Linear holding
    dequantize(W) (+ the adapter's update, in fp32) in `dtype`; then remove the other adapters
    (merged). In place; returns the model, ready for save_model(dtype=dtype)."""
    adapters = lora.adapters_of(model)
    for name, base in quantized_linears(model).items():
        name = name.removesuffix(".base") if name.removesuffix(".base") in adapters else name
        weight = base.dequantized_weight(torch.float32)
        if name in adapters and not adapters[name].merged:
            weight = weight + adapters[name].delta_weight().to(weight.device)
        dense = ops.Linear(base.in_features, base.out_features, base.bias is not None, device="meta",
                           parts=base.parts)
        dense.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if base.bias is not None:
            dense.bias = nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, dense)  # the adapter goes with it
    return lora.remove_lora(model)


def model_bytes(model: nn.Module, dtype: torch.dtype | None) -> int:
    """Bytes of the model as save_model stores it: every tensor of its state, adapters merged away,
    a quantized layer as its dense (out, in) weight; in `dtype` (None: each tensor's own)."""
    quantized = {f"{name}.": q for name, q in quantized_linears(model).items()}
    total = 0
    for name, t in model.state_dict().items():
        if name.endswith((".lora_A", ".lora_B")) or any(name.startswith(p) and not name.endswith(".bias")
                                                         for p in quantized):
            continue
        total += t.numel() * (dtype or t.dtype).itemsize
    size = (dtype or torch.float32).itemsize
    return total + sum(q.in_features * q.out_features * size for q in quantized.values())


def saves_ahead(start: int, total: int, save_every: int) -> int:
    """Checkpoints a run from step `start` to `total` writes: every --save-every step before the
    end, and the final one."""
    periodic = len(range(save_every * (start // save_every + 1), total, save_every)) if save_every else 0
    return periodic + 1


def planned_bytes(trainer) -> tuple[int, str]:
    """(bytes, what they are) the run will write into OUT from the trainer's current step on: its
    checkpoints (trained tensors + AdamW's two moments, counted as fp32, + RNG states and headers;
    with --keep-last N at most N + 1 at once: the newest is complete before the oldest goes), the
    final adapters, merged/ or model/, the log and the plot."""
    a = trainer.options
    params = list(trainer.params.values())
    trained = sum(p.numel() * (4 if a.lora_rank > 0 else p.element_size()) for p in params)  # adapters: fp32
    headers = 300 * 4 * len(params) + (1 << 16)  # safetensors headers and trainer.json: ~300 B per entry
    rng = torch.get_rng_state().numel() * (2 if trainer.device.type == "cuda" else 1)
    checkpoint = trained + 2 * 4 * sum(p.numel() for p in params) + rng + headers
    count = saves_ahead(trainer.step, trainer.total_steps, a.save_every)
    if a.keep_last is not None:
        count = min(count, a.keep_last + 1)
    needed, parts = count * checkpoint, [f"{count} checkpoint(s) of {checkpoint}"]
    if a.lora_rank > 0:  # PEFT: a fused layer's B is block-diagonal, up to 3x its per-part B
        needed += trained * (3 if getattr(a, "adapter_format", "glm4v") == "peft" else 1) + headers
        parts.append("the adapters")
    if a.lora_rank == 0 or a.save_merged:
        needed += model_bytes(trainer.model, merged_dtype(trainer.model, trainer.provenance))
        parts.append("merged/" if a.lora_rank > 0 else "model/")
    needed += (1 << 18) + 300 * trainer.total_steps  # loss.jsonl and loss.png
    return math.ceil(needed), ", ".join(parts) + ", the log and the plot"


def final_files(trainer) -> list[Path]:
    """Write the run's final files (every rank takes part: gathering FSDP shards is a collective;
    rank 0 writes): the adapters, merged/ (LoRA with --save-merged) or model/ (a full fine-tune),
    the plot. Returns the paths written."""
    a, rank0 = trainer.options, trainer.rank0
    written = []
    if a.lora_rank > 0:
        adapters = trainer.trained_state()
        if rank0 and getattr(a, "adapter_format", "glm4v") == "peft":  # OUT/adapter/, what peft and vLLM load
            written.append(adapter_files.save_adapters(trainer.model, a.out / adapter_files.PEFT_FOLDER,
                                                       tensors=adapters, format="peft",
                                                       base_model_name_or_path=str(trainer.checkpoint)))
        elif rank0:
            written.append(adapter_files.save_adapters(trainer.model, a.out / "adapter.safetensors", tensors=adapters))
    if a.lora_rank == 0 or a.save_merged:
        model = whole_model(trainer)
        if rank0 and a.lora_rank > 0:
            dtype = merged_dtype(model, trainer.provenance)  # a quantized base: dequantized first
            model = merge_dequantized(model, dtype) if dtype else lora.remove_lora(model)
            written.append(save_model(model, a.out / "merged", dtype=dtype, overwrite=True))
        elif rank0:
            written.append(save_model(model, a.out / "model", overwrite=True))
    if rank0:
        written.append(plot_loss(trainer.log_path, a.out / "loss.png"))
    trainer.barrier()
    return [p for p in written if p is not None]


def whole_model(trainer) -> GLM4V | None:
    """The trained model as one process holds it: the model itself, or under FSDP an unsharded
    copy built on rank 0 from the gathered state (None on the other ranks)."""
    if trainer.world == 1:
        return trainer.model
    state = {}
    for name, t in trainer.model.state_dict().items():
        t = whole(t)  # a collective: every rank gathers, rank 0 keeps
        if trainer.rank0:
            state[name] = t.cpu()
    if not trainer.rank0:
        return None
    model = trainer.build_model(shard=False)
    model.load_state_dict(state)
    return model
