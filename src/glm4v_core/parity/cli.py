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
import os
import stat
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from glm4v_conversion import __version__
from glm4v_conversion.atomic import write_file_atomically
from glm4v_conversion.files import check_folder, file_kind, os_reason
from glm4v_conversion.streams import quiet_broken_pipe
from glm4v_core.checkpoint import DTYPES, build_meta_model, check_device
from glm4v_core.config import BUNDLED_CHECKPOINT, GLM4VConfig
from glm4v_core.errors import REFUSED, CLIError
from glm4v_core.hub import resolve_model_folder
from glm4v_core.parity.compare import CaseReport
from glm4v_core.parity.grads import run_grad_parity
from glm4v_core.parity.multi_image import run_multi_image_parity
from glm4v_core.parity.quantized import quantization_of
from glm4v_core.parity.reference import REFERENCE_DTYPES, ReferenceFileError, check_reference
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
from glm4v_core.transforms.adapter_files import check_adapters, resolve_adapter

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
                   help="checkpoint: DIR (HF or native layout) or ORG/NAME[@REVISION] from the local Hugging Face "
                        "cache (glm4v download); default: the bundled tiny fixture")
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
    p.add_argument("--adapter", type=Path, default=None, metavar="DIR|FILE",
                   help="apply these LoRA adapters (a PEFT folder, a glm4v finetune --out folder or its "
                        "adapter.safetensors) before comparing; needs --reference, recorded on the adapted model "
                        "(e.g. glm4v make-reference on the run's OUT/merged); float checkpoints, one process")
    add_arguments(p)
    return p


def main(argv: list[str] | None = None, prog: str = "glm4v parity") -> int:
    with quiet_broken_pipe() as out:
        parser = build_parser(prog)
        args = parser.parse_args(argv)
        ranks = args.fsdp if args.grads else args.tp
        if (args.tp > 1 and args.grads) or (args.fsdp > 1 and not args.grads):
            parser.error("--tp N goes with logit parity, --fsdp N with --grads")
        if args.grads and (args.plot is not None or args.html is not None):
            parser.error("--plot and --html draw the logit parity report; they do not go with --grads")
        if args.adapter is not None and (args.grads or args.reference is None):
            parser.error("--adapter compares against a reference recorded on the adapted model: give it with "
                         "--reference (e.g. glm4v make-reference on the run's OUT/merged); not with --grads")
        if args.adapter is not None and args.tp > 1:
            parser.error("--adapter does not go with --tp N: tensor parallel shards plain Linears, not LoRA ones")
        try:
            checkpoint = resolve_model_folder(args.checkpoint or BUNDLED_CHECKPOINT, "--checkpoint")  # or a hub id
            check_ranks(args, checkpoint)
            for flag, path in (("--plot", args.plot), ("--html", args.html)):
                check_report_path(flag, path)
        except REFUSED as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 1
        if ranks > 1 and not torch.distributed.is_initialized():  # start the ranks; each runs this main again
            from glm4v_core.transforms import distributed  # lazy: see glm4v_core.transforms
            device_type = "cuda" if args.device.startswith("cuda") else "cpu"
            try:
                return distributed.run_ranks(main_on_rank, ranks, sys.argv[1:] if argv is None else argv, prog,
                                             device_type=device_type)
            except distributed.DistributedError as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                return 1
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
            adapter = None if args.adapter is None else check_adapter(args, checkpoint, config)
            reports = run_parity(checkpoint, reference, DTYPES[args.dtype], args.device, args.baseline,
                                 tp=args.tp > 1, adapter=adapter)
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


def check_adapter(args: argparse.Namespace, checkpoint: Path, config: GLM4VConfig) -> Path:
    """--adapter: the adapter file, checked against the model's shapes before any weight is read. A quantized
    checkpoint is refused: it is judged by budgets made from its plain-RTN baseline, which has no adapters."""
    if quantization_of(checkpoint) is not None:
        raise CLIError(f"--adapter: {checkpoint} is a quantized checkpoint, whose parity budgets come from an "
                       "unadapted baseline; compare the float checkpoint with the adapters instead")
    adapter = resolve_adapter(args.adapter)
    check_adapters(build_meta_model(config), adapter)
    return adapter


def check_ranks(args: argparse.Namespace, checkpoint: Path) -> None:
    """--tp / --fsdp: at least one rank, and a --tp degree the checkpoint's heads, KV groups, MLP and
    vocabulary can be split by (transforms.distributed.check_tp_degree on its config), before any rank starts."""
    if args.tp < 1:
        raise CLIError(f"--tp must be >= 1 (the number of tensor-parallel ranks), got {args.tp}")
    if args.fsdp < 1:
        raise CLIError(f"--fsdp must be >= 1 (the number of FSDP ranks), got {args.fsdp}")
    if args.tp > 1:
        check_folder(checkpoint, "checkpoint folder", ReferenceFileError)
        check_tp_fits(GLM4VConfig.from_json(checkpoint / "config.json"), args.tp)


def check_tp_fits(config: GLM4VConfig, tp: int) -> None:
    """transforms.distributed.check_tp_degree on a config alone (it reads nothing of the model but
    model.config), so that a --tp degree the query heads, KV groups, MLP or vocabulary cannot be split by
    is refused before any rank starts, with the degrees that fit (none above the query-head count can).
    Also `glm4v generate --tp`'s check."""
    from glm4v_core.transforms import distributed  # lazy: see glm4v_core.transforms

    def error(n: int) -> distributed.DistributedError | None:
        try:
            distributed.check_tp_degree(SimpleNamespace(config=config), n)
        except distributed.DistributedError as e:
            return e
        return None

    if (e := error(tp)) is not None:
        accepted = ", ".join(str(n) for n in range(1, config.num_heads + 1) if error(n) is None)
        raise CLIError(f"--tp {tp} cannot split the model: {e}; degrees that fit: {accepted}")


def check_report_path(flag: str, path: Path | None) -> None:
    """--plot / --html PATH, before parity runs: a new name in an existing folder, or a regular file
    (replaced in one step). A folder, FIFO, device or socket there is refused, never replaced."""
    if path is None:
        return
    try:
        mode = os.stat(path).st_mode  # follows links: a link to a folder is refused like the folder
    except FileNotFoundError:
        mode = None  # a new name (or a dangling link, which the new file replaces)
    except OSError as e:  # a symlink loop, no permission, a part of the path that is not a folder
        raise CLIError(f"{flag} {path}: {os_reason(e)}; give a regular file or a new name") from None
    if mode is not None and not stat.S_ISREG(mode):
        raise CLIError(f"{flag} {path}: is {file_kind(mode)}, not a regular file; give a regular file "
                       "(replaced) or a new name")
    folder = path.parent
    if not folder.is_dir():
        what = "does not exist" if not (folder.exists() or folder.is_symlink()) else "is not a folder"
        raise CLIError(f"{flag} {path}: the folder {folder} {what}")


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
    """Write the files asked for by --plot / --html (each all or nothing: write_file_atomically leaves
    no temporary file behind); False (after saying why on stderr) if one failed."""
    for flag, path, render in (("--plot", args.plot, lambda: plot_png(reports, title)),
                               ("--html", args.html, lambda: html_report(reports, title).encode())):
        if path is None:
            continue
        try:
            check_report_path(flag, path)  # again: something may have taken the name while parity ran
            write_file_atomically(path, render())
        except (CLIError, ReportError) as e:  # taken meanwhile, or no matplotlib for --plot
            print(f"{prog}: error: {e}", file=sys.stderr)
            return False
        except OSError as e:
            print(f"{prog}: error: cannot write {flag} {path}: {os_reason(e)}", file=sys.stderr)
            return False
        print(f"{flag.removeprefix('--')}: {path}", file=sys.stderr)
    return True
