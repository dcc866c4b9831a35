"""Several images per prompt: the multi_image cases stored beside a checkpoint (fp32).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from glm4v_core.checkpoint import load_model
from glm4v_core.generation.loop import generate
from glm4v_core.model.glm4v import GLM4V
from glm4v_core.parity.compare import FP32_ATOL, CaseReport, compare, exact
from glm4v_core.parity.exact_kernels import reference_kernels

# Which of the file's 4 images each case takes, in reading order (its json's "images" fields).
MULTI_IMAGE_CASES = {"m1": [0, 1], "m2": [2, 3], "m3": [0, 1, 3]}


@torch.no_grad()
def run_multi_image_case(model: GLM4V, ref: dict[str, torch.Tensor], meta: dict, case: str) -> CaseReport:
    """fp32: spliced positions (and mask) exact, logits within 1e-4 where the spliced mask is 1,
    greedy tokens equal (the reference's continue at each row's largest position + 1)."""
    device = model.device
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


