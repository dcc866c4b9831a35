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
import sys
from pathlib import Path

import torch

from glm4v_conversion import __version__
from glm4v_conversion.atomic import write_file_atomically
from glm4v_conversion.files import check_folder
from glm4v_conversion.streams import quiet_broken_pipe
from glm4v_core.checkpoint import DTYPES, check_device
from glm4v_core.config import BUNDLED_CHECKPOINT, GLM4VConfig
from glm4v_core.errors import REFUSED
from glm4v_core.parity.compare import CaseReport
from glm4v_core.parity.grads import run_grad_parity
from glm4v_core.parity.multi_image import run_multi_image_parity
from glm4v_core.parity.quantized import quantization_of
from glm4v_core.parity.reference import ReferenceFileError, check_reference
from glm4v_core.parity.report import (
    PLOT_INSTALL,
    ReportError,
    format_grad_report,
    format_report,
    grads_json,
    html_report,
    plot_png,
    strict_json,
    to_json,
)
from glm4v_core.parity.run import run_parity

REFERENCE_DTYPES = ("float32", "bfloat16")  # what a reference records (float16 is not compared)




























# -- several images per prompt (multi_image.safetensors beside the checkpoint) ---------------------















# --- gradient parity (--grads) ---------------------------------------------------------------
# The reference's causal-LM loss and every parameter's gradient, fp32, eval mode, stored beside a
# checkpoint as grads.safetensors + grads.json (full gradient tensors for some cases, each
# parameter's L2 norm and max-abs for all). Tolerances: loss within 1e-5; each gradient within
# 1e-4 x its max-abs (the reference's own equivalent code paths differ by up to 1e-5 relative).

















def grads_main(args: argparse.Namespace, checkpoint: Path, prog: str, out) -> int:
    """`--grads`: exit 0 when every case passes, 1 when one fails or an input is refused."""
    try:
        check_folder(checkpoint, "checkpoint folder", ReferenceFileError)
        check_device(args.device)
        reports = run_grad_parity(checkpoint, args.device, fsdp=args.fsdp > 1)
    except (*REFUSED, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(strict_json(grads_json(reports, checkpoint)), allow_nan=False), file=out)
    else:
        print(f"glm4v-core gradient parity: {checkpoint} vs {checkpoint / 'grads.safetensors'}", file=out)
        print(format_grad_report(reports), file=out)
    return 0 if all(r.ok for r in reports) else 1








def build_parser(prog: str = "glm4v parity") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog,
                                description="Compare glm4v-core with the HF reference outputs stored beside "
                                            "a checkpoint.",
                                epilog="exit status: 0 when every case passes, 1 when a case fails or an input is "
                                       "refused (the message says which), 2 for a usage error.")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint folder (HF or native layout); default: the bundled tiny fixture")
    p.add_argument("--reference", type=Path, default=None,
                   help="reference .safetensors (its .json beside it); default: CHECKPOINT/reference.safetensors")
    p.add_argument("--dtype", choices=REFERENCE_DTYPES, default="float32", help="model dtype (default float32)")
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
    add_arguments(p)
    return p


def main(argv: list[str] | None = None, prog: str = "glm4v parity") -> int:
    with quiet_broken_pipe() as out:
        parser = build_parser(prog)
        args = parser.parse_args(argv)
        ranks = args.fsdp if args.grads else args.tp
        if (args.tp > 1 and args.grads) or (args.fsdp > 1 and not args.grads) or min(args.tp, args.fsdp) < 1:
            parser.error("--tp N goes with logit parity, --fsdp N with --grads (N >= 1)")
        if ranks > 1 and not torch.distributed.is_initialized():  # start the ranks; each runs this main again
            from glm4v_core.transforms import distributed  # lazy: see glm4v_core.transforms
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
        except REFUSED as e:  # every refused input is a GLM4VError / ConversionError naming the file or flag
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
        if not write_requested(reports, args, f"{checkpoint} [{args.dtype}]", prog):
            return 1
        return 0 if all(r.ok for r in reports) else 1


def main_on_rank(argv: list[str], prog: str) -> int:
    """One rank of --tp / --fsdp: the whole comparison with this rank's shard; rank 0 prints."""
    if torch.distributed.get_rank() == 0:
        return main(argv, prog)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(argv, prog)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plot", type=Path, default=None, metavar="PNG",
                   help="also draw the per-stage errors (log scale, with the tolerance) to this image; "
                        f"needs {PLOT_INSTALL}")
    p.add_argument("--html", type=Path, default=None, metavar="HTML",
                   help="also write an HTML report (tables per case; the plot embedded if matplotlib is installed)")


def write_requested(reports: list[CaseReport], args: argparse.Namespace, title: str,
                    prog: str = "glm4v parity") -> bool:
    """Write the files asked for by --plot / --html; False (after saying why on stderr) if one failed."""
    try:
        if args.plot is not None:
            write_file_atomically(args.plot, plot_png(reports, title))
            print(f"plot: {args.plot}", file=sys.stderr)
        if args.html is not None:
            write_file_atomically(args.html, html_report(reports, title).encode())
            print(f"html: {args.html}", file=sys.stderr)
    except (ReportError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return False
    return True
