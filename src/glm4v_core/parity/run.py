"""Logit parity of every case in a reference file, stage by stage (vision stages, image
embeddings, positions, each decoder layer, final norm, logits, greedy tokens), and which parity a
checkpoint gets (quantized checkpoints are judged by their budgets, see parity/quantized.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from glm4v_core.checkpoint import load_model
from glm4v_core.generation.loop import generate
from glm4v_core.hub import resolve_model_folder
from glm4v_core.model.glm4v import GLM4V
from glm4v_core.parity.compare import CaseReport, Stage, Tolerances, compare, exact
from glm4v_core.parity.exact_kernels import reference_kernels
from glm4v_core.parity.quantized import quantization_of, run_quantized_parity
from glm4v_core.parity.reference import case_inputs, logits_key, recorded_in_bf16, reference_cases
from glm4v_core.transforms.adapter_files import load_adapters


@torch.no_grad()
def run_case(model: GLM4V, ref: dict[str, torch.Tensor], meta: dict, case: str, tol: Tolerances) -> CaseReport:
    inputs = case_inputs(ref, case)
    device = model.device
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
    key, last = logits_key(ref, case)  # a long case holds the last positions' logits only
    hidden_wanted = f"hidden_states_{case}" in ref or f"final_norm_out_{case}" in ref
    out = model(**inputs, output_hidden_states=hidden_wanted, logits_to_keep=last)
    if out.image_embeds is not None and f"image_embeds_{case}" in ref:
        stages.append(compare("image_embeds", out.image_embeds, ref[f"image_embeds_{case}"], tol.image))
    if f"position_ids_{case}" in ref:
        stages.append(exact("position_ids", out.position_ids, ref[f"position_ids_{case}"]))
    rows = ref.get(f"attention_mask_expanded_{case}", ref.get(f"attention_mask_{case}"))
    if f"attention_mask_expanded_{case}" in ref and out.attention_mask is not None:
        stages.append(exact("attention_mask", out.attention_mask, rows))
    rows = rows.bool() if rows is not None else None
    if rows is not None and last is not None:
        rows = rows[:, -last:]
    if f"hidden_states_{case}" in ref:
        hs = ref[f"hidden_states_{case}"]  # (layers + 1, T, H), batch of one
        for i, ours in enumerate(out.hidden_states[:hs.shape[0]]):  # a recording may hold the first layers only
            name = "embeddings" if i == 0 else f"decoder.layer{i - 1}"
            stages.append(compare(name, ours[0], hs[i], tol.hidden()))
    if f"final_norm_out_{case}" in ref:
        r = ref[f"final_norm_out_{case}"]
        stages.append(compare("final_norm", model.text.final_norm(out.hidden_states[-1]), r, tol.hidden()))
    name = "logits" if last is None else f"logits (last {last})"
    stages.append(compare(name, out.logits, ref[key], tol.logits, rows, argmax_margin=tol.margin))
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
                  f"(near-tie bound {tol.margin:.3f}); {'equals' if stage.ok else 'does NOT equal'} "
                  "the fp32 greedy tokens")
    return stage


def run_parity(checkpoint: str | Path, reference: str | Path | None = None,
               dtype: torch.dtype = torch.float32, device: str = "cpu",
               baseline: str | Path | None = None, tp: bool = False,
               adapter: str | Path | None = None) -> list[CaseReport]:
    """tp: run as one rank of a tensor-parallel group (every rank of the group calls this). adapter: a
    LoRA adapter file (load_adapters) applied to the loaded model; the reference must then be one
    recorded on the adapted model (e.g. glm4v make-reference on `glm4v finetune --save-merged`'s OUT/merged)."""
    checkpoint = resolve_model_folder(checkpoint)  # a folder, or a hub id from the local cache
    ref_path = Path(reference) if reference else checkpoint / "reference.safetensors"
    meta_path = ref_path.with_suffix(".json")
    if not ref_path.exists():
        raise FileNotFoundError(f"reference file {ref_path} not found (pass --reference)")
    ref = load_file(str(ref_path))
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    record = quantization_of(checkpoint)
    if record is not None:
        return run_quantized_parity(checkpoint, ref, meta, record, dtype, device, baseline or ref_path.parent)
    tol = Tolerances(meta, torch.float32 if recorded_in_bf16(meta) else dtype,
                     images=any(k.startswith("pixel_values_") for k in ref))
    model = load_model(checkpoint, dtype=dtype, device=device)
    if adapter is not None:
        load_adapters(model, adapter)
    if tp:
        from glm4v_core.transforms import distributed  # lazy: see glm4v_core.transforms
        model = distributed.tensor_parallel(model, distributed.mesh(torch.device(device)))
    with reference_kernels(dtype):
        reports = [run_case(model, ref, meta, case, tol) for case in reference_cases(ref)]
    if recorded_in_bf16(meta):
        for report in reports:
            show_only(report)
    return reports


EXACT_STAGES = ("position_ids", "attention_mask")


def show_only(report: CaseReport) -> None:
    """A bf16 recording has no fp32 run to bound its own rounding error, so its float stages and
    greedy tokens are shown, not judged; position ids and masks must still match exactly."""
    for s in report.stages:
        if s.name not in EXACT_STAGES:
            verdict = "" if s.ok else " (would fail the fp32 bound)"
            s.tol, s.ok = None, True
            s.note = (s.note + "; " if s.note else "") + f"bf16 recording: shown, not judged{verdict}"


