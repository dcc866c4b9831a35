"""The `glm4v-convert` command: HF checkpoint folder <-> native folder (see glm4v_conversion/__init__)."""
from __future__ import annotations

import argparse
import re
import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from . import __version__
from .errors import ConversionError
from .files import human_size, os_reason
from .streams import WriteCounter, named_stdout_failures

# torch (and .convert / .quantize, which import it) load inside main, after the parse: --help and a usage
# error stay instant, and a Ctrl-C during `import torch` reaches main's handler. So the choices are
# spelled here; a test checks them against quantize.py's and torch's.
DTYPE_NAMES = ("bfloat16", "float16", "float32")
SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
METHODS = ("rtn", "mse")

DESCRIPTION = """\
Convert a GLM-4V-9B checkpoint folder between the Hugging Face layout (model-0000k-of-0000n.safetensors
+ model.safetensors.index.json, names like transformer.encoder.layers.0...) and glm4v-core's native
layout (same sharding, names like text.layers.0..., plus glm4v_native.json provenance).

Tensors are streamed from memory-mapped shards one shard at a time. Every header, name, shape
(against config.json) and dtype, and the free disk space, are checked before anything is written;
the output is written to a hidden folder beside DST and renamed to DST only when complete, so a
failure or Ctrl-C leaves nothing behind."""

EPILOG = """\
examples:
  glm4v-convert ~/glm-4v-9b ~/glm-4v-9b-native            HF -> native
  glm4v-convert ~/glm-4v-9b-native ~/glm-4v-9b-hf --to hf  native -> HF (the original files again)
  glm4v-convert ~/glm-4v-9b ~/glm-4v-9b-int8 --quantize int8
  glm4v-convert ~/glm-4v-9b ~/glm-4v-9b-int4 --quantize int4 --group-size 128 --int4-method mse

exit status: 0 on success, 1 when the input or output is refused (the message says why), 2 for a usage
error, 130 on Ctrl-C, 143 on SIGTERM, 129 on SIGHUP (the unfinished output is removed in all three)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glm4v-convert", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="checkpoint folder to read: HF layout, or native with --to hf")
    p.add_argument("dst", metavar="DST", help="folder to create; it must not exist unless --force")
    p.add_argument("--to", choices=["native", "hf"], default="native",
                   help="layout to write (default: native; SRC must be the other layout)")
    p.add_argument("--dtype", choices=DTYPE_NAMES,
                   help="cast every tensor to this dtype (default: keep the stored one); warns when the cast "
                        "loses precision or range (anything but a cast to float32)")
    p.add_argument("--max-shard-size", type=_size, metavar="SIZE",
                   help="re-shard into files of at most SIZE (e.g. 5GB, 500MB, 2GiB; a bigger tensor gets a file "
                        "of its own). Default: keep the sharding: native shard k = HF shard k; with --to hf, the "
                        "original HF files as glm4v_native.json records them, else 5GB")
    p.add_argument("--force", action="store_true",
                   help="replace DST if it exists and is a checkpoint folder (has config.json) or empty; the old "
                        "folder is swapped out only once the new one is complete")
    p.add_argument("--quantize", choices=SCHEMES,
                   help="write a weight-only quantized native folder: every Linear weight int8 (one scale per "
                        "output row) or int4 (groups along the input dim); everything else keeps its dtype")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES,
                   help="int4 group size (default 128); a layer whose input width is not a multiple is int8")
    p.add_argument("--int4-method", choices=METHODS, default="rtn",
                   help="int4 rounding: rtn = min/max round to nearest; mse = per-group clipping search that "
                        "minimizes the reconstruction error (slower, more accurate)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is written to stderr)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


class Stopped(BaseException):
    """SIGTERM or SIGHUP, raised where the program is, so the unfinished output is cleaned up as on Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def main(argv: list[str] | None = None) -> int:
    try:
        with named_stdout_failures("glm4v-convert") as stdout:  # `>&-`, `> /dev/full`: named; `| head`: quiet
            return _main(argv, stdout)
    except KeyboardInterrupt:  # outside the writing (_run says what was not written): importing torch, reading
        print("\nglm4v-convert: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None, stdout: WriteCounter) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quantize is not None:
        return _quantize(args, parser, stdout)
    from .convert import convert  # lazy: imports torch (see DTYPE_NAMES)
    from .quantize import quantized_scheme_of
    scheme = quantized_scheme_of(args.src)
    if scheme is not None:  # packed weights have no HF (or other native) form
        print(f"glm4v-convert: error: {args.src} is a weight-only quantized folder ({scheme}); it cannot be "
              "converted back: convert the float checkpoint it was made from", file=sys.stderr)
        return 1

    result = _run(lambda: convert(args.src, args.dst, to=args.to, dtype=_torch_dtype(args.dtype),
                                  max_shard_size=args.max_shard_size, force=args.force,
                                  progress=not args.no_progress), args.dst)
    if isinstance(result, int):
        return result
    rate = result.bytes_written / max(result.seconds, 1e-9)
    print(f"wrote {result.dst} ({len(result.files)} files, {human_size(result.bytes_written)} in "
          f"{result.seconds:.1f} s, {human_size(rate)}/s)", file=stdout)
    if result.verified is True:
        print("verified: every safetensors file is byte-identical to the original HF file (sha256 recorded in "
              "glm4v_native.json)", file=stdout)
    elif result.verified is False:
        print("glm4v-convert: note: the safetensors files differ from the sha256 glm4v_native.json records for "
              "the original HF files (the native folder was changed since, or the originals were laid out "
              "differently)", file=sys.stderr)
    return 0


def _quantize(args: argparse.Namespace, parser: argparse.ArgumentParser, stdout: WriteCounter) -> int:
    if args.to != "native" or args.dtype is not None:
        parser.error("--quantize writes a native folder in the source dtype: it cannot be combined with "
                     "--to hf or --dtype")
    group_size = args.group_size or (128 if args.quantize == "int4" else None)
    from .quantize import quantize_checkpoint  # lazy: imports torch (see DTYPE_NAMES)
    result = _run(lambda: quantize_checkpoint(
        args.src, args.dst, args.quantize, group_size, method=args.int4_method, max_shard_size=args.max_shard_size,
        force=args.force, progress=not args.no_progress), args.dst)
    if isinstance(result, int):
        return result
    dst, files, nbytes, seconds = result
    print(f"wrote {dst} ({args.quantize}{f', group size {group_size}' if group_size else ''}; {len(files)} files, "
          f"{human_size(nbytes)} of tensors in {seconds:.1f} s)", file=stdout)
    return 0


def _run(work, dst):
    """work()'s result, or the exit code after a one-line message: 1 for refused input or a write
    error, 130 for Ctrl-C, 128 + signal for SIGTERM/SIGHUP. The unfinished output is always removed."""
    try:
        with stop_signals(), warnings.catch_warnings():  # catch_warnings restores the default printer on exit
            warnings.showwarning = _print_warning  # a lossy cast, a killed run's leftovers removed: one line each
            return work()
    except ConversionError as e:  # the base of every error glm4v_conversion raises for a refused input
        print(f"glm4v-convert: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # while writing: ENOSPC, EIO, a quota...
        print(f"glm4v-convert: error: {e.filename or dst}: {os_reason(e)}; {dst} was not written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"glm4v-convert: interrupted; {dst} was not written", file=sys.stderr)
        return 130
    except Stopped as e:
        print(f"glm4v-convert: stopped by {signal.Signals(e.signum).name}; {dst} was not written", file=sys.stderr)
        return 128 + e.signum


@contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Stopped (once: a second one during the clean-up is ignored)."""
    def stop(signum, frame):
        for s in names:
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(signum)

    names = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None))
             if s is not None and signal.getsignal(s) is not signal.SIG_IGN]  # under nohup, SIGHUP stays ignored
    saved = {s: signal.signal(s, stop) for s in names}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def _torch_dtype(name: str | None):
    import torch
    return None if name is None else getattr(torch, name)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"glm4v-convert: warning: {message}", file=sys.stderr)


def parse_size(text: str) -> int:
    """'5GB' -> 5e9, '500MB', '2GiB' -> 2*2^30, '1000' -> 1000 bytes (the units transformers accepts)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*((?:[KMGT]i?)?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (try 5GB, 500MB or 2GiB)")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return size
