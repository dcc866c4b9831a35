"""`glm4v make-reference`: run a checkpoint's own HF remote code and record what `glm4v parity` compares.

    glm4v make-reference --checkpoint DIR --out REF [--prompt TEXT ...] [--image IMG|none ...]
                         [--dtype float32|bfloat16] [--with-bf16] [--device DEV] [--max-new-tokens N] [--layers N]

The checkpoint folder ships the reference implementation (`modeling_chatglm.py`, `visual.py`, ...,
named by `auto_map` in its config.json). It is loaded through transformers with
`trust_remote_code` and run unchanged: forward hooks on its modules capture the intermediate
tensors (vision stages, image embeddings, the rotary rows it used, each decoder layer's output),
never an edit of its code. The inputs are built by glm4v_core (tokenizer, chat template, image
preprocessing), so the reference and our model see identical token ids and pixels.

Each prompt is one case (batch of one, no padding), with the image given at the same position
among the --image flags (`none` for a text-only case). The output folder holds
`reference.safetensors` + `reference.json` in the fixtures' format; stored tensors go to disk as
they are captured and are assembled into the final file at the end (temp folder, then rename).

transformers is imported here only, inside the functions, never by the rest of glm4v_core.
The hooks and the disk spill live in reference_capture.py.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from glm4v_conversion.atomic import staging
from glm4v_conversion.safetensors_io import list_tensors
from glm4v_core.checkpoint import DTYPES
from glm4v_core.config import GLM4VConfig
from glm4v_core.errors import REFUSED
from glm4v_core.parity.capture import VISION_OUT, CaptureError, Hooks, SpillWriter
from glm4v_core.processing.chat import build_inputs

TRANSFORMERS_VERSION = "4.44.2"  # the version the GLM-4V remote code was written and checked against
INSTALL_HINT = "pip install -e '.[reference]'  (transformers==" + TRANSFORMERS_VERSION + ")"
REFERENCE_DTYPES = ("float32", "bfloat16")  # what a reference records (float16 is not compared)
DEFAULT_PROMPT = "Describe this image."
GiB = 1024 ** 3


@dataclass
class Case:
    name: str
    prompt: str
    image: Path | None


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="glm4v make-reference",
        description="Run the checkpoint's own HF remote code (transformers, trust_remote_code) on prompts built by "
                    "glm4v-core and record a parity reference (reference.safetensors + reference.json).")
    p.add_argument("--checkpoint", type=Path, required=True, help="HF checkpoint folder holding the remote code")
    p.add_argument("--out", type=Path, required=True, help="output folder (created; replaced only with --overwrite)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a user message; repeat for several cases (default: one 'Describe this image.' per image)")
    p.add_argument("--image", action="append", default=[], metavar="IMG",
                   help="image of the prompt at the same position; 'none' for a text-only case; "
                        "prompts after the last --image are text-only")
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
    p.add_argument("--force", action="store_true", help="run even if the memory estimate exceeds what is available")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = make_reference(args.checkpoint, args.out, cases_from_args(args.prompt, args.image),
                             dtype=DTYPES[args.dtype], device=args.device, max_new_tokens=args.max_new_tokens,
                             layers=args.layers, tokenizer=args.tokenizer, force=args.force, overwrite=args.overwrite,
                             with_bf16=args.with_bf16)
    except (*REFUSED, FileNotFoundError) as e:  # a refused input: exit 1, as every glm4v command
        print(f"glm4v make-reference: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out / 'reference.safetensors'} ({size((out / 'reference.safetensors').stat().st_size)}) and "
          f"{out / 'reference.json'}\n"
          f"compare: glm4v parity --checkpoint {args.checkpoint} --reference {out / 'reference.safetensors'}")
    return 0


def cases_from_args(prompts: list[str], images: list[str]) -> list[Case]:
    """Prompt i goes with image i ('none': no image); without prompts, one default prompt per image."""
    if not prompts:
        prompts = [DEFAULT_PROMPT] * max(1, len(images))
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
        cases.append(Case(f"p{i:02d}", prompt, path))
    return cases


# ---------------------------------------------------------------- the run

def make_reference(checkpoint: Path, out: Path, cases: list[Case], dtype: torch.dtype = torch.float32,
                   device: str = "cpu", max_new_tokens: int = 16, layers: int | None = None,
                   tokenizer: Path | None = None, force: bool = False, overwrite: bool = False,
                   with_bf16: bool = False) -> Path:
    """Record the reference's outputs for `cases` into the folder `out`; returns `out`."""
    from glm4v_core.checkpoint import check_device, resolve_checkpoint
    from glm4v_core.processing.tokenizer import resolve_tokenizer

    checkpoint = resolve_checkpoint(Path(checkpoint))
    config = GLM4VConfig.from_json(checkpoint / "config.json")
    raw_config = json.loads((checkpoint / "config.json").read_text())
    out = Path(out)
    if out.exists() and not overwrite:
        raise CaptureError(f"output folder {out} exists; pass --overwrite to replace it")
    if max_new_tokens < 1:
        raise CaptureError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if layers is not None and not 0 <= layers <= config.num_layers:
        raise CaptureError(f"--layers must be in 0..{config.num_layers} (the checkpoint's decoder layers), "
                           f"got {layers}")
    if with_bf16 and dtype != torch.float32:
        raise CaptureError("--with-bf16 adds a bf16 pass to a float32 recording; drop it or use --dtype float32")
    n_layers = config.num_layers if layers is None else layers
    device = str(check_device(device))
    tok = resolve_tokenizer(tokenizer, checkpoint, config)
    inputs = {c.name: prepare_case(c, tok, config, raw_config, max_new_tokens) for c in cases}
    transformers = import_transformers()  # before the slow part: a missing extra fails fast
    print(memory_report(checkpoint, config, dtype, device, inputs, force, with_bf16), file=sys.stderr)

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # the spill, beside `out`
    try:
        start = time.perf_counter()
        model = load_reference(transformers, checkpoint, dtype, device)
        loaded = time.perf_counter() - start
        spill = SpillWriter(work / "spill")
        meta = new_meta(checkpoint, dtype, device, transformers.__version__, n_layers, config.num_layers)
        from glm4v_core.parity.exact_kernels import (
            reference_kernels,  # the same exact kernels parity uses (no TF32, no oneDNN bf16)
        )
        with reference_kernels(dtype), torch.no_grad():
            for case in cases:
                ids, pixels = inputs[case.name]
                print(f"reference: case {case.name} ({ids.shape[1]} tokens"
                      f"{', image ' + str(case.image) if case.image else ''})", file=sys.stderr)
                tokens = record_case(model, case.name, ids, pixels, spill, n_layers, max_new_tokens, device)
                kind = "image + text" if case.image else "text only"
                meta["inputs"][case.name] = {"input_ids": ids[0].tolist(), "prompt": case.prompt,
                                             "image": str(case.image) if case.image else None,
                                             "desc": f"{kind}: {case.prompt[:60]}"}
                meta["generation"][case.name] = tokens
            if with_bf16:
                record_bf16(model, cases, inputs, spill, meta, max_new_tokens, device)
        del model
        meta["seconds"] = {"load": round(loaded, 1), "run": round(time.perf_counter() - start - loaded, 1)}
        meta["tensors"] = spill.describe()
        with staging(out) as final:  # `out` is always either the old folder or the new one
            spill.finish(final / "reference.safetensors", {"generator": "glm4v make-reference"})
            (final / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def record_bf16(model, cases: list[Case], inputs: dict, spill: SpillWriter, meta: dict, max_new_tokens: int,
                device: str) -> None:
    """Cast the reference to bf16 in place (the weights were bf16 in the checkpoint: no new rounding)
    and record each case again; the largest errors become the recording's `tolerances_observed`."""
    from glm4v_core.parity.exact_kernels import reference_kernels
    model.to(torch.bfloat16)
    errors = []
    with reference_kernels(torch.bfloat16):
        for case in cases:
            ids, pixels = inputs[case.name]
            print(f"reference in bfloat16: case {case.name}", file=sys.stderr)
            tokens, logits_error, image_error = record_bf16_case(model, case.name, ids, pixels, spill, max_new_tokens,
                                                                 device)
            meta["generation"][f"{case.name}_bf16"] = tokens
            errors.append((logits_error, image_error))
    # the key names are the fixtures' (their case a); here: the largest over this recording's cases
    meta["tolerances_observed"] = {"bf16_vs_fp32_logits_a_maxabs": max(e[0] for e in errors),
                                   "bf16_vs_fp32_image_embeds_a_maxabs": max(e[1] for e in errors),
                                   "note": "largest over this recording's cases (key names as in the fixtures)"}


def prepare_case(case: Case, tokenizer, config: GLM4VConfig, raw_config: dict,
                 max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Our token ids (1, L) and pixels (1, 3, S, S) or None, checked against the reference's limits."""
    message = {"role": "user", "content": case.prompt, **({"image": str(case.image)} if case.image else {})}
    inputs = build_inputs(tokenizer, [message], config.vision.image_size)
    last_position = inputs.input_ids.shape[1] + max_new_tokens - 1  # positions are unspliced token indices
    seq_length = raw_config.get("seq_length")
    if seq_length is not None and last_position >= seq_length:
        raise CaptureError(f"case {case.name}: the prompt ({inputs.input_ids.shape[1]} tokens) plus "
                           f"--max-new-tokens {max_new_tokens} needs rotary position {last_position}, but the "
                           f"reference code builds its rotary table for config.json seq_length = {seq_length} "
                           "positions")
    return inputs.input_ids, inputs.pixel_values


def import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise CaptureError(f"glm4v make-reference runs the checkpoint's HF remote code and needs transformers "
                             f"({e}); install it with: {INSTALL_HINT}") from None
    if transformers.__version__ != TRANSFORMERS_VERSION:
        print(f"warning: transformers {transformers.__version__} is installed; the GLM-4V remote code was written "
              f"for {TRANSFORMERS_VERSION} ({INSTALL_HINT})", file=sys.stderr)
    return transformers


def load_reference(transformers, checkpoint: Path, dtype: torch.dtype, device: str):
    """The checkpoint's own model class (config.json auto_map), in `dtype`, eval mode, on `device`."""
    auto_map = json.loads((checkpoint / "config.json").read_text()).get("auto_map", {})
    if "AutoModelForCausalLM" not in auto_map:
        raise CaptureError(f"{checkpoint / 'config.json'} has no auto_map.AutoModelForCausalLM: this folder does not "
                             "ship the HF remote code (modeling_chatglm.py) that make-reference runs")
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, torch_dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def record_case(model, case: str, input_ids: torch.Tensor, pixels: torch.Tensor | None, spill: SpillWriter,
                n_layers: int, max_new_tokens: int, device: str) -> list[int]:
    """One prompt through the reference: the prefill under hooks, then greedy decoding with its KV cache."""
    ids = input_ids.to(device)
    images = None if pixels is None else pixels.to(device)
    spill.add(f"input_ids_{case}", input_ids)
    if pixels is not None:
        spill.add(f"pixel_values_{case}", pixels)
    hooks = Hooks(model, case, spill, n_layers, with_image=pixels is not None)
    try:
        out = model(input_ids=ids, images=images, use_cache=True, return_dict=True)
    finally:
        hooks.remove()
    hooks.check()
    spill.add(f"position_ids_{case}", hooks.position_ids())
    spill.add(f"logits_{case}", out.logits)
    tokens, step_logits = greedy(model, out, input_ids.shape[1], max_new_tokens, device)
    spill.add(f"gen_tokens_{case}", torch.tensor([tokens]))
    spill.add(f"gen_step_logits_{case}", step_logits)
    return tokens


def greedy(model, prefill, prompt_len: int, max_new_tokens: int, device: str) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens after a prefill output, and each step's logits (1, N, V) in fp32.

    The reference's own forward with `past_key_values`, one token a step, argmax, EOS stopping off
    (what its generate(do_sample=False) does, minus stopping); the new token's position is its index
    in the unspliced token list, as its generation code counts."""
    step_logits = [prefill.logits[:, -1].float().cpu()]
    past = prefill.past_key_values
    tokens = [int(step_logits[-1].argmax(-1))]
    for k in range(1, max_new_tokens):
        position = torch.tensor([[prompt_len + k - 1]], device=device)
        step = model(input_ids=torch.tensor([[tokens[-1]]], device=device), position_ids=position,
                     past_key_values=past, use_cache=True, return_dict=True)
        past = step.past_key_values
        step_logits.append(step.logits[:, -1].float().cpu())
        tokens.append(int(step_logits[-1].argmax(-1)))
    return tokens, torch.stack(step_logits, dim=1)


def record_bf16_case(model, case: str, input_ids: torch.Tensor, pixels: torch.Tensor | None, spill: SpillWriter,
                     max_new_tokens: int, device: str) -> tuple[list[int], float, float]:
    """The same prompt through the reference cast to bf16 (after its fp32 pass): its logits, image
    embeddings and greedy tokens under the fixtures' `*_bf16` names, and its max-abs error against
    its own fp32 logits and image embeddings (0 when there is no image): the bound parity's bf16
    criteria are built on."""
    captured = []
    vision = model.get_submodule(VISION_OUT)
    handle = vision.register_forward_hook(lambda _m, _a, output: captured.append(output))
    try:
        out = model(input_ids=input_ids.to(device), images=None if pixels is None else pixels.to(device),
                    use_cache=True, return_dict=True)
    finally:
        handle.remove()
    spill.add(f"logits_{case}_bf16", out.logits)
    logits_error = (out.logits.float().cpu() - spill.read(f"logits_{case}")).abs().max().item()
    image_error = 0.0
    if pixels is not None:
        spill.add(f"image_embeds_{case}_bf16", captured[0])
        image_error = (captured[0].float().cpu() - spill.read(f"image_embeds_{case}")).abs().max().item()
    tokens, _ = greedy(model, out, input_ids.shape[1], max_new_tokens, device)
    spill.add(f"gen_tokens_{case}_bf16", torch.tensor([tokens]))
    return tokens, logits_error, image_error


# ---------------------------------------------------------------- memory

def memory_report(checkpoint: Path, config: GLM4VConfig, dtype: torch.dtype, device: str,
                  inputs: dict, force: bool, with_bf16: bool = False) -> str:
    """What the run needs, said before loading; an error if clearly more than the machine has."""
    n_params = sum(math.prod(info.shape) for info in list_tensors(checkpoint).values())
    weights = n_params * dtype.itemsize
    longest = max(ids.shape[1] - 3 + (config.vision.grid // 2) ** 2 + 2 if px is not None else ids.shape[1]
                  for ids, px in inputs.values())
    v = config.vision
    # the largest transients: the logits of every prompt position (kept in fp32 too), the ViT's
    # attention scores if the reference's SDPA falls back to its math path, one MLP activation
    activations = (longest * config.vocab_size * (dtype.itemsize + 4)
                   + v.num_heads * v.num_positions ** 2 * dtype.itemsize
                   + longest * 2 * config.ffn_hidden_size * dtype.itemsize)
    need = weights + activations
    lines = [f"make-reference: {count(n_params)} parameters in {str(dtype).removeprefix('torch.')}: "
             f"{size(weights)} of weights + ~{size(activations)} of activations (longest prompt {longest} positions)"]
    if dtype == torch.float32:
        lines.append(f"  (--dtype bfloat16 halves the weights to {size(n_params * 2)}; parity shows the errors of a "
                     "bf16 recording but judges fp32 ones)")
    if device == "cpu" and (dtype == torch.bfloat16 or with_bf16) and n_params > 1e9:
        lines.append("  warning: bf16 on the CPU runs ATen's own bf16 matmuls (oneDNN off, as bit-exact bf16 parity "
                     "needs), orders of magnitude slower than fp32 on most CPUs: use --device cuda for bf16")
    cpu = available_cpu_memory()
    # transformers without accelerate builds the model in CPU memory before .to(device)
    lines.append(f"  CPU memory available: {size(cpu)}" if cpu else "  CPU memory available: unknown")
    short = cpu is not None and weights + (0 if device.startswith("cuda") else activations) > cpu
    if device.startswith("cuda"):
        free = torch.cuda.mem_get_info(torch.device(device))[0]
        lines.append(f"  {device} memory free: {size(free)}")
        short = short or need > free
    if short and not force:
        raise CaptureError("\n".join(lines) + "\nnot enough memory for this run: use --dtype bfloat16, another "
                             "--device, or --force to try anyway")
    return "\n".join(lines)


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def size(nbytes: int) -> str:
    return f"{nbytes / GiB:.1f} GiB" if nbytes >= GiB else f"{nbytes / 2 ** 20:.1f} MiB"


def available_cpu_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------- output

def new_meta(checkpoint: Path, dtype: torch.dtype, device: str, transformers_version: str,
             n_layers: int, total_layers: int) -> dict:
    code = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(checkpoint.glob("*.py"))}
    return {
        "generator": "glm4v make-reference",
        "reference_code": code,  # sha256 of each remote-code file that ran
        "checkpoint": str(checkpoint.resolve()),
        "dtype": str(dtype).removeprefix("torch."),
        "device": device,
        "versions": {"torch": torch.__version__, "transformers": transformers_version,
                     "python": platform.python_version(), "threads": torch.get_num_threads()},
        "layers_recorded": n_layers,
        "num_layers": total_layers,
        "inputs": {},
        "generation": {"method": "greedy with the reference's KV cache, EOS stopping off"},
    }
