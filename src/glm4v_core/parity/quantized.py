"""Quantized checkpoints (`glm4v-convert --quantize`) are judged on the logits only, by their own
budgets: int8 from the reference's bf16 error, int4 from plain round-to-nearest on the float
baseline (see QuantBudget).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from glm4v_core.checkpoint import load_model
from glm4v_core.model.glm4v import GLM4V
from glm4v_core.parity.compare import CaseReport, compare, recorded_error
from glm4v_core.parity.reference import ReferenceFileError, case_inputs, logits_key, reference_cases

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
        bf16 = recorded_error(meta.get("tolerances_observed", {}), "logits")
        if bf16 is None:
            raise ReferenceFileError("an int8 parity run needs tolerances_observed.bf16_vs_fp32_logits_<case>_maxabs "
                                     "in the reference's .json")
        return QuantBudget("int8", INT8_BUDGET_X_BF16 * bf16, INT8_MIN_ARGMAX_AGREEMENT,
                           f"{INT8_BUDGET_X_BF16:g}x the reference's bf16-vs-fp32 error {bf16:.3g}")
    if baseline is None or not (Path(baseline) / "config.json").exists():
        return QuantBudget("int4", None, None, "no float baseline checkpoint: pass --baseline to judge int4")
    from glm4v_core.model.ops import use_backend
    from glm4v_core.transforms.quant import quantize_model
    rtn = quantize_model(load_model(baseline, dtype=dtype, device=device), "int4", record["group_size"], "rtn")
    worst = 0.0
    with use_backend("torch"), torch.no_grad():  # plain dequantize-then-matmul
        for case in reference_cases(ref):
            logits, rows, key = _case_logits(rtn, ref, case)
            worst = max(worst, compare("logits", logits, ref[key], None, rows).max_abs)
    return QuantBudget("int4", INT4_BUDGET_X_RTN * worst, None,
                       f"{INT4_BUDGET_X_RTN:g}x plain round-to-nearest int4 (group {record['group_size']}) "
                       f"on {baseline}: {worst:.3g}")


def _case_logits(model: GLM4V, ref: dict[str, torch.Tensor], case: str
                 ) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """Our logits of a case, the rows to compare (None: all) and the reference key they match."""
    inputs = {k: (v.to(model.device) if v is not None else None) for k, v in case_inputs(ref, case).items()}
    key, last = logits_key(ref, case)
    rows = ref.get(f"attention_mask_expanded_{case}", ref.get(f"attention_mask_{case}"))
    rows = None if rows is None else rows.bool()[:, -last:] if last else rows.bool()
    return model(**inputs, logits_to_keep=last).logits, rows, key


@torch.no_grad()
def run_quantized_parity(checkpoint: Path, ref: dict[str, torch.Tensor], meta: dict, record: dict,
                         dtype: torch.dtype, device: str, baseline: Path | None) -> list[CaseReport]:
    """Every case's logits against the fp32 reference, judged by the quantized budget (see QuantBudget)."""
    budget = quant_budget(record, meta, ref, baseline, dtype, device)
    model = load_model(checkpoint, dtype=dtype, device=device)
    reports = []
    for case in reference_cases(ref):
        logits, rows, key = _case_logits(model, ref, case)
        stage = compare("logits", logits, ref[key], budget.logits, rows, argmax_margin=float("inf"))
        if budget.min_argmax_agreement is not None:
            stage.ok = stage.ok and stage.argmax_agree >= budget.min_argmax_agreement
        agreement = f"; argmax agreement >= {budget.min_argmax_agreement:g}" if budget.min_argmax_agreement else ""
        stage.note = f"{budget.scheme} budget: {budget.why}" + agreement
        desc = meta.get("inputs", {}).get(case, {}).get("desc", "")
        reports.append(CaseReport(case, f"{desc} [{record['scheme']}]", [stage]))
    return reports


