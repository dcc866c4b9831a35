"""save_model: write a (trained) GLM4V as a checkpoint folder that load_model reads back bit for bit.

layout="hf": the published HF layout (names `transformer.*`, sharded safetensors + index, the
rotary inv_freq buffer the reference saves), readable by the reference code too.
layout="native": our own names and a glm4v_native.json provenance record (glm4v-convert's format).

Shards are written one at a time, each tensor streamed from the parameters in bounded chunks
(a CUDA model's shard is copied to the host one shard at a time): the model is never held twice.
The folder is published atomically (written into a hidden sibling, renamed when complete).
config.json is the one the model was loaded with (extra keys such as auto_map kept), with
torch_dtype set to the dtype written.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from glm4v_conversion.atomic import destination_lock, staging
from glm4v_conversion.checkpoint import (CONFIG_FILE, NATIVE_FORMAT, NATIVE_FORMAT_VERSION, PROVENANCE_FILE,
                                         dtype_name)
from glm4v_conversion.convert import HF_FILE_METADATA, rotary_inv_freq
from glm4v_conversion.names import HF_IGNORED_BUFFERS, native_to_hf
from glm4v_conversion.safetensors_io import INDEX_FILE, index_json, shard_names, tensor_nbytes, write_file

from .model import GLM4V

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes per shard, transformers' default


class SaveError(ValueError):
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
    groups = _pack(names, lambda n: tensor_nbytes(tuple(tensors[n].shape), dtype), max_shard_size)
    files = shard_names(len(groups))
    with destination_lock(dst), staging(dst) as tmp:  # one writer per folder; a killed run's leftovers go
        _check_destination(dst, overwrite)
        for file, group in zip(files, groups):
            shard = {n: tensors[n].cpu() for n in group}  # no copy on CPU; one shard at a time from CUDA
            write_file(tmp / file, shard, metadata, dtype)
            del shard
        if len(groups) > 1:
            weight_map = {n: file for file, group in zip(files, groups) for n in sorted(group)}
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


def _pack(names: list[str], nbytes, limit: int) -> list[list[str]]:
    """Consecutive groups of at most `limit` bytes; a larger tensor gets a shard of its own."""
    groups: list[list[str]] = [[]]
    size = 0
    for name in names:
        if groups[-1] and size + nbytes(name) > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes(name)
    return groups


def _natural_key(name: str) -> list:
    """layers.2 before layers.10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
