"""`glm4v adapter`: convert LoRA adapters between the glm4v and the PEFT format, or merge them into a base.

    glm4v adapter convert IN OUT --to peft|glm4v [--checkpoint BASE]
    glm4v adapter merge --adapter IN --out OUT [--checkpoint BASE] [--dtype auto|float32|bfloat16|float16]

IN is a PEFT folder, a glm4v adapter file or a `glm4v finetune --out` folder; BASE (default: the bundled
demo checkpoint) is the checkpoint the adapters were trained on: its config gives the shapes, the fused
layers and the HF names. `convert` reads no weights; a PEFT OUT is a folder that peft's
PeftModel.from_pretrained and vLLM's --lora-modules load, a glm4v OUT one adapter.safetensors file.
`merge` writes OUT, an HF-layout checkpoint holding BASE's weights plus the adapters' updates (summed in
fp32, stored in --dtype; auto: the base's own, and over a quantized base its float dtype, dequantized
first, as `glm4v finetune --save-merged`). Everything is checked before any weight is read; OUT must not
exist. Exit status: 0 done, 1 a refused input (one line), 2 a usage error, 130 Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from glm4v_conversion import __version__

PROG = "glm4v adapter"
FORMATS = ("peft", "glm4v")  # glm4v_core.transforms.adapter_files.ADAPTER_FORMATS
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Convert LoRA adapters (glm4v file <-> PEFT folder) or merge "
                                "them into a base checkpoint.",
                                epilog="exit status: 0 done, 1 a refused input (one line), 2 a usage error, "
                                       "130 Ctrl-C.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = p.add_subparsers(dest="action", required=True, metavar="{convert,merge}")
    convert = commands.add_parser("convert", help="write the adapters in the other format (no weight is read)")
    convert.add_argument("src", type=Path, metavar="IN", help="a PEFT folder, a glm4v adapter file or a finetune OUT")
    convert.add_argument("dst", type=Path, metavar="OUT", help="the folder (peft) or file (glm4v) to write; must not "
                         "exist")
    convert.add_argument("--to", choices=FORMATS, required=True, help="the format of OUT (required)")
    merge = commands.add_parser("merge", help="write BASE with the adapters merged in, as an HF-layout checkpoint")
    merge.add_argument("--adapter", type=Path, required=True, metavar="IN", help="a PEFT folder, a glm4v adapter "
                       "file or a finetune OUT (required)")
    merge.add_argument("--out", type=Path, required=True, help="the checkpoint folder to write; must not exist "
                       "(required)")
    merge.add_argument("--dtype", choices=DTYPE_NAMES, default="auto", help="stored dtype of OUT; auto: the base's "
                       "own (a quantized base: the float dtype it was made from) (default: %(default)s)")
    for sub in (convert, merge):
        sub.add_argument("--checkpoint", type=Path, default=None, help="the base checkpoint the adapters belong to: "
                         "DIR or ORG/NAME[@REVISION] (default: the bundled demo checkpoint)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from glm4v_core.errors import REFUSED  # lazy: --help and usage errors answer without torch
    try:
        return convert(args) if args.action == "convert" else merge(args)
    except REFUSED as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted (nothing was written)", file=sys.stderr)
        return 130


def checked_adapters(args: argparse.Namespace, src: Path):
    """(base folder, its config, the adapters' path, the adapters), checked on a meta-device model."""
    from glm4v_core.checkpoint import build_meta_model, resolve_checkpoint
    from glm4v_core.config import GLM4VConfig
    from glm4v_core.errors import CLIError
    from glm4v_core.transforms.adapter_files import check_adapters, resolve_adapter
    from glm4v_core.transforms.lora import LoRAError
    checkpoint = resolve_checkpoint(args.checkpoint)
    config = GLM4VConfig.from_json(checkpoint / "config.json")
    try:
        path = resolve_adapter(src)
        return checkpoint, config, path, check_adapters(build_meta_model(config), path)
    except LoRAError as e:
        raise CLIError(f"{src}: {e} (checked against the base {checkpoint}; --checkpoint names another)") from None


def refuse_existing(path: Path, flag: str) -> None:
    from glm4v_core.errors import CLIError
    if path.exists() or path.is_symlink():
        raise CLIError(f"{flag} {path} already exists; remove it or choose another")


def convert(args: argparse.Namespace) -> int:
    from glm4v_core.errors import CLIError
    from glm4v_core.transforms.adapter_files import write_adapters
    from glm4v_core.transforms.lora import LoRAError
    checkpoint, config, _, adapters = checked_adapters(args, args.src)
    refuse_existing(args.dst, "OUT")
    base = str(args.checkpoint) if args.checkpoint is not None else None
    try:
        written = write_adapters(adapters, args.dst, args.to, config, base)
    except LoRAError as e:
        raise CLIError(f"{args.src}: {e}") from None
    print(f"{PROG}: wrote {written} ({len(adapters.layers)} adapted layers, {args.to} format)", file=sys.stderr)
    return 0


def merge(args: argparse.Namespace) -> int:
    from glm4v_core.checkpoint import DTYPES, load_model, save_model
    from glm4v_core.training import export
    from glm4v_core.transforms import lora
    from glm4v_core.transforms.adapter_files import load_adapters
    checkpoint, _, path, _ = checked_adapters(args, args.adapter)
    refuse_existing(args.out, "--out")
    provenance = export.base_provenance(checkpoint)
    chosen = DTYPES.get(args.dtype)
    dtype = chosen or DTYPES.get(provenance.get("dtype") or stored_dtype(checkpoint), DTYPES["float32"])
    model = load_model(checkpoint, dtype=dtype)
    load_adapters(model, path)
    dequantized = export.merged_dtype(model, provenance)  # a quantized base: a float checkpoint, dequantized first
    if dequantized is not None:
        model = export.merge_dequantized(model, chosen or dequantized)
    else:
        model = lora.remove_lora(model)  # merged: W + scale * B A, summed in fp32, stored in the weights' dtype
    save_model(model, args.out, layout="hf", dtype=chosen or dequantized or dtype)
    print(f"{PROG}: wrote {args.out} ({checkpoint} with the adapters of {path} merged in)", file=sys.stderr)
    return 0


def stored_dtype(checkpoint: Path) -> str | None:
    """config.json's torch_dtype (HF folders say how their weights are stored there)."""
    try:
        return json.loads((checkpoint / "config.json").read_text()).get("torch_dtype")
    except (OSError, ValueError, AttributeError):
        return None
