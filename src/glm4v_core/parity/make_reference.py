"""`glm4v make-reference`: run a checkpoint's own HF remote code and record what `glm4v parity` compares.

    glm4v make-reference --checkpoint DIR --out REF --trust-remote-code [--prompt TEXT ...] [--image IMG|none ...]
                         [--dtype float32|bfloat16] [--with-bf16] [--device DEV] [--max-new-tokens N] [--layers N]
                         [--overwrite] [--force]

The checkpoint folder ships the reference implementation (`modeling_chatglm.py`, `visual.py`, ...,
named by `auto_map` in its config.json). It is loaded through transformers with
`trust_remote_code` and run unchanged: forward hooks on its modules capture the intermediate
tensors (vision stages, image embeddings, the rotary rows it used, each decoder layer's output),
never an edit of its code. The inputs are built by glm4v_core (tokenizer, chat template, image
preprocessing), so the reference and our model see identical token ids and pixels.

Running a folder's code needs consent: `--trust-remote-code` (the HF convention); without it the
command names the files that would run (the auto_map modules and what they import relatively) and
stops. auto_map entries must name modules of the folder itself: code in another repository
(`org/repo--module.Class`), paths out of the folder and files that are not there are refused.

Each prompt is one case (batch of one, no padding), with the image given at the same position
among the --image flags (`none` for a text-only case). A text-only GLM-4 checkpoint (glm-4-9b-chat:
no vision_config) takes text-only cases only: its remote code's forward has no `images` argument,
so `images=` is passed only for a case with an image, and no vision module is hooked. The output folder holds
`reference.safetensors` + `reference.json` in the fixtures' format; stored tensors go to disk as
they are captured and are assembled into the final file at the end, all inside a hidden staging
folder beside `--out` that is renamed into place when complete (glm4v_conversion.atomic: its lock
keeps a second writer off `--out`, and the staging folders a killed run left are removed and
reported by the next run). `--overwrite` replaces only a folder make-reference wrote (exactly
`reference.safetensors` + `reference.json`, both saying so) or an empty one; a path that is not a
folder (a file, FIFO, device, symlink) is never written through. Ctrl-C: exit 130, nothing written.

transformers is imported here only, inside the functions, never by the rest of glm4v_core.
The hooks and the disk spill live in capture.py.
"""
from __future__ import annotations

import hashlib
import json
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from glm4v_conversion.atomic import no_space_named, staging
from glm4v_core.config import GLM4VConfig
from glm4v_core.parity.capture import VISION_OUT, CaptureError, Hooks, SpillWriter
from glm4v_core.parity.preflight import (
    GENERATOR,
    check_out,
    disk_report,
    memory_report,
    remote_code_files,
    writer_lock,
)
from glm4v_core.processing.chat import build_inputs

TRANSFORMERS_VERSION = "4.44.2"  # the version the GLM-4V remote code was written and checked against
INSTALL_HINT = "pip install -e '.[reference]'  (transformers==" + TRANSFORMERS_VERSION + ")"
DEFAULT_PROMPT = "Describe this image."  # an image case's default (and a text case's on a GLM-4V checkpoint)
DEFAULT_TEXT_PROMPT = "Write one sentence about the sea."  # a text-only checkpoint's default


@dataclass
class Case:
    name: str
    prompt: str | None  # None: the checkpoint's default (default_prompt)
    image: Path | None


def default_prompt(config: GLM4VConfig) -> str:
    """The prompt of a case given none: a text prompt for a text-only checkpoint."""
    return DEFAULT_PROMPT if config.has_vision else DEFAULT_TEXT_PROMPT


def resolve_cases(cases: list[Case], config: GLM4VConfig) -> list[Case]:
    """`cases` with their default prompts filled in; an image on a text-only checkpoint is refused."""
    if not config.has_vision:
        with_image = [c.name for c in cases if c.image is not None]
        if with_image:
            raise CaptureError(f"case(s) {', '.join(with_image)} have an image, but the checkpoint is text-only "
                               "(config.json has no vision_config): give --image none or no --image")
    return [Case(c.name, default_prompt(config) if c.prompt is None else c.prompt, c.image) for c in cases]


# ---------------------------------------------------------------- command line









# ---------------------------------------------------------------- the run

def make_reference(checkpoint: Path, out: Path, cases: list[Case], dtype: torch.dtype = torch.float32,
                   device: str = "cpu", max_new_tokens: int = 16, layers: int | None = None,
                   tokenizer: Path | None = None, force: bool = False, overwrite: bool = False,
                   with_bf16: bool = False, trust_remote_code: bool = False) -> Path:
    """Record the reference's outputs for `cases` into the folder `out`; returns `out`.

    trust_remote_code must be True for the checkpoint's own code to run (refused otherwise, naming
    its files); overwrite replaces only a folder make-reference wrote (see check_out)."""
    from glm4v_core.checkpoint import check_device, resolve_checkpoint
    from glm4v_core.processing.tokenizer import resolve_tokenizer

    checkpoint = resolve_checkpoint(Path(checkpoint))
    config = GLM4VConfig.from_json(checkpoint / "config.json")
    raw_config = json.loads((checkpoint / "config.json").read_text())
    out = Path(out)
    check_out(out, overwrite)  # early; again under the lock, and once more before the new folder goes in
    if max_new_tokens < 1:
        raise CaptureError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if layers is not None and not 0 <= layers <= config.num_layers:
        raise CaptureError(f"--layers must be in 0..{config.num_layers} (the checkpoint's decoder layers), "
                           f"got {layers}")
    if with_bf16 and dtype != torch.float32:
        raise CaptureError("--with-bf16 adds a bf16 pass to a float32 recording; drop it or use --dtype float32")
    n_layers = config.num_layers if layers is None else layers
    cases = resolve_cases(cases, config)
    code = remote_code_files(checkpoint, raw_config)
    if not trust_remote_code:
        raise CaptureError(f"make-reference runs the Python code of {checkpoint} through transformers: "
                           f"{', '.join(p.name for p in code)} (the modules config.json's auto_map names and what "
                           "they import); read it, then pass --trust-remote-code to run it "
                           "(trust_remote_code=True in Python)")
    print(f"make-reference: --trust-remote-code: running the code of {checkpoint}: "
          f"{', '.join(p.name for p in code)}", file=sys.stderr)
    device = str(check_device(device))
    tok = resolve_tokenizer(tokenizer, checkpoint, config)
    inputs = {c.name: prepare_case(c, tok, config, raw_config, max_new_tokens) for c in cases}
    transformers = import_transformers()  # before the slow part: a missing extra fails fast
    print(memory_report(checkpoint, config, dtype, device, inputs, force, with_bf16), file=sys.stderr)
    print(disk_report(out, config, inputs, n_layers, max_new_tokens, with_bf16, force), file=sys.stderr)

    # one writer per --out (a lock beside it; whoever takes it removes a killed run's staging folders
    # and says so); the spill lives inside the staging folder, so a killed run leaves nothing else,
    # and a disk that fills up anyway is a CaptureError naming --out, with the staging folder gone
    with no_space_named(out, CaptureError), writer_lock(out), staging(out) as final:
        check_out(out, overwrite)
        start = time.perf_counter()
        model = load_reference(transformers, checkpoint, dtype, device)
        loaded = time.perf_counter() - start
        spill = SpillWriter(final / "spill")
        meta = new_meta(checkpoint, code, dtype, device, transformers.__version__, n_layers, config.num_layers)
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
                record_bf16(model, cases, inputs, spill, meta, max_new_tokens, device, config.has_vision)
        del model
        meta["seconds"] = {"load": round(loaded, 1), "run": round(time.perf_counter() - start - loaded, 1)}
        meta["tensors"] = spill.describe()
        spill.finish(final / "reference.safetensors", {"generator": GENERATOR})
        write_json(final / "reference.json", meta)
        shutil.rmtree(final / "spill")
        check_out(out, overwrite)  # the run took a while: `out` is still either absent or a reference
    return out  # `out` was always either the old folder or the new one




def write_json(path: Path, meta: dict) -> None:
    path.write_text(json.dumps(meta, indent=1) + "\n")


# ---------------------------------------------------------------- the destination





# ---------------------------------------------------------------- the checkpoint's code









def record_bf16(model, cases: list[Case], inputs: dict, spill: SpillWriter, meta: dict, max_new_tokens: int,
                device: str, vision: bool = True) -> None:
    """Cast the reference to bf16 in place (the weights were bf16 in the checkpoint: no new rounding)
    and record each case again; the largest errors become the recording's `tolerances_observed`
    (without an image key for a text-only checkpoint: parity asks for one only of a reference with images)."""
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
    observed = {"bf16_vs_fp32_logits_a_maxabs": max(e[0] for e in errors)}
    if vision:
        observed["bf16_vs_fp32_image_embeds_a_maxabs"] = max(e[1] for e in errors)
    meta["tolerances_observed"] = {**observed,
                                   "note": "largest over this recording's cases (key names as in the fixtures)"}


def prepare_case(case: Case, tokenizer, config: GLM4VConfig, raw_config: dict,
                 max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Our token ids (1, L) and pixels (1, 3, S, S) or None, checked against the reference's limits
    (the tokenizer's own chat template: glm4v or glm4-chat)."""
    message = {"role": "user", "content": case.prompt, **({"image": str(case.image)} if case.image else {})}
    inputs = build_inputs(tokenizer, [message], config.vision.image_size if config.has_vision else None)
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
    """The checkpoint's own model class (config.json auto_map), in `dtype`, eval mode, on `device`.

    Runs the folder's code: the caller has the user's consent (make_reference's trust_remote_code).
    The auto_map is checked here too (remote_code_files), so no other repository's code is fetched."""
    remote_code_files(checkpoint, json.loads((checkpoint / "config.json").read_text()))
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
        out = model(input_ids=ids, **image_kwargs(images), use_cache=True, return_dict=True)
    finally:
        hooks.remove()
    hooks.check()
    spill.add(f"position_ids_{case}", hooks.position_ids())
    spill.add(f"logits_{case}", out.logits)
    tokens, step_logits = greedy(model, out, input_ids.shape[1], max_new_tokens, device)
    spill.add(f"gen_tokens_{case}", torch.tensor([tokens]))
    spill.add(f"gen_step_logits_{case}", step_logits)
    return tokens


def image_kwargs(images: torch.Tensor | None) -> dict:
    """`images=` for a case with an image only: glm-4-9b-chat's forward has no such argument."""
    return {} if images is None else {"images": images}


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
    handle = None
    if pixels is not None:  # a text-only checkpoint's reference has no vision module
        vision = model.get_submodule(VISION_OUT)
        handle = vision.register_forward_hook(lambda _m, _a, output: captured.append(output))
    try:
        out = model(input_ids=input_ids.to(device), **image_kwargs(None if pixels is None else pixels.to(device)),
                    use_cache=True, return_dict=True)
    finally:
        if handle is not None:
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









# ---------------------------------------------------------------- output

def new_meta(checkpoint: Path, code_files: list[Path], dtype: torch.dtype, device: str, transformers_version: str,
             n_layers: int, total_layers: int) -> dict:
    code = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(code_files)}
    return {
        "generator": GENERATOR,
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
