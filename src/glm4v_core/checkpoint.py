"""Load a checkpoint folder (HF layout or our native layout, auto-detected) into a GLM4V.

The model is built on the `meta` device; every tensor name, shape and dtype in the files is
checked against it before any data is touched (glm4v_conversion.checkpoint names the file and
tensor at fault); then parameters are assigned from memory maps. When the stored dtype and
device already match (bf16 on CPU for the real checkpoint) parameters are views of the
mapped files: nothing is copied and memory grows only with the pages actually read. No pickle.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from glm4v_conversion.atomic import destination_lock, staging
from glm4v_conversion.checkpoint import (
    CONFIG_FILE,
    NATIVE_FORMAT,
    NATIVE_FORMAT_VERSION,
    PROVENANCE_FILE,
    Checkpoint,
    check_tensors,
    dtype_name,
    open_checkpoint,
    read_config,
)
from glm4v_conversion.convert import HF_FILE_METADATA, pack_shards, rotary_inv_freq
from glm4v_conversion.files import check_folder
from glm4v_conversion.names import HF_IGNORED_BUFFERS, native_to_hf
from glm4v_conversion.quantize import quantization_record
from glm4v_conversion.safetensors_io import (
    INDEX_FILE,
    CheckpointError,
    MappedFiles,
    index_json,
    shard_names,
    tensor_nbytes,
    write_file,
)
from glm4v_core.config import BUNDLED_CHECKPOINT, GLM4VConfig
from glm4v_core.errors import CLIError, GLM4VError
from glm4v_core.hub import repo_id_of, resolve_model_folder
from glm4v_core.model.glm4v import GLM4V
from glm4v_core.model.ops import pack_cpu_weights
from glm4v_core.transforms.quant import load_quantized

__all__ = ["CheckpointError", "DeviceError", "build_meta_model", "check_against_model", "check_device", "load_model"]


def build_meta_model(config: GLM4VConfig) -> GLM4V:
    """The model with shapes and no storage: what a checkpoint is checked against."""
    with torch.device("meta"):
        return GLM4V(config)


def check_against_model(ckpt: Checkpoint, model: GLM4V, config_path: Path) -> None:
    """Every parameter present once, nothing extra, shapes as the config implies, float dtypes."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    check_tensors(ckpt, expected, config_path)


# The tiny random-weight checkpoint made by the HF reference code, shipped with a source checkout:
# what `glm4v generate` and `python -m glm4v_core.parity` run without --checkpoint.


SUPPORTED_DEVICES = ("cpu", "cuda")


class DeviceError(GLM4VError):
    """A device string torch does not know, or one this implementation does not run on, or absent here."""


def check_device(device: str | torch.device) -> torch.device:
    """A usable torch device, or a DeviceError that says why not (before any weight is read).

    glm4v-core runs on the CPU (torch kernels) and on CUDA GPUs (Triton kernels); mps, xpu and
    other backends are refused by name rather than failing inside the first tensor copy."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {str(device)!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type not in SUPPORTED_DEVICES:
        raise DeviceError(f"device {str(device)!r} is not supported: glm4v-core runs on 'cpu' or 'cuda[:N]'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {str(device)!r} requested but CUDA is not available here (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DeviceError(f"device {str(device)!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # the one name -> dtype table


def check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch.float32/bfloat16/float16 or their names; anything else is a named CheckpointError."""
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    hint = ("; weights are quantized with `glm4v-convert SRC DST --quantize int8|int4`, then loaded with a float "
            "(compute) dtype") if dtype in (torch.int8, torch.uint8, "int8", "int4") else ""
    raise CheckpointError(f"model dtype must be one of {list(DTYPES)} (a torch.dtype or its name), got "
                          f"{dtype!r}{hint}")


def load_model(path: str | Path, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
               pack_cpu: bool = False) -> GLM4V:
    """Load an HF-layout or native checkpoint folder into an eval-mode GLM4V on `device`.

    path: the folder, or a hub id ORG/NAME[@REVISION] read from the local Hugging Face cache (glm4v_core.hub;
    `glm4v download` fetches one); a local folder of that name wins.

    pack_cpu=True (bf16 on CPU, inference): every linear layer also gets its weight re-laid out for
    oneDNN (glm4v_core.model.ops.pack_cpu_weights): about 2x faster batch-1 decode (eager or compiled) and
    ~10% faster prefill products on CPUs with native bf16, at the price of the zero-copy loading (the
    weights are read once and copied into process memory).

    Inference-ready: eval mode, no gradients. To train, `model.requires_grad_(True).train()` is
    all it takes. `model.raw_config` keeps config.json as read (auto_map, torch_dtype...) for
    `save_model`.

    Raises CheckpointError (files, names, shapes, dtypes), ConfigError (config.json) or DeviceError,
    all ValueErrors whose message names the file, tensor or argument at fault."""
    device = check_device(device)
    dtype = check_dtype(dtype)
    folder = resolve_model_folder(path)  # a hub id not found locally: its cached snapshot folder
    check_folder(folder, "checkpoint folder", CheckpointError)
    config = GLM4VConfig.from_json(folder / CONFIG_FILE)
    ckpt = open_checkpoint(folder)
    record = quantization_record(ckpt)
    if record is not None:  # weight-only quantized: packed weights stay packed, `dtype` is the compute dtype
        model = build_meta_model(config).to(DTYPES[ckpt.provenance["dtype"]])
        return load_quantized(ckpt, record, model, folder / CONFIG_FILE, dtype, device).eval().requires_grad_(False)
    model = build_meta_model(config)
    check_against_model(ckpt, model, folder / CONFIG_FILE)
    files = MappedFiles()
    # .to() returns the mmapped view itself when dtype and device already match: zero-copy
    state = {name: files.tensor(info).to(device=device, dtype=dtype) for name, info in ckpt.tensors.items()}
    model.load_state_dict(state, assign=True, strict=True)
    model.raw_config = read_config(folder)
    model = model.eval().requires_grad_(False)
    if pack_cpu:
        pack_cpu_weights(model)
    return model


def resolve_checkpoint(path: Path | None) -> Path:
    """--checkpoint as a folder: DIR, or ORG/NAME[@REVISION] from the local Hugging Face cache (a local folder of
    that name wins), or None for the bundled demo checkpoint; a CLIError / HubError naming what is wrong."""
    if path is None:
        if not (BUNDLED_CHECKPOINT / "config.json").is_file():
            raise CLIError(f"no --checkpoint given and the bundled demo checkpoint {BUNDLED_CHECKPOINT} is missing "
                           "(it ships inside the glm4v_core package; reinstall it); pass --checkpoint DIR")
        return BUNDLED_CHECKPOINT
    path = resolve_model_folder(path, "--checkpoint")  # ORG/NAME[@REVISION]: from the Hugging Face cache
    check_folder(path, "--checkpoint", CLIError)  # names a file, FIFO or link loop as what it is
    config = path / "config.json"
    if not (config.exists() or config.is_symlink()):
        repo = repo_id_of(path)
        hint = f" (the cached snapshot of {repo}: downloaded with an --include that left it out?)" if repo else ""
        raise CLIError(f"{path} is not a checkpoint folder (no config.json in it){hint}")
    return path  # a config.json that is not a regular file is named by GLM4VConfig.from_json


DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes per shard, transformers' default


class SaveError(GLM4VError):
    """A destination or a request save_model cannot honour; the message says which and why."""


def save_model(model: GLM4V, path: str | Path, layout: str = "hf", *, dtype: torch.dtype | None = None,
               max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False) -> Path:
    """Write `model` into folder `path` (created; an existing one only with overwrite=True).

    dtype: the stored dtype (default: the parameters' own, which must then be a single one)."""
    if layout not in ("hf", "native"):
        raise SaveError(f"layout must be 'hf' or 'native', got {layout!r}")
    dst = Path(path)
    if dst.name in ("", ".", ".."):
        raise SaveError(f"path must name the folder to create, got {str(path)!r}")
    _check_destination(dst, overwrite)  # early; again under the lock
    params = {name: p.detach() for name, p in model.state_dict().items()}
    dtype = dtype or _single_dtype(params)
    raw = dict(getattr(model, "raw_config", None) or model.config.to_hf())
    if layout == "hf":
        tensors = {native_to_hf(name): t for name, t in params.items()}
        for buffer in HF_IGNORED_BUFFERS:  # saved by the reference, never read: recreated its way
            tensors[buffer] = rotary_inv_freq(raw, dtype)
        metadata = dict(HF_FILE_METADATA)
    else:
        tensors = params
        metadata = {"format": NATIVE_FORMAT, "format_version": NATIVE_FORMAT_VERSION, "dtype": dtype_name(dtype)}
    names = sorted(tensors, key=_natural_key)
    groups = pack_shards(names, lambda n: tensor_nbytes(tuple(tensors[n].shape), dtype), max_shard_size)
    files = shard_names(len(groups))
    with destination_lock(dst), staging(dst) as tmp:  # one writer per folder; a killed run's leftovers go
        _check_destination(dst, overwrite)
        for file, group in zip(files, groups, strict=True):
            shard = {n: tensors[n].cpu() for n in group}  # no copy on CPU; one shard at a time from CUDA
            write_file(tmp / file, shard, metadata, dtype)
            del shard
        if len(groups) > 1:
            weight_map = {n: file for file, group in zip(files, groups, strict=True) for n in sorted(group)}
            total = sum(tensor_nbytes(tuple(t.shape), dtype) for t in tensors.values())
            _write_text(tmp / INDEX_FILE, index_json(weight_map, total))
        _write_text(tmp / CONFIG_FILE, json.dumps({**raw, "torch_dtype": dtype_name(dtype)}, indent=2) + "\n")
        if layout == "native":
            record = {"format": NATIVE_FORMAT, "format_version": NATIVE_FORMAT_VERSION,
                      "tool": "glm4v_core.save_model", "dtype": dtype_name(dtype)}
            _write_text(tmp / PROVENANCE_FILE, json.dumps(record, indent=2) + "\n")
    return dst


def _check_destination(dst: Path, overwrite: bool) -> None:
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise SaveError(f"{dst} already exists; pass overwrite=True to replace it")
    # overwrite replaces only what looks like a checkpoint: a typo must not delete a home folder
    if dst.exists() and not (dst.is_dir() and ((dst / CONFIG_FILE).exists() or not any(dst.iterdir()))):
        raise SaveError(f"{dst} exists and is not a checkpoint folder (no {CONFIG_FILE}); refusing to replace it")


def _single_dtype(params: dict[str, torch.Tensor]) -> torch.dtype:
    dtypes = {t.dtype for t in params.values()}
    if len(dtypes) != 1:
        raise SaveError(f"the model's parameters have mixed dtypes {sorted(map(str, dtypes))}; pass dtype=... "
                        "to choose the stored one")
    return dtypes.pop()


def _natural_key(name: str) -> list:
    """layers.2 before layers.10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


