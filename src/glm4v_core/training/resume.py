"""What `glm4v finetune --resume` checks before it trusts a checkpoint (glm4v_core.training.state
writes and reads them): a resumed curve must be the one the interrupted run would have drawn.

- trainer.json is a JSON object with `step` and `total_steps` (integers, 0 <= step <= total),
  `args` (an object), `param_groups` (a list of objects) and `sources`: the sha256 fingerprints of
  what the run trained from. `base`: the base checkpoint's config.json (as parsed JSON) and the
  headers (names, dtypes, shapes, offsets) and sizes of its model*.safetensors files; `data` and
  `eval_data`: the whole --data and --eval-data files (the images they name are not hashed). A
  resume whose files differ is refused, naming which.
- Every stored tensor is read and checked against what it fills: its shape and dtype, finite
  values; optimizer keys are `<parameter>.<exp_avg | exp_avg_sq | step>`, all three or none per
  parameter; the RNG states are uint8 of the shape torch uses. A damaged checkpoint is a
  ResumeError naming the file and the key.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from glm4v_conversion.files import read_json_object
from glm4v_core.errors import GLM4VError


class ResumeError(GLM4VError):
    """A checkpoint that cannot be resumed by this run; the message says which file or argument."""


STATE_KEYS = {"step": int, "total_steps": int, "args": dict, "param_groups": list, "sources": dict}
KINDS = {int: "an integer >= 0", dict: "a JSON object", list: "a JSON list"}
SOURCES = ("base", "data", "eval_data")
OPTIMIZER_KEYS = ("exp_avg", "exp_avg_sq", "step")
HEADER_LIMIT = 100_000_000  # safetensors' own bound on a header


# -- what the run trained from ---------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def base_fingerprint(checkpoint: Path) -> str:
    """sha256 of config.json (parsed, so formatting does not count) and each model*.safetensors'
    name, size and header: content-based, and cheap (no weight is read)."""
    digest = hashlib.sha256()
    try:
        config = json.dumps(json.loads((checkpoint / "config.json").read_text()), sort_keys=True)
    except (OSError, UnicodeDecodeError, ValueError):
        config = ""
    digest.update(config.encode())
    for path in sorted(checkpoint.glob("model*.safetensors")):
        with open(path, "rb") as f:
            head = f.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            digest.update(f"{path.name}\0{path.stat().st_size}\0".encode() + head + f.read(min(size, HEADER_LIMIT)))
    return digest.hexdigest()


def sources(checkpoint: Path, data: Path, eval_data: Path | None) -> dict[str, str | None]:
    """The fingerprints a checkpoint's trainer.json keeps under `sources`."""
    return {"base": base_fingerprint(checkpoint), "data": sha256_file(data),
            "eval_data": sha256_file(eval_data) if eval_data is not None else None}


def check_sources(folder: Path, current: dict[str, str | None], args) -> None:
    """Refuse a resume whose base checkpoint, --data or --eval-data differ from the interrupted run's."""
    saved = read_state(folder)["sources"]
    what = {"base": f"the base checkpoint ({args.checkpoint or 'the bundled demo checkpoint'}: its config.json "
                    "or weight files)",
            "data": f"--data {args.data}", "eval_data": f"--eval-data {args.eval_data}"}
    changed = [f"{what[k]} (sha256 {str(saved.get(k))[:12]} -> {str(current[k])[:12]})" for k in SOURCES
               if saved.get(k) != current[k]]
    if changed:
        raise ResumeError(f"--resume {folder}: {'; '.join(changed)} differ from what the interrupted run trained "
                          "from (trainer.json 'sources'), so the curve could not continue; resume with the same "
                          "files or start a new run")


# -- trainer.json ---------------------------------------------------------------------------------

def read_state(folder: Path) -> dict:
    """trainer.json, checked key by key (see the module's docstring)."""
    path = folder / "trainer.json"
    state = read_json_object(path, "the run's state", ResumeError)
    for key, kind in STATE_KEYS.items():
        if key not in state:
            raise ResumeError(f"{path}: key {key!r} is missing (expected {KINDS.get(kind, kind.__name__)})")
        value = state[key]
        good = (type(value) is int and value >= 0) if kind is int else isinstance(value, kind)
        if not good:
            raise ResumeError(f"{path}: key {key!r} is {value!r}, expected {KINDS[kind]}")
    if state["step"] > state["total_steps"]:
        raise ResumeError(f"{path}: key 'step' is {state['step']}, above 'total_steps' {state['total_steps']}")
    if not all(isinstance(g, dict) for g in state["param_groups"]):
        raise ResumeError(f"{path}: key 'param_groups' must be a list of JSON objects")
    bad = [k for k in SOURCES if not isinstance(state["sources"].get(k), str | None) or
           (k != "eval_data" and state["sources"].get(k) is None)]
    if bad:
        raise ResumeError(f"{path}: key 'sources' lacks the sha256 of {bad} (expected strings: {list(SOURCES)})")
    return state


def check_groups(path: Path, saved: list[dict], optimizer: torch.optim.Optimizer) -> list[dict]:
    """The saved param groups, each key of the kind this optimizer uses; missing keys take its values."""
    current = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if len(saved) != len(current):
        raise ResumeError(f"{path}: key 'param_groups' holds {len(saved)} groups, this run's optimizer {len(current)}")
    for group, now in zip(saved, current, strict=True):
        for key, value in group.items():
            if key not in now:
                raise ResumeError(f"{path}: param_groups key {key!r} is unknown to this optimizer "
                                  f"(accepted: {sorted(now)})")
            if not same_kind(value, now[key]):
                raise ResumeError(f"{path}: param_groups key {key!r} is {value!r}, expected a value like "
                                  f"{now[key]!r}")
    return [{**now, **group} for group, now in zip(saved, current, strict=True)]


def same_kind(value, like) -> bool:
    if value is None or like is None:
        return True
    if isinstance(like, bool) or isinstance(value, bool):
        return isinstance(like, bool) and isinstance(value, bool)
    if isinstance(like, int | float):
        return isinstance(value, int | float) and math.isfinite(value)
    if isinstance(like, list | tuple):
        return (isinstance(value, list | tuple) and len(value) == len(like)
                and all(same_kind(v, x) for v, x in zip(value, like, strict=True)))
    return type(value) is type(like)


# -- tensors --------------------------------------------------------------------------------------

def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {n: f.get_tensor(n) for n in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ResumeError(f"{path} is not a readable safetensors file (truncated or replaced?): {e}") from None


def check_tensor(path: Path, name: str, stored: torch.Tensor, like: torch.Tensor) -> None:
    """`stored` fits the tensor it fills: same shape and dtype, every value finite."""
    if tuple(stored.shape) != tuple(like.shape):
        raise ResumeError(f"{path}: tensor {name!r} has shape {tuple(stored.shape)}, this run's is {tuple(like.shape)}")
    if stored.dtype != like.dtype:
        raise ResumeError(f"{path}: tensor {name!r} has dtype {stored.dtype}, this run's is {like.dtype}")
    if not bool(torch.isfinite(stored).all()):
        raise ResumeError(f"{path}: tensor {name!r} holds non-finite values")


def check_optimizer(path: Path, tensors: dict[str, torch.Tensor], names: list[str], params: list) -> None:
    """Keys `<parameter>.<exp_avg | exp_avg_sq | step>`, all three or none per parameter; moments of
    their parameter's shape and dtype, finite (exp_avg_sq >= 0); step a finite scalar >= 0."""
    index = {name: i for i, name in enumerate(names)}
    found: dict[str, set[str]] = {}
    for key in tensors:
        name, _, what = key.rpartition(".")
        if name not in index or what not in OPTIMIZER_KEYS:
            raise ResumeError(f"{path}: key {key!r} is not <parameter of this run>.<{' | '.join(OPTIMIZER_KEYS)}>")
        found.setdefault(name, set()).add(what)
    for name, keys in found.items():
        missing = [k for k in OPTIMIZER_KEYS if k not in keys]
        if missing:
            raise ResumeError(f"{path}: key {name}.{missing[0]} is missing (a parameter's state is "
                              f"{list(OPTIMIZER_KEYS)})")
        for what in ("exp_avg", "exp_avg_sq"):
            key = f"{name}.{what}"
            check_tensor(path, key, tensors[key], params[index[name]])
            if what == "exp_avg_sq" and bool((tensors[key] < 0).any()):
                raise ResumeError(f"{path}: tensor {key!r} holds negative values (a second moment is >= 0)")
        step = tensors[f"{name}.step"]
        if step.numel() != 1 or not step.is_floating_point() or not math.isfinite(float(step)) or float(step) < 0:
            raise ResumeError(f"{path}: tensor '{name}.step' is not one finite float >= 0 "
                              f"(shape {tuple(step.shape)}, dtype {step.dtype})")


def check_rng(path: Path, rng: dict[str, torch.Tensor]) -> None:
    unknown = sorted(set(rng) - {"cpu", "cuda"})
    if unknown or "cpu" not in rng:
        raise ResumeError(f"{path}: RNG states {sorted(rng)}, expected 'cpu' and optionally 'cuda'")
    like = torch.get_rng_state()
    for key, state in rng.items():
        shape_ok = state.shape == like.shape if key == "cpu" else state.dim() == 1
        if state.dtype != torch.uint8 or not shape_ok:
            raise ResumeError(f"{path}: RNG state {key!r} is {state.dtype} of shape {tuple(state.shape)}, expected "
                              f"torch.uint8 of shape {tuple(like.shape) if key == 'cpu' else '(n,)'}")


def restore_rng(rng: dict[str, torch.Tensor], device: torch.device, folder: Path) -> None:
    """Set the RNG states read_checkpoint returned (checked by check_rng); torch's refusal is a ResumeError."""
    path = folder / "rng.safetensors"
    try:
        torch.set_rng_state(rng["cpu"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
    except (RuntimeError, ValueError) as e:
        raise ResumeError(f"{path}: torch refuses the RNG state ({e})") from None
