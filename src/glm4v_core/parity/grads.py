"""Gradient parity: the loss and every parameter gradient against CHECKPOINT/grads.safetensors.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from glm4v_core.checkpoint import load_model
from glm4v_core.model.glm4v import GLM4V
from glm4v_core.parity.exact_kernels import reference_kernels
from glm4v_core.transforms.dtensor import whole

GRAD_LOSS_ATOL = 1e-5


GRAD_REL_TOL = 1e-4


@dataclass
class GradCaseReport:
    name: str
    desc: str
    loss: float
    loss_abs_err: float
    grad_max_rel_err: float  # worst parameter: max |ours - ref| / max |ref| (or the norm/max-abs error)
    worst_param: str         # its HF name
    compared: str            # "full tensors" or "L2 norm + max-abs"
    ok: bool


def grad_error(ours: torch.Tensor | None, ref: torch.Tensor | None, norm: float, maxabs: float) -> float:
    """Relative error of one parameter's gradient: against the full reference tensor when stored,
    else against its recorded L2 norm and max-abs. A missing gradient counts as zeros."""
    if ours is None:
        ours = torch.zeros(()) if ref is None else torch.zeros_like(ref)
    ours = ours.detach().float().cpu()
    if ref is not None:
        diff = (ours - ref).abs().max().item()
        return diff / maxabs if maxabs else diff
    errors = [abs(ours.norm().item() - norm), abs(ours.abs().max().item() - maxabs)]
    return max(e / s if s else e for e, s in zip(errors, (norm, maxabs), strict=True))


def run_grad_case(model: GLM4V, grads: dict[str, torch.Tensor], pixels: dict[str, torch.Tensor],
                  meta: dict, case: str) -> GradCaseReport:
    """One supervised sample: loss and every parameter's gradient vs the reference's."""
    from glm4v_conversion.names import native_to_hf
    info = grad_cases(meta, grads)[case]
    device = model.device
    take = lambda name: grads[f"{name}_{case}"].to(device)  # noqa: E731
    pixel_values = pixels[info["image"]].to(device) if info.get("image") else None
    model.zero_grad(set_to_none=True)
    out = model(take("input_ids"), pixel_values, take("attention_mask"), take("position_ids"), labels=take("labels"))
    out.loss.backward()
    without = set(info.get("params_without_grad", []))
    worst, worst_name, full = 0.0, "", False
    for name, p in model.named_parameters():
        hf = native_to_hf(name)
        ref = grads.get(f"grad_{case}.{hf}")
        full = full or ref is not None
        if hf in without:
            err = grad_error(whole(p.grad), torch.zeros(p.shape), 0.0, 0.0)
        else:
            err = grad_error(whole(p.grad), ref, info["grad_norm"][hf], info["grad_maxabs"][hf])
        if err >= worst:
            worst, worst_name = err, hf
    model.zero_grad(set_to_none=True)
    loss_err = abs(out.loss.item() - info["loss"])
    return GradCaseReport(case, info.get("desc", ""), out.loss.item(), loss_err, worst, worst_name,
                          "full tensors" if full else "L2 norm + max-abs",
                          loss_err <= GRAD_LOSS_ATOL and worst <= GRAD_REL_TOL)


def run_grad_parity(checkpoint: str | Path, device: str = "cpu", fsdp: bool = False) -> list[GradCaseReport]:
    """Every case of CHECKPOINT/grads.safetensors; images come from reference.safetensors.
    fsdp: run as one rank of an FSDP2 group; every rank computes the same case (the averaged
    gradient must then equal the one-process gradient)."""
    checkpoint = Path(checkpoint)
    path, pixels_path = checkpoint / "grads.safetensors", checkpoint / "reference.safetensors"
    for needed in (path, path.with_suffix(".json"), pixels_path):
        if not needed.exists():
            raise FileNotFoundError(f"gradient reference file {needed} not found")
    grads, pixels = load_file(str(path)), load_file(str(pixels_path))
    meta = json.loads(path.with_suffix(".json").read_text())
    model = load_model(checkpoint, dtype=torch.float32, device=device).requires_grad_(True)
    if fsdp:
        from glm4v_core.transforms import distributed  # lazy: see glm4v_core.transforms
        model = distributed.fsdp(model, distributed.mesh(torch.device(device)))
    with reference_kernels(torch.float32):
        return [run_grad_case(model, grads, pixels, meta, case) for case in sorted(grad_cases(meta, grads))]


def grad_cases(meta: dict, grads: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Case name -> its record (desc, image, loss, grad_norm, grad_maxabs, params_without_grad).

    grads.json lists them under `cases`; a one-case recording (the text fixtures) keeps that case's
    record at the top level instead, with its loss as `loss_<case>` (the case named by grads.safetensors)."""
    if "cases" in meta:
        return meta["cases"]
    names = [k[len("loss_"):] for k in grads if k.startswith("loss_")]
    return {name: {"desc": meta.get("case", ""), "loss": meta[f"loss_{name}"], "grad_norm": meta["grad_norm"],
                   "grad_maxabs": meta["grad_maxabs"]} for name in names}


