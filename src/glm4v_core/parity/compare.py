"""Stage comparison (max-abs, max-rel, argmax agreement) and the tolerances of fp32 and bf16 runs.

fp32: max-abs <= 1e-4 (+ 1e-4 relative to the stage's scale for the large vision activations).
bf16: max-abs vs the fp32 reference <= 2x the reference's own bf16-vs-fp32 error, and the same
argmax wherever the fp32 top-2 margin exceeds that error.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from glm4v_core.parity.reference import ReferenceFileError

FP32_ATOL = 1e-4


@dataclass
class Stage:
    name: str
    shape: list[int]
    max_abs: float
    max_rel: float          # max-abs / max |reference|
    tol: float | None       # None: shown for bisecting, not judged
    ok: bool
    argmax_agree: float | None = None  # fraction of compared rows with the reference's argmax
    note: str = ""


@dataclass
class CaseReport:
    name: str
    desc: str
    stages: list[Stage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.stages)

    @property
    def logits_max_abs(self) -> float:
        return next(s.max_abs for s in self.stages if s.name == "logits")


def compare(name: str, ours: torch.Tensor, ref: torch.Tensor, tol: float | None,
            rows: torch.Tensor | None = None, argmax_margin: float | None = None) -> Stage:
    """Max-abs/max-rel of ours vs ref over the selected rows (rows: bool mask over leading dims)."""
    ours, ref = ours.detach().float().cpu(), ref.float()
    if ours.shape != ref.shape:
        return Stage(name, list(ours.shape), float("inf"), float("inf"), tol, False)
    a, b = (ours[rows], ref[rows]) if rows is not None else (ours, ref)
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    ok = tol is None or diff <= tol
    agree = None
    if argmax_margin is not None:  # the argmax must agree wherever the reference's top-2 margin is clear
        top2 = b.topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1]) > argmax_margin
        same = a.argmax(-1) == b.argmax(-1)
        agree = same.float().mean().item()
        ok = ok and bool(same[clear].all())
    return Stage(name, list(ours.shape), diff, diff / scale if scale else diff, tol, ok, agree)


def exact(name: str, ours: torch.Tensor, ref: torch.Tensor) -> Stage:
    """Integer stages (position ids, masks, tokens) must match exactly."""
    ours = ours.detach().cpu()
    same = ours.shape == ref.shape and torch.equal(ours.to(ref.dtype), ref)
    diff = 0.0 if same else float("inf") if ours.shape != ref.shape else (ours - ref).abs().max().item()
    return Stage(name, list(ours.shape), diff, diff, 0.0, same)


class Tolerances:
    """fp32: fixed. bf16: 2x the reference's own bf16-vs-fp32 error, recorded in the fixture;
    argmax must agree wherever the fp32 top-2 margin exceeds that error (1x).

    The recorded errors are `bf16_vs_fp32_logits_<case>_maxabs` (and `bf16_vs_fp32_image_embeds_<case>_maxabs`
    when the reference has images) for one of its cases, case `a` first."""

    def __init__(self, meta: dict, dtype: torch.dtype, images: bool = True):
        self.bf16 = dtype == torch.bfloat16
        if not self.bf16:
            self.logits = self.image = self.margin = FP32_ATOL
            return
        observed = meta.get("tolerances_observed", {})
        logits = recorded_error(observed, "logits")
        image = recorded_error(observed, "image_embeds") if images else None
        if logits is None or (images and image is None):
            wanted = "bf16_vs_fp32_logits_<case>_maxabs" + (" / bf16_vs_fp32_image_embeds_<case>_maxabs"
                                                             if images else "")
            raise ReferenceFileError(f"a bf16 run needs the reference's own bf16 error: reference.json lacks "
                                     f"tolerances_observed.{wanted}")
        self.margin = logits
        self.logits, self.image = 2 * logits, None if image is None else 2 * image

    def hidden(self) -> float | None:
        """Decoder hidden states: fp32 max-abs 1e-4; in bf16 shown only (no reference bound)."""
        return None if self.bf16 else FP32_ATOL

    def vision(self, ref: torch.Tensor) -> float | None:
        """ViT activations reach ~10: fp32 1e-4 relative to their scale plus 1e-4; bf16 shown only."""
        return None if self.bf16 else FP32_ATOL * (1 + ref.abs().max().item())


def recorded_error(observed: dict, stage: str) -> float | None:
    """The reference's own bf16-vs-fp32 max-abs error of `stage`, from its case `a` if recorded, else
    from the first case that has one."""
    prefix = f"bf16_vs_fp32_{stage}_"
    keys = sorted(k for k in observed if k.startswith(prefix) and k.endswith("_maxabs"))
    keys.sort(key=lambda k: k != f"{prefix}a_maxabs")
    return observed[keys[0]] if keys else None
