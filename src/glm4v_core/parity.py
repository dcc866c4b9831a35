"""Logit parity against the HF reference: `python -m glm4v_core.parity` (also `glm4v parity`).

Runs every case stored in a reference file (see tests/fixtures/*/reference.json), prints a
per-stage table (vision stages, image embeddings, position ids, each decoder layer, final norm,
logits, greedy tokens) so that a failure points at the first stage that drifts, and exits 0 only
if every case passes.

Quantized checkpoints (`glm4v-convert --quantize`) are judged on the logits only, by their own
budgets (see `QuantBudget`); the per-layer stages are then shown for bisecting.

Tolerances (docs/architecture.md, numerics): fp32: max-abs <= 1e-4 (+ 1e-4 relative to the stage's scale for the
large vision activations). bf16: max-abs vs the fp32 reference <= 2x the reference's own
bf16-vs-fp32 error, and the same argmax wherever the fp32 top-2 margin exceeds that error.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from glm4v_conversion import __version__
from glm4v_conversion.files import check_folder, parse_json, read_text
from glm4v_conversion.safetensors_io import MappedFiles, read_header
from glm4v_conversion.streams import quiet_broken_pipe

from . import parity_report
from .config import GLM4VConfig
from .generate import generate
from .model import GLM4V
from .weights import BUNDLED_CHECKPOINT, check_device, load_model

FP32_ATOL = 1e-4
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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


def case_inputs(ref: dict[str, torch.Tensor], case: str) -> dict[str, torch.Tensor | None]:
    """The reference's inputs for one case: ids, optional pixels, padding mask and positions."""
    mask = ref.get(f"attention_mask_{case}")
    positions = ref.get(f"position_ids_in_{case}")
    if positions is None and mask is not None and f"pixel_values_{case}" not in ref:
        positions = ref.get(f"position_ids_{case}")  # text-only padded batch: inputs = outputs
    return {"input_ids": ref[f"input_ids_{case}"], "pixel_values": ref.get(f"pixel_values_{case}"),
            "attention_mask": mask, "position_ids": positions}


class Tolerances:
    """fp32: fixed. bf16: 2x the reference's own bf16-vs-fp32 error, recorded in the fixture;
    argmax must agree wherever the fp32 top-2 margin exceeds that error (1x)."""

    def __init__(self, meta: dict, dtype: torch.dtype):
        self.bf16 = dtype == torch.bfloat16
        if not self.bf16:
            self.logits = self.image = self.margin = FP32_ATOL
            return
        observed = meta.get("tolerances_observed", {})
        keys = ("bf16_vs_fp32_logits_a_maxabs", "bf16_vs_fp32_image_embeds_a_maxabs")
        if any(k not in observed for k in keys):
            raise ValueError(f"a bf16 run needs the reference's own bf16 error: reference.json lacks "
                             f"tolerances_observed.{keys[0]} / {keys[1]}")
        self.margin = observed[keys[0]]
        self.logits, self.image = 2 * observed[keys[0]], 2 * observed[keys[1]]

    def hidden(self) -> float | None:
        """Decoder hidden states: fp32 max-abs 1e-4; in bf16 shown only (no reference bound)."""
        return None if self.bf16 else FP32_ATOL

    def vision(self, ref: torch.Tensor) -> float | None:
        """ViT activations reach ~10: fp32 1e-4 relative to their scale plus 1e-4; bf16 shown only."""
        return None if self.bf16 else FP32_ATOL * (1 + ref.abs().max().item())


@torch.no_grad()
def run_case(model: GLM4V, ref: dict[str, torch.Tensor], meta: dict, case: str, tol: Tolerances) -> CaseReport:
    inputs = case_inputs(ref, case)
    device = model.text.embed.weight.device
    inputs = {k: (v.to(device) if v is not None else None) for k, v in inputs.items()}
    report = CaseReport(case, meta.get("inputs", {}).get(case, {}).get("desc", ""))
    stages = report.stages
    pixels = inputs["pixel_values"]
    if pixels is not None and f"vision_patch_embed_{case}" in ref:
        px = pixels.to(model.dtype)
        patch = model.vision.patch(px)
        vit = model.vision(px)
        conv = model.projector.downsample(vit)
        glu = model.projector.glu(conv.flatten(2).transpose(1, 2))
        for name, ours in (("vision.patch_embed", patch), ("vision.vit_out", vit),
                           ("vision.conv_out", conv), ("vision.glu_out", glu)):
            r = ref[f"{name.replace('.', '_')}_{case}"]
            stages.append(compare(name, ours, r, tol.vision(r)))
    out = model(**inputs, output_hidden_states=True)
    if out.image_embeds is not None and f"image_embeds_{case}" in ref:
        stages.append(compare("image_embeds", out.image_embeds, ref[f"image_embeds_{case}"], tol.image))
    if f"position_ids_{case}" in ref:
        stages.append(exact("position_ids", out.position_ids, ref[f"position_ids_{case}"]))
    rows = ref.get(f"attention_mask_expanded_{case}", ref.get(f"attention_mask_{case}"))
    if f"attention_mask_expanded_{case}" in ref and out.attention_mask is not None:
        stages.append(exact("attention_mask", out.attention_mask, rows))
    rows = rows.bool() if rows is not None else None
    if f"hidden_states_{case}" in ref:
        hs = ref[f"hidden_states_{case}"]  # (layers + 1, T, H), batch of one
        for i, ours in enumerate(out.hidden_states[:hs.shape[0]]):  # a recording may hold the first layers only
            name = "embeddings" if i == 0 else f"decoder.layer{i - 1}"
            stages.append(compare(name, ours[0], hs[i], tol.hidden()))
    if f"final_norm_out_{case}" in ref:
        r = ref[f"final_norm_out_{case}"]
        stages.append(compare("final_norm", model.text.final_norm(out.hidden_states[-1]), r, tol.hidden()))
    stages.append(compare("logits", out.logits, ref[f"logits_{case}"], tol.logits, rows, argmax_margin=tol.margin))
    if f"logits_{case}_bf16" in ref and model.dtype == torch.bfloat16:  # informational: bit-exact?
        stages.append(compare("logits vs reference bf16", out.logits, ref[f"logits_{case}_bf16"], None, rows))
    greedy = greedy_stage(model, inputs, ref, case, tol)
    if greedy is not None:
        stages.append(greedy)
    return report


def greedy_stage(model: GLM4V, inputs: dict, ref: dict[str, torch.Tensor], case: str, tol: Tolerances) -> Stage | None:
    """16 greedy tokens with stopping disabled must equal the reference's.

    bf16 only: a greedy step whose fp32 top-2 margin is below the bf16 error bound is a near-tie
    that bf16 rounding may break either way; diverging from the bf16 reference there passes if
    our tokens then equal the fp32 reference's greedy tokens (the other branch of the tie)."""
    bf16 = model.dtype == torch.bfloat16
    key = f"gen_tokens_{case}_bf16" if bf16 else f"gen_tokens_{case}"
    if key not in ref:
        return None
    want = ref[key]
    tokens = generate(model, **inputs, max_new_tokens=want.shape[1], stop_ids=[]).cpu()
    stage = exact("greedy_tokens", tokens, want)
    if stage.ok or not bf16 or tokens.shape != want.shape or f"gen_step_logits_{case}" not in ref:
        return stage
    differs = tokens != want
    first = int(differs.any(0).nonzero()[0])  # first step where any row differs
    rows = differs[:, first]  # the rows that diverge there
    top2 = ref[f"gen_step_logits_{case}"][rows, first].topk(2, dim=-1).values
    margin = (top2[..., 0] - top2[..., 1]).max().item()
    fp32_tokens = ref.get(f"gen_tokens_{case}")
    stage.ok = margin <= tol.margin and fp32_tokens is not None and torch.equal(tokens, fp32_tokens)
    stage.note = (f"differs from the bf16 reference from step {first}, fp32 top-2 margin there {margin:.4f} "
                  f"(near-tie bound {tol.margin:.3f}); {'equals' if stage.ok else 'does NOT equal'} the fp32 greedy tokens")
    return stage


def reference_cases(ref: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k[len("logits_"):] for k in ref if k.startswith("logits_") and not k.endswith("_bf16"))


def run_parity(checkpoint: str | Path, reference: str | Path | None = None,
               dtype: torch.dtype = torch.float32, device: str = "cpu",
               baseline: str | Path | None = None, tp: bool = False) -> list[CaseReport]:
    """tp: run as one rank of a tensor-parallel group (every rank of the group calls this)."""
    checkpoint = Path(checkpoint)
    ref_path = Path(reference) if reference else checkpoint / "reference.safetensors"
    meta_path = ref_path.with_suffix(".json")
    if not ref_path.exists():
        raise FileNotFoundError(f"reference file {ref_path} not found (pass --reference)")
    ref = load_file(str(ref_path))
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    record = quantization_of(checkpoint)
    if record is not None:
        return run_quantized_parity(checkpoint, ref, meta, record, dtype, device, baseline or ref_path.parent)
    tol = Tolerances(meta, torch.float32 if recorded_in_bf16(meta) else dtype)
    model = load_model(checkpoint, dtype=dtype, device=device)
    if tp:
        from . import distributed  # only here: torch.distributed.tensor takes seconds to import
        model = distributed.tensor_parallel(model, distributed.mesh(torch.device(device)))
    with reference_kernels(dtype):
        reports = [run_case(model, ref, meta, case, tol) for case in reference_cases(ref)]
    if recorded_in_bf16(meta):
        for report in reports:
            show_only(report)
    return reports


EXACT_STAGES = ("position_ids", "attention_mask")


def recorded_in_bf16(meta: dict) -> bool:
    """A `glm4v make-reference --dtype bfloat16` recording (the fixtures record fp32 plus `*_bf16` tensors)."""
    return meta.get("dtype") == "bfloat16"


def show_only(report: CaseReport) -> None:
    """A bf16 recording has no fp32 run to bound its own rounding error, so its float stages and
    greedy tokens are shown, not judged; position ids and masks must still match exactly."""
    for s in report.stages:
        if s.name not in EXACT_STAGES:
            verdict = "" if s.ok else " (would fail the fp32 bound)"
            s.tol, s.ok = None, True
            s.note = (s.note + "; " if s.note else "") + f"bf16 recording: shown, not judged{verdict}"


# -- several images per prompt (multi_image.safetensors beside the checkpoint) ---------------------

# Which of the file's 4 images each case takes, in reading order (its json's "images" fields).
MULTI_IMAGE_CASES = {"m1": [0, 1], "m2": [2, 3], "m3": [0, 1, 3]}


@torch.no_grad()
def run_multi_image_case(model: GLM4V, ref: dict[str, torch.Tensor], meta: dict, case: str) -> CaseReport:
    """fp32: spliced positions (and mask) exact, logits within 1e-4 where the spliced mask is 1,
    greedy tokens equal (the reference's continue at each row's largest position + 1)."""
    device = model.text.embed.weight.device
    inputs = {"input_ids": ref[f"input_ids_{case}"], "pixel_values": ref["pixel_values"][MULTI_IMAGE_CASES[case]],
              "attention_mask": ref.get(f"attention_mask_{case}"), "position_ids": ref.get(f"position_ids_in_{case}")}
    inputs = {k: (v.to(device) if v is not None else None) for k, v in inputs.items()}
    report = CaseReport(case, meta.get("cases", {}).get(case, {}).get("desc", ""))
    out = model(**inputs)
    report.stages.append(exact("position_ids", out.position_ids, ref[f"position_ids_{case}"]))
    rows = ref.get(f"attention_mask_spliced_{case}")
    if rows is not None:
        ours = out.attention_mask if out.attention_mask is not None else torch.ones_like(rows)
        report.stages.append(exact("attention_mask", ours, rows))
        rows = rows.bool()
    report.stages.append(compare("logits", out.logits, ref[f"logits_{case}"], FP32_ATOL, rows, argmax_margin=FP32_ATOL))
    if f"gen_tokens_{case}" in ref:
        want = ref[f"gen_tokens_{case}"]
        tokens = generate(model, **inputs, max_new_tokens=want.shape[1], stop_ids=[]).cpu()
        report.stages.append(exact("greedy_tokens", tokens, want))
    return report


def run_multi_image_parity(checkpoint: str | Path, reference: str | Path | None = None,
                           device: str = "cpu") -> list[CaseReport]:
    """The multi_image cases (fp32 only: the file holds fp32 outputs); [] when the file is absent."""
    path = Path(reference) if reference else Path(checkpoint) / "multi_image.safetensors"
    if not path.exists():
        return []
    ref = load_file(str(path))
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    model = load_model(checkpoint, dtype=torch.float32, device=device)
    with reference_kernels(torch.float32):
        return [run_multi_image_case(model, ref, meta, case) for case in MULTI_IMAGE_CASES if f"logits_{case}" in ref]


@contextlib.contextmanager
def reference_kernels(dtype: torch.dtype):
    """Use kernels as exact as the ones the fixtures were made with.

    fp32: no TF32 anywhere. On CUDA, cuDNN convolutions (the ViT patch embedding, the projector)
    default to TF32: rounding their inputs to TF32 (emulated on CPU) puts the patch embedding about
    1.4x over its fp32 tolerance. Matmuls may have been switched to TF32 by the caller. Both are
    turned off for the run, and restored after it.
    bf16: oneDNN's bf16 GEMMs (taken on AVX512-BF16/AMX CPUs) round differently from ATen's own
    bf16 kernels, which produced the fixtures; with oneDNN off our bf16 prompt logits equal the
    reference's bit for bit. The fixtures' decode steps also used ATen's AVX2 kernels: only with
    ATEN_CPU_CAPABILITY=avx2 (set before torch starts) do the narrow fixture's bf16 greedy tokens
    follow the reference through a 0.0046-margin near-tie (see greedy_stage)."""
    if dtype == torch.bfloat16:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about TF32 on Intel GPUs when flags change
            with torch.backends.mkldnn.flags(enabled=False):
                yield
        return
    settings = tf32_settings()
    saved = [getattr(owner, name) for owner, name, _ in settings]
    try:
        for owner, name, exact in settings:
            setattr(owner, name, exact)
        yield
    finally:
        for (owner, name, _), value in zip(settings, saved):
            setattr(owner, name, value)


def tf32_settings() -> list[tuple[object, str, object]]:
    """(owner, attribute, exact value) of the TF32 switches of cuDNN convolutions and CUDA matmuls.

    The per-op `fp32_precision` API where torch has it (2.9+): once a caller uses it, reading the
    legacy `allow_tf32` flags raises."""
    if hasattr(torch.backends.cudnn, "conv"):
        return [(torch.backends.cudnn.conv, "fp32_precision", "ieee"),
                (torch.backends.cuda.matmul, "fp32_precision", "ieee")]
    return [(torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False)]


def format_report(reports: list[CaseReport], dtype_name: str) -> str:
    lines = []
    for r in reports:
        lines.append(f"\ncase {r.name} ({r.desc or 'no description'}) [{dtype_name}]: {'PASS' if r.ok else 'FAIL'}")
        lines.append(f"  {'stage':<26} {'shape':<18} {'max_abs':>10} {'max_rel':>10} {'argmax':>7} {'tol':>9}  ok")
        for s in r.stages:
            agree = f"{s.argmax_agree:7.3f}" if s.argmax_agree is not None else f"{'':>7}"
            tol = f"{s.tol:9.2e}" if s.tol is not None else f"{'(info)':>9}"
            shape = "x".join(map(str, s.shape))
            lines.append(f"  {s.name:<26} {shape:<18} {s.max_abs:10.3e} {s.max_rel:10.3e} {agree} {tol}  "
                         f"{'ok' if s.ok else 'FAIL'}")
            if s.note:
                lines.append(f"    note: {s.note}")
        first_bad = next((s.name for s in r.stages if not s.ok), None)
        if first_bad:
            lines.append(f"  first stage that drifts: {first_bad}")
    ok = all(r.ok for r in reports)
    lines.append(f"\nparity {'PASSED' if ok else 'FAILED'}: {sum(r.ok for r in reports)}/{len(reports)} cases")
    return "\n".join(lines)


def to_json(reports: list[CaseReport], checkpoint: Path, dtype_name: str) -> dict:
    return {"ok": all(r.ok for r in reports), "checkpoint": str(checkpoint), "dtype": dtype_name,
            "cases": {r.name: {"ok": r.ok, "logits_max_abs": r.logits_max_abs,
                               "stages": [asdict(s) for s in r.stages]} for r in reports}}


# --- gradient parity (--grads) ---------------------------------------------------------------
# The reference's causal-LM loss and every parameter's gradient, fp32, eval mode, stored beside a
# checkpoint as grads.safetensors + grads.json (full gradient tensors for some cases, each
# parameter's L2 norm and max-abs for all). Tolerances: loss within 1e-5; each gradient within
# 1e-4 x its max-abs (the reference's own equivalent code paths differ by up to 1e-5 relative).

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
    return max(e / s if s else e for e, s in zip(errors, (norm, maxabs)))


def run_grad_case(model: GLM4V, grads: dict[str, torch.Tensor], pixels: dict[str, torch.Tensor],
                  meta: dict, case: str) -> GradCaseReport:
    """One supervised sample: loss and every parameter's gradient vs the reference's."""
    from glm4v_conversion.names import native_to_hf
    info = meta["cases"][case]
    device = model.text.embed.weight.device
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


def whole(grad: torch.Tensor | None) -> torch.Tensor | None:
    """The whole gradient: FSDP2 leaves each rank a shard (a DTensor; gathering is a collective)."""
    return grad.full_tensor() if hasattr(grad, "full_tensor") else grad


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
        from . import distributed
        model = distributed.fsdp(model, distributed.mesh(torch.device(device)))
    with reference_kernels(torch.float32):
        return [run_grad_case(model, grads, pixels, meta, case) for case in sorted(meta["cases"])]


def format_grad_report(reports: list[GradCaseReport]) -> str:
    lines = [f"  {'case':<5} {'loss':>10} {'loss_abs_err':>12} {'grad_max_rel':>12}  {'compared':<18} "
             f"{'worst parameter (HF name)':<60} ok"]
    for r in reports:
        lines.append(f"  {r.name:<5} {r.loss:10.6f} {r.loss_abs_err:12.3e} {r.grad_max_rel_err:12.3e}  "
                     f"{r.compared:<18} {r.worst_param:<60} {'ok' if r.ok else 'FAIL'}")
    ok = all(r.ok for r in reports)
    lines.append(f"\ngradient parity {'PASSED' if ok else 'FAILED'}: {sum(r.ok for r in reports)}/{len(reports)} "
                 f"cases (loss <= {GRAD_LOSS_ATOL:g}, gradients <= {GRAD_REL_TOL:g} x max-abs)")
    return "\n".join(lines)


def grads_json(reports: list[GradCaseReport], checkpoint: Path) -> dict:
    return {"ok": all(r.ok for r in reports), "checkpoint": str(checkpoint), "dtype": "float32",
            "cases": {r.name: asdict(r) for r in reports}}


def grads_main(args: argparse.Namespace, checkpoint: Path, prog: str, out) -> int:
    """`--grads`: exit 0 when every case passes, 1 when one fails or an input is refused."""
    try:
        check_folder(checkpoint, "checkpoint folder", ReferenceFileError)
        check_device(args.device)
        reports = run_grad_parity(checkpoint, args.device, fsdp=args.fsdp > 1)
    except (ValueError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(strict_json(grads_json(reports, checkpoint)), allow_nan=False), file=out)
    else:
        print(f"glm4v-core gradient parity: {checkpoint} vs {checkpoint / 'grads.safetensors'}", file=out)
        print(format_grad_report(reports), file=out)
    return 0 if all(r.ok for r in reports) else 1


class ReferenceFileError(ValueError):
    """A --reference file that is not a parity reference, or one made for another model."""


def check_reference(ref_path: Path, config: GLM4VConfig) -> None:
    """Refuse a reference file that cannot be compared with this checkpoint, before loading either:
    not a safetensors file, no cases in it, or sizes (vocabulary, layers, widths, image size, token
    ids) that disagree with the checkpoint's config.json."""
    infos, _ = read_header(ref_path)  # regular file, valid header (else a CheckpointError naming it)
    meta_path = ref_path.with_suffix(".json")
    if meta_path.exists() or meta_path.is_symlink():
        meta = parse_json(read_text(meta_path, "reference metadata", ReferenceFileError), meta_path,
                          ReferenceFileError)
        if not isinstance(meta, dict):
            raise ReferenceFileError(f"{meta_path}: must hold a JSON object")
    cases = reference_cases(infos)
    if not cases:
        raise ReferenceFileError(f"{ref_path} is not a parity reference: it has no logits_<case> tensors "
                                 "(see tests/fixtures/tiny/reference.safetensors)")
    v = config.vision
    want = [("logits", -1, config.vocab_size, "padded_vocab_size"),
            ("pixel_values", 1, v.in_channels, "vision_config.in_channels"),
            ("pixel_values", 2, v.image_size, "vision_config.image_size"),
            ("pixel_values", 3, v.image_size, "vision_config.image_size"),
            ("hidden_states", -1, config.hidden_size, "hidden_size"),
            ("final_norm_out", -1, config.hidden_size, "hidden_size"),
            ("vision_patch_embed", -1, v.hidden_size, "vision_config.hidden_size")]
    for case in cases:
        ids = infos.get(f"input_ids_{case}")
        if ids is None or len(ids.shape) != 2 or ids.dtype.is_floating_point:
            raise ReferenceFileError(f"{ref_path}: case {case!r} needs an integer input_ids_{case} of shape (batch, "
                                     f"tokens), got {None if ids is None else list(ids.shape)}")
        for stage, dim, size, what in want:
            info = infos.get(f"{stage}_{case}")
            if info is None:
                continue
            rank_ok = len(info.shape) == 4 if stage == "pixel_values" else len(info.shape) > 0
            if not rank_ok or info.shape[dim] != size:
                raise ReferenceFileError(f"{ref_path} was made for another model: {stage}_{case} has shape "
                                         f"{list(info.shape)}, but this checkpoint's {what} is {size}")
        hidden = infos.get(f"hidden_states_{case}")  # embeddings + each layer; a recording may stop early
        if hidden is not None and not 1 <= hidden.shape[0] <= config.num_layers + 1:
            raise ReferenceFileError(f"{ref_path} was made for another model: hidden_states_{case} has shape "
                                     f"{list(hidden.shape)}, but this checkpoint has num_layers + 1 = "
                                     f"{config.num_layers + 1} hidden states")
        values = MappedFiles().tensor(ids)
        for token in (values.min(), values.max()) if ids.nbytes else ():
            if not 0 <= int(token) < config.vocab_size:
                raise ReferenceFileError(f"{ref_path} was made for another model: input_ids_{case} holds token id "
                                         f"{int(token)}, outside this checkpoint's vocabulary [0, {config.vocab_size})")


def strict_json(value):
    """JSON has no NaN or Infinity: non-finite floats become the strings "nan", "inf", "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def build_parser(prog: str = "glm4v parity") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog,
                                description="Compare glm4v-core with the HF reference outputs stored beside a checkpoint.",
                                epilog="exit status: 0 when every case passes, 1 when a case fails or an input is "
                                       "refused (the message says which), 2 for a usage error.")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint folder (HF or native layout); default: the bundled tiny fixture")
    p.add_argument("--reference", type=Path, default=None,
                   help="reference .safetensors (its .json beside it); default: CHECKPOINT/reference.safetensors")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model dtype (default float32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--baseline", type=Path, default=None,
                   help="quantized checkpoints: the float checkpoint it was made from, for the int4 budget "
                        "(default: the reference file's folder)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object instead of the table (strict JSON: a non-finite number is a string)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--grads", action="store_true",
                   help="gradient parity instead: loss and every parameter gradient vs CHECKPOINT/grads.safetensors")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor-parallel over N ranks (spawned here: gloo on CPU, NCCL on CUDA; or torchrun's)")
    p.add_argument("--fsdp", type=int, default=1, metavar="N", help="with --grads: FSDP2 over N ranks (as --tp)")
    parity_report.add_arguments(p)
    return p


def main(argv: list[str] | None = None, prog: str = "glm4v parity") -> int:
    with quiet_broken_pipe() as out:
        parser = build_parser(prog)
        args = parser.parse_args(argv)
        ranks = args.fsdp if args.grads else args.tp
        if (args.tp > 1 and args.grads) or (args.fsdp > 1 and not args.grads) or min(args.tp, args.fsdp) < 1:
            parser.error("--tp N goes with logit parity, --fsdp N with --grads (N >= 1)")
        if ranks > 1 and not torch.distributed.is_initialized():  # start the ranks; each runs this main again
            from . import distributed  # only here: torch.distributed.tensor takes seconds to import
            device_type = "cuda" if args.device.startswith("cuda") else "cpu"
            try:
                return distributed.run_ranks(main_on_rank, ranks, sys.argv[1:] if argv is None else argv, prog,
                                             device_type=device_type)
            except distributed.DistributedError as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                return 1
        checkpoint = args.checkpoint or BUNDLED_CHECKPOINT
        if args.grads:
            return grads_main(args, checkpoint, prog, out)
        reference = args.reference or checkpoint / "reference.safetensors"
        try:
            check_folder(checkpoint, "checkpoint folder", ReferenceFileError)
            config = GLM4VConfig.from_json(checkpoint / "config.json")
            if not (reference.exists() or reference.is_symlink()):
                raise ReferenceFileError(f"reference file {reference} not found (pass --reference)")
            check_reference(reference, config)
            check_device(args.device)
            reports = run_parity(checkpoint, reference, DTYPES[args.dtype], args.device, args.baseline,
                                 tp=args.tp > 1)
            if args.reference is not None:  # a recording of its own (make-reference): its cases only
                pass
            elif args.dtype == "float32" and quantization_of(checkpoint) is None and args.tp <= 1:
                reports += run_multi_image_parity(checkpoint, device=args.device)  # fp32 outputs, fp32 bound
            elif (checkpoint / "multi_image.safetensors").exists():
                print("note: the multi_image cases run in float32 on float weights in one process only (their "
                      "reference holds fp32 outputs)", file=sys.stderr)
        except ValueError as e:  # every refused input is a ValueError subclass naming the file or flag
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"\n{prog}: interrupted", file=sys.stderr)
            return 130
        if args.json:
            print(json.dumps(strict_json(to_json(reports, checkpoint, args.dtype)), allow_nan=False), file=out)
        else:
            print(f"glm4v-core parity: {checkpoint} vs {reference}", file=out)
            print(format_report(reports, args.dtype), file=out)
        if not parity_report.write_requested(reports, args, f"{checkpoint} [{args.dtype}]", prog):
            return 1
        return 0 if all(r.ok for r in reports) else 1


def main_on_rank(argv: list[str], prog: str) -> int:
    """One rank of --tp / --fsdp: the whole comparison with this rank's shard; rank 0 prints."""
    if torch.distributed.get_rank() == 0:
        return main(argv, prog)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(argv, prog)


# --- quantized checkpoints ---------------------------------------------------------------------

INT8_BUDGET_X_BF16 = 3.0     # int8 logits max-abs <= 3x the reference's own bf16-vs-fp32 error
INT8_MIN_ARGMAX_AGREEMENT = 0.9
INT4_BUDGET_X_RTN = 1.25     # int4 logits max-abs <= 1.25x that of plain round-to-nearest, same group size


def quantization_of(checkpoint: str | Path) -> dict | None:
    """The `quantization` record of a native folder's glm4v_native.json, or None (float checkpoints)."""
    path = Path(checkpoint) / "glm4v_native.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text()).get("quantization")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None  # load_model names the problem


@dataclass
class QuantBudget:
    """Logits budget of a quantized model: int8 from the reference's bf16 error, int4 from plain
    round-to-nearest on the float baseline (None when no baseline can be run: shown, not judged)."""
    scheme: str
    logits: float | None
    min_argmax_agreement: float | None
    why: str


def quant_budget(record: dict, meta: dict, ref: dict[str, torch.Tensor], baseline: Path | None,
                 dtype: torch.dtype, device: str) -> QuantBudget:
    if record["scheme"] == "int8":
        bf16 = meta.get("tolerances_observed", {}).get("bf16_vs_fp32_logits_a_maxabs")
        if bf16 is None:
            raise ValueError("an int8 parity run needs tolerances_observed.bf16_vs_fp32_logits_a_maxabs in the "
                             "reference's .json")
        return QuantBudget("int8", INT8_BUDGET_X_BF16 * bf16, INT8_MIN_ARGMAX_AGREEMENT,
                           f"{INT8_BUDGET_X_BF16:g}x the reference's bf16-vs-fp32 error {bf16:.3g}")
    if baseline is None or not (Path(baseline) / "config.json").exists():
        return QuantBudget("int4", None, None, "no float baseline checkpoint: pass --baseline to judge int4")
    from .ops import use_backend
    from .quant import quantize_model
    rtn = quantize_model(load_model(baseline, dtype=dtype, device=device), "int4", record["group_size"], "rtn")
    worst = 0.0
    with use_backend("torch"), torch.no_grad():  # plain dequantize-then-matmul
        for case in reference_cases(ref):
            logits, rows = _case_logits(rtn, ref, case)
            worst = max(worst, compare("logits", logits, ref[f"logits_{case}"], None, rows).max_abs)
    return QuantBudget("int4", INT4_BUDGET_X_RTN * worst, None,
                       f"{INT4_BUDGET_X_RTN:g}x plain round-to-nearest int4 (group {record['group_size']}) "
                       f"on {baseline}: {worst:.3g}")


def _case_logits(model: GLM4V, ref: dict[str, torch.Tensor], case: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    inputs = {k: (v.to(model.device) if v is not None else None) for k, v in case_inputs(ref, case).items()}
    rows = ref.get(f"attention_mask_expanded_{case}", ref.get(f"attention_mask_{case}"))
    return model(**inputs).logits, rows.bool() if rows is not None else None


@torch.no_grad()
def run_quantized_parity(checkpoint: Path, ref: dict[str, torch.Tensor], meta: dict, record: dict,
                         dtype: torch.dtype, device: str, baseline: Path | None) -> list[CaseReport]:
    """Every case's logits against the fp32 reference, judged by the quantized budget (see QuantBudget)."""
    budget = quant_budget(record, meta, ref, baseline, dtype, device)
    model = load_model(checkpoint, dtype=dtype, device=device)
    reports = []
    for case in reference_cases(ref):
        logits, rows = _case_logits(model, ref, case)
        stage = compare("logits", logits, ref[f"logits_{case}"], budget.logits, rows, argmax_margin=float("inf"))
        if budget.min_argmax_agreement is not None:
            stage.ok = stage.ok and stage.argmax_agree >= budget.min_argmax_agreement
        stage.note = (f"{budget.scheme} budget: {budget.why}"
                      + (f"; argmax agreement >= {budget.min_argmax_agreement:g}" if budget.min_argmax_agreement else ""))
        desc = meta.get("inputs", {}).get(case, {}).get("desc", "")
        reports.append(CaseReport(case, f"{desc} [{record['scheme']}]", [stage]))
    return reports


if __name__ == "__main__":
    sys.exit(main(prog="python -m glm4v_core.parity"))
