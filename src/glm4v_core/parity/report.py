"""Parity reports to look at: `glm4v parity ... --plot report.png [--html report.html]`.

The plot draws, for every case, each stage's max-abs and max-rel error against the reference on
a log scale, in model order (vision stages, image embeddings, embeddings, each decoder layer, final
norm, logits), with the tolerance as a line: drift shows as a curve climbing towards it. Integer
stages (position ids, masks, greedy tokens) are exact-or-not and are named in the panel's title.

matplotlib is optional (`pip install -e '.[plot]'`): the numeric report never needs it. The HTML
report is the same table per case, colored, with the plot embedded when matplotlib is there.
"""
from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from glm4v_core.errors import GLM4VError
from glm4v_core.parity.grads import GRAD_LOSS_ATOL, GRAD_REL_TOL, GradCaseReport

if TYPE_CHECKING:
    from glm4v_core.parity.compare import CaseReport, Stage

PLOT_INSTALL = "pip install -e '.[plot]'  (matplotlib)"
INTEGER_STAGES = ("position_ids", "attention_mask", "greedy_tokens")
EXACT_FLOOR = 1e-10  # where an exact (0) error is drawn on the log scale


class ReportError(GLM4VError):
    """A report file that cannot be written (a missing optional dependency, a bad path)."""


def import_pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ReportError(f"--plot needs matplotlib ({e}); install it with: {PLOT_INSTALL}") from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    return plt


def float_stages(report: CaseReport) -> list[Stage]:
    return [s for s in report.stages if s.name not in INTEGER_STAGES and s.name != "logits vs reference bf16"]


def exact_summary(report: CaseReport) -> str:
    """The integer stages in a few words: 'positions exact, greedy DIFFER'."""
    short = {"position_ids": "positions", "attention_mask": "mask", "greedy_tokens": "greedy"}
    return ", ".join(f"{short[s.name]} {'exact' if s.max_abs == 0 else 'DIFFER'}"
                     for s in report.stages if s.name in INTEGER_STAGES)


def plot_png(reports: list[CaseReport], title: str) -> bytes:
    """One panel per case: max-abs and max-rel per stage (log scale), the tolerance, failures in red."""
    plt = import_pyplot()
    counts = [max(1, len(float_stages(r))) for r in reports]
    width = max(9.0, 0.3 * max(counts, default=1) + 2.5)
    heights = [3.2 if n > 3 else 2.2 for n in counts]  # a logits-only case needs less room
    fig, axes = plt.subplots(len(reports), 1, figsize=(width, sum(heights) + 0.9), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, report in zip(axes[:, 0], reports, strict=True):
        draw_case(ax, report)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"glm4v-core parity: {title}", fontsize=11, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (sum(heights) + 0.9)))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def draw_case(ax, report: CaseReport) -> None:
    stages = float_stages(report)
    x = list(range(len(stages)))
    clip = lambda v: 1e3 if v == float("inf") else max(v, EXACT_FLOOR)  # noqa: E731
    ax.plot(x, [clip(s.max_abs) for s in stages], "o-", color="tab:blue", ms=4, lw=1.5, label="max-abs")
    ax.plot(x, [clip(s.max_rel) for s in stages], "s--", color="tab:orange", ms=3, lw=1, label="max-rel")
    judged = [i for i, s in enumerate(stages) if s.tol is not None]
    ax.hlines([stages[i].tol for i in judged], [i - 0.45 for i in judged], [i + 0.45 for i in judged],
              color="tab:red", lw=1.5, label="tolerance on max-abs (none: shown, not judged)")
    bad = [i for i, s in enumerate(stages) if not s.ok]
    ax.plot(bad, [clip(stages[i].max_abs) for i in bad], "x", color="red", ms=10, mew=2.5, label="fails")
    ax.axhline(EXACT_FLOOR, color="grey", lw=0.6, ls=":")
    ax.text(0.995, EXACT_FLOOR, "exact (0) ", transform=ax.get_yaxis_transform(), ha="right", va="bottom",
            fontsize=7, color="grey")
    ax.set_yscale("log")
    ax.set_ylim(EXACT_FLOOR / 3, 30)
    ax.set_xticks(x)
    ax.set_xticklabels([short_name(s.name) for s in stages], rotation=60, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(stages) - 0.4)
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.set_ylabel("error vs reference", fontsize=8)
    desc = report.desc or "no description"
    desc = desc if len(desc) <= 50 else desc[:47] + "..."
    summary = exact_summary(report)
    verdict = "PASS" if report.ok else "FAIL"
    ax.set_title(f"case {report.name} ({desc}): {verdict}" + (f"   [{summary}]" if summary else ""),
                 fontsize=9, loc="left", color="black" if report.ok else "red")


def short_name(name: str) -> str:
    return name.replace("decoder.layer", "layer ").replace("vision.", "vit ")


def html_report(reports: list[CaseReport], title: str) -> str:
    """Self-contained HTML: the plot inline (when matplotlib is installed) and one table per case."""
    try:
        png = base64.b64encode(plot_png(reports, title)).decode()
        figure = f'<img alt="per-stage errors" src="data:image/png;base64,{png}">'
    except ReportError as e:
        figure = f"<p><i>no plot: {html.escape(str(e))}</i></p>"
    ok = all(r.ok for r in reports)
    parts = ["<!doctype html><meta charset='utf-8'><title>glm4v-core parity</title>",
             "<style>body{font-family:sans-serif;margin:2em} table{border-collapse:collapse;margin-bottom:2em}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right} td:first-child{text-align:left}"
             ".fail{background:#fdd} .pass{color:#080} .bad{color:#c00}</style>",
             f"<h1>glm4v-core parity: {html.escape(title)}</h1>",
             f"<p class='{'pass' if ok else 'bad'}'><b>{'PASSED' if ok else 'FAILED'}</b>: "
             f"{sum(r.ok for r in reports)}/{len(reports)} cases</p>", figure]
    for r in reports:
        parts.append(f"<h2 class='{'pass' if r.ok else 'bad'}'>case {html.escape(r.name)} "
                     f"({html.escape(r.desc or 'no description')}): {'PASS' if r.ok else 'FAIL'}</h2>")
        parts.append("<table><tr><th>stage</th><th>shape</th><th>max-abs</th><th>max-rel</th>"
                     "<th>argmax</th><th>tolerance</th><th>ok</th><th>note</th></tr>")
        for s in r.stages:
            agree = f"{s.argmax_agree:.3f}" if s.argmax_agree is not None else ""
            tol = f"{s.tol:.2e}" if s.tol is not None else "(info)"
            parts.append(f"<tr class='{'' if s.ok else 'fail'}'><td>{html.escape(s.name)}</td>"
                         f"<td>{'x'.join(map(str, s.shape))}</td><td>{s.max_abs:.3e}</td><td>{s.max_rel:.3e}</td>"
                         f"<td>{agree}</td><td>{tol}</td><td>{'ok' if s.ok else 'FAIL'}</td>"
                         f"<td>{html.escape(s.note)}</td></tr>")
        parts.append("</table>")
    return "\n".join(parts) + "\n"


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


def strict_json(value):
    """JSON has no NaN or Infinity: non-finite floats become the strings "nan", "inf", "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


