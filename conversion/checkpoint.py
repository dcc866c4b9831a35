"""Open a checkpoint folder of either layout and check it, before any tensor data is read.

`open_checkpoint` reads and validates every safetensors header, tells the layout from the
names (HF names all start with `transformer.`, native names never do) and renames HF tensors
to native ones. `check_tensors` compares names, shapes and dtypes with what the config
implies, and names the file and tensor at fault. The loader (glm4v_core.checkpoint) and the
converter both go through these two functions.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config_check import ConfigError, check_config
from .files import check_folder, parse_json, read_text
from .names import HF_IGNORED_BUFFERS, hf_to_native, is_hf_name, native_to_hf
from .safetensors_io import CheckpointError, TensorInfo, list_tensors

NATIVE_FORMAT = "glm4v-native"
NATIVE_FORMAT_VERSION = "1"
PROVENANCE_FILE = "glm4v_native.json"
CONFIG_FILE = "config.json"
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16', as config.json's torch_dtype and glm4v_native.json spell it."""
    return str(dtype).removeprefix("torch.")


_DTYPE_NAMES = {dtype_name(d): d for d in FLOAT_DTYPES}


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    layout: str                          # "hf" or "native"
    tensors: dict[str, TensorInfo]       # native name -> stored tensor (info.name is the stored name)
    hf_buffers: dict[str, TensorInfo]    # HF_IGNORED_BUFFERS found in an HF folder
    provenance: dict[str, Any] | None    # glm4v_native.json of a native folder, if present

    def stored_name(self, native: str) -> str:
        """The name a tensor has (or would have) in this folder's files, for messages."""
        return (native_to_hf(native) or native) if self.layout == "hf" else native

    def dtypes(self) -> Counter:
        return Counter(info.dtype for info in self.tensors.values())


def open_checkpoint(folder: str | Path) -> Checkpoint:
    """Headers of every file validated, layout detected, tensors keyed by native name."""
    folder = Path(folder)
    tensors = list_tensors(folder)
    if not tensors:
        raise CheckpointError(f"{folder}: the checkpoint holds no tensors")
    hf = [n for n in tensors if is_hf_name(n)]
    if hf and len(hf) != len(tensors):
        other = next(n for n in tensors if not is_hf_name(n))
        raise CheckpointError(f"{folder}: mixes HF names ({hf[0]!r}) and native names ({other!r})")
    if not hf:
        return Checkpoint(folder, "native", tensors, {}, _read_provenance(folder))
    native, buffers = {}, {}
    for name, info in tensors.items():
        if name in HF_IGNORED_BUFFERS:
            buffers[name] = info  # saved by the reference, never read by its forward
            continue
        new = hf_to_native(name)
        if new is None:
            raise CheckpointError(f"{info.file}: unexpected tensor {name!r} (no such parameter in GLM-4V)")
        native[new] = info
    return Checkpoint(folder, "hf", native, buffers, None)


def check_tensors(ckpt: Checkpoint, expected: dict[str, tuple[int, ...]], config_path: Path) -> None:
    """Every expected tensor present once, nothing extra, shapes as the config implies, float dtypes;
    a native folder holds one dtype (the one glm4v_native.json records)."""
    missing = [n for n in expected if n not in ckpt.tensors]
    if missing:
        names = [ckpt.stored_name(n) for n in missing]
        raise CheckpointError(f"{ckpt.folder}: missing tensor {names[0]!r}, which {config_path} requires"
                              + (f" (and {len(names) - 1} more: {names[1:4]}...)" if len(names) > 1 else ""))
    for name, info in ckpt.tensors.items():
        if name not in expected:
            raise CheckpointError(f"{info.file}: unexpected tensor {info.name!r}: the model {config_path} "
                                  "describes has no such parameter")
        if info.shape != expected[name]:
            raise CheckpointError(f"{info.file}: tensor {info.name!r} has shape {list(info.shape)}, but "
                                  f"{config_path} implies {list(expected[name])}")
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{info.file}: tensor {info.name!r} has dtype {info.dtype}; weights must be "
                                  "float32, bfloat16 or float16")
    if ckpt.layout == "native":
        _check_one_dtype(ckpt)


def read_config(folder: Path) -> dict[str, Any]:
    """config.json as a plain dict, checked by the same validator the loader uses (so the converter
    never writes a folder the loader refuses); returned unchanged, as the file holds it."""
    check_folder(folder, "checkpoint folder", CheckpointError)
    path = folder / CONFIG_FILE
    if not (path.exists() or path.is_symlink()):
        raise CheckpointError(f"{folder}: no {CONFIG_FILE}; a checkpoint folder holds its config")
    config = parse_json(read_text(path, "config file", CheckpointError), path, CheckpointError)
    try:
        check_config(config)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return config


def _check_one_dtype(ckpt: Checkpoint) -> None:
    """Our writer gives a native folder a single dtype; a tensor that differs was edited in later."""
    recorded = (ckpt.provenance or {}).get("dtype")
    if recorded is None:
        want, why = ckpt.dtypes().most_common(1)[0][0], "the other tensors are"
    elif recorded in _DTYPE_NAMES:
        want, why = _DTYPE_NAMES[recorded], f"{PROVENANCE_FILE} records"
    else:
        raise CheckpointError(f"{ckpt.folder / PROVENANCE_FILE}: unknown dtype {recorded!r}")
    for info in ckpt.tensors.values():
        if info.dtype != want:
            raise CheckpointError(f"{info.file}: tensor {info.name!r} is {info.dtype}, but a native checkpoint "
                                  f"holds one dtype and {why} {dtype_name(want)}")


def _read_provenance(folder: Path) -> dict[str, Any] | None:
    path = folder / PROVENANCE_FILE
    if not (path.exists() or path.is_symlink()):
        return None  # a native folder written by other means: names alone identify it
    provenance = parse_json(read_text(path, "provenance file", CheckpointError), path, CheckpointError)
    if not isinstance(provenance, dict) or provenance.get("format") != NATIVE_FORMAT:
        raise CheckpointError(f"{path}: not a {NATIVE_FORMAT} provenance file")
    if provenance.get("format_version") != NATIVE_FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {provenance.get('format_version')!r}; this version of "
                              f"glm4v-core reads version {NATIVE_FORMAT_VERSION}")
    _check_provenance_types(provenance, path)
    return provenance


def _check_provenance_types(provenance: dict, path: Path) -> None:
    """The fields `--to hf` reads have the types it expects (an edited file is named, not a traceback)."""
    def require(ok: bool, key: str, want: str) -> None:
        if not ok:
            raise CheckpointError(f"{path}: {key} must be {want}")

    def str_map(value) -> bool:
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())

    require(isinstance(provenance.get("dtype", ""), str), "dtype", "a string")
    source = provenance.get("source", {})
    require(isinstance(source, dict), "source", "an object")
    require(isinstance(source.get("dtype", ""), str), "source.dtype", "a string")
    require(isinstance(source.get("index", True), bool), "source.index", "true or false")
    require(source.get("weight_map") is None or str_map(source["weight_map"]), "source.weight_map",
            "an object mapping tensor names to file names")
    files = source.get("files", {})
    require(isinstance(files, dict), "source.files", "an object")
    for name, record in files.items():
        require(isinstance(record, dict) and isinstance(record.get("sha256", ""), str)
                and str_map(record.get("metadata", {})), f"source.files.{name}",
                "an object with a sha256 string and a metadata object of strings")
    buffers = source.get("buffers", {})
    require(isinstance(buffers, dict), "source.buffers", "an object")
    for name, record in buffers.items():
        require(isinstance(record, dict) and isinstance(record.get("dtype"), str)
                and isinstance(record.get("base64"), str) and isinstance(record.get("shape"), list)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in record["shape"]),
                f"source.buffers.{name}", "an object with dtype, shape (a list of sizes) and base64")
