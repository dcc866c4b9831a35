"""The `glm4v make-reference` command: its flags, its one-line errors and exit codes (0 written, 1
refused, 2 usage, 130 Ctrl-C with nothing written). The recording itself is parity/make_reference.py.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from glm4v_conversion.atomic import LeftoversWarning
from glm4v_conversion.files import os_reason
from glm4v_core.checkpoint import DTYPES
from glm4v_core.errors import REFUSED
from glm4v_core.parity.capture import CaptureError
from glm4v_core.parity.make_reference import DEFAULT_PROMPT, Case, make_reference
from glm4v_core.parity.preflight import size
from glm4v_core.parity.reference import REFERENCE_DTYPES

PROG = "glm4v make-reference"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="glm4v make-reference",
        description="Run the checkpoint's own HF remote code (transformers, trust_remote_code) on prompts built by "
                    "glm4v-core and record a parity reference (reference.safetensors + reference.json).")
    p.add_argument("--checkpoint", type=Path, required=True, help="HF checkpoint holding the remote code: DIR or "
                   "ORG/NAME[@REVISION] from the local Hugging Face cache (glm4v download)")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder (created; an existing one is replaced only with --overwrite, and only if "
                        "make-reference wrote it)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the checkpoint folder's own Python code (the modules config.json's auto_map names and "
                        "what they import): required, as transformers' trust_remote_code; read that code first")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a user message; repeat for several cases (default: one 'Describe this image.' per image; "
                        "a text prompt for a text-only checkpoint)")
    p.add_argument("--image", action="append", default=[], metavar="IMG",
                   help="image of the prompt at the same position; 'none' for a text-only case; "
                        "prompts after the last --image are text-only (a text-only checkpoint takes 'none' only)")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.model (default: CHECKPOINT/tokenizer.model)")
    p.add_argument("--dtype", choices=REFERENCE_DTYPES, default="float32",
                   help="reference dtype (default float32: parity judges fp32 within 1e-4; a bfloat16 recording "
                        "is shown, not judged)")
    p.add_argument("--device", default="cpu", help="torch device for the reference (default cpu)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens to record per case (default 16)")
    p.add_argument("--layers", type=int, default=None, metavar="N",
                   help="record the hidden states of the first N decoder layers only (default: all)")
    p.add_argument("--with-bf16", action="store_true",
                   help="after the float32 pass, run the reference cast to bfloat16 too and record its logits, image "
                        "embeddings, greedy tokens and error: then `glm4v parity --dtype bfloat16` judges our bf16 run")
    p.add_argument("--force", action="store_true",
                   help="run even if the memory or disk-space estimate exceeds what is available")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output folder that make-reference wrote (reference.safetensors + "
                        "reference.json and nothing else) or an empty one; any other folder is refused")
    return p


def main(argv: list[str] | None = None) -> int:
    """The command: 0 written, 1 refused (one line), 2 usage (argparse), 130 Ctrl-C (one line, nothing written)."""
    written = None
    try:
        with warnings.catch_warnings():  # restores the printer on exit
            warnings.simplefilter("always", LeftoversWarning)
            warnings.showwarning = _print_warning(warnings.showwarning)
            args = build_parser().parse_args(argv)
            try:
                written = make_reference(args.checkpoint, args.out, cases_from_args(args.prompt, args.image),
                                         dtype=DTYPES[args.dtype], device=args.device,
                                         max_new_tokens=args.max_new_tokens, layers=args.layers,
                                         tokenizer=args.tokenizer, force=args.force, overwrite=args.overwrite,
                                         with_bf16=args.with_bf16, trust_remote_code=args.trust_remote_code)
            except (*REFUSED, FileNotFoundError) as e:  # a refused input: exit 1, as every glm4v command
                print(f"{PROG}: error: {e}", file=sys.stderr)
                return 1
            except OSError as e:  # an I/O error (a full disk is a CaptureError already); staging removed the rest
                print(f"{PROG}: error: {e.filename or args.out}: {os_reason(e)}; nothing was written", file=sys.stderr)
                return 1
            tensors = written / "reference.safetensors"
            print(f"wrote {tensors} ({size(tensors.stat().st_size)}) and {written / 'reference.json'}\n"
                  f"compare: glm4v parity --checkpoint {args.checkpoint} --reference {tensors}")
            return 0
    except KeyboardInterrupt:  # the staging folder is gone already (glm4v_conversion.atomic.staging)
        done = f" after writing {written}" if written is not None else "; nothing was written"
        print(f"\n{PROG}: interrupted{done}", file=sys.stderr)
        return 130


def _print_warning(default):
    """The leftovers report as one `glm4v make-reference: warning: ...` line; other warnings as Python prints them."""
    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, LeftoversWarning):
            print(f"{PROG}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)
    return show


def cases_from_args(prompts: list[str], images: list[str]) -> list[Case]:
    """Prompt i goes with image i ('none': no image); without prompts, one default prompt per image
    (DEFAULT_PROMPT with an image; None without: make_reference then picks the checkpoint's default,
    a text prompt for a text-only checkpoint)."""
    defaulted = not prompts
    if defaulted:
        prompts = ["-"] * max(1, len(images))
    if len(images) > len(prompts):
        raise CaptureError(f"{len(images)} --image flags for {len(prompts)} --prompt flags: give one prompt per image "
                             "(use --image none for a text-only prompt among image prompts)")
    cases = []
    for i, prompt in enumerate(prompts):
        image = images[i] if i < len(images) else "none"
        if not prompt.strip():
            raise CaptureError(f"--prompt number {i + 1} is empty")
        path = None if image.lower() == "none" else Path(image)
        if path is not None and not path.is_file():
            raise CaptureError(f"--image {image}: no such file")
        cases.append(Case(f"p{i:02d}", (DEFAULT_PROMPT if path else None) if defaulted else prompt, path))
    return cases


