"""HF folder <-> native folder, streamed shard by shard and published atomically.

HF -> native: every tensor is renamed by names.HF_TO_NATIVE and copied byte for byte (or cast
with `dtype`) from memory-mapped source shards; by default native shard k holds exactly the
tensors of HF shard k. glm4v_native.json records the HF files (size, sha256, header metadata),
the HF weight_map and the bytes of the rotary inv_freq buffer, so native -> HF rebuilds the same
files: same tensor -> file assignment, same bytes (without such a record the buffer is recomputed
the way the reference computes it).

Safety: headers, names, shapes (against config.json), dtypes and free disk space are checked
before the first byte is written; the output goes to a hidden sibling folder that is renamed
into place only when complete, and is removed on any failure or Ctrl-C.
"""
from __future__ import annotations

import base64
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import __version__
from .atomic import ConversionError, check_free_space, destination_lock, no_space_named, staging
from .checkpoint import (
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
from .files import os_reason
from .names import HF_IGNORED_BUFFERS, native_to_hf
from .safetensors_io import (
    DTYPE_NAMES,
    DTYPES,
    INDEX_FILE,
    CheckpointError,
    MappedFiles,
    TensorInfo,
    file_size,
    index_json,
    read_header,
    read_index,
    sha256_file,
    shard_names,
    storage_order,
    tensor_nbytes,
    write_file,
)
from .shapes import expected_shapes

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # transformers' default when nothing records the original sharding
HF_FILE_METADATA = {"format": "pt"}  # transformers refuses safetensors files without it


class LossyCastWarning(UserWarning):
    """--dtype narrows the stored values: the output will not convert back to the same bytes."""


@dataclass(frozen=True)
class OutFile:
    name: str
    tensors: dict[str, TensorInfo | torch.Tensor]  # output name -> mmapped source, or a tensor made here
    metadata: dict[str, str]


@dataclass(frozen=True)
class Result:
    dst: Path
    files: list[str]
    bytes_written: int
    seconds: float
    verified: bool | None  # native -> HF: every file's sha256 equals the original's; None: nothing to compare


def convert(src: str | Path, dst: str | Path, *, to: str = "native", dtype: torch.dtype | None = None,
            max_shard_size: int | None = None, force: bool = False, progress: bool = False) -> Result:
    """Convert checkpoint folder `src` (HF layout for to='native', native for to='hf') into `dst`."""
    start = time.perf_counter()
    src, dst = Path(src), _real_destination(Path(dst), force)
    if to not in ("native", "hf"):
        raise ValueError(f"to must be 'native' or 'hf', got {to!r}")
    _check_destination(src, dst, force)  # early, before reading SRC; again below under the lock
    config = read_config(src)
    ckpt = _open_source(src, to, config)
    out_dtype = _output_dtype(ckpt, dtype)
    if to == "native":
        files, weight_map, with_index = _plan_native(ckpt, out_dtype, max_shard_size)
    else:
        files, weight_map, with_index = _plan_hf(ckpt, config, out_dtype, max_shard_size)
    texts = {CONFIG_FILE: _config_text(ckpt, config, dtype)}
    if with_index:
        texts[INDEX_FILE] = index_json(weight_map, _total_size(files, out_dtype))
    data = sum(file_size(_layout(f, out_dtype), f.metadata) for f in files)
    provenance_slack = 200 * len(ckpt.tensors) + 4096  # glm4v_native.json: the weight_map plus a few hashes

    # one writer per destination (a killed run's leftovers are removed); a disk that fills up anyway
    # (the estimate was short, or someone took the space meanwhile) is named, with nothing left behind
    with no_space_named(dst), destination_lock(dst):
        _check_destination(src, dst, force)
        check_free_space(dst, data + sum(len(t.encode()) for t in texts.values()) + provenance_slack)
        return _write(ckpt, dst, to, files, texts, data, out_dtype, max_shard_size, progress, start)


def _write(ckpt: Checkpoint, dst: Path, to: str, files: list[OutFile], texts: dict[str, str], data: int,
           out_dtype: torch.dtype, max_shard_size: int | None, progress: bool, start: float) -> Result:
    verify = to == "hf" and _recorded_hf_files(ckpt, max_shard_size, out_dtype)
    with staging(dst) as tmp:
        # hash each file while it is still in the page cache: the HF sources for the provenance,
        # or the HF outputs, to compare with the sha256 recorded for the originals
        if to == "native":
            to_hash = _hash_schedule(ckpt, files)
            hash_bytes = sum(p.stat().st_size for paths in to_hash.values() for p in paths)
        else:
            to_hash = {i: [tmp / f.name] for i, f in enumerate(files)} if verify else {}
            hash_bytes = data if verify else 0
        hashes = {}  # the bar counts the bytes written plus the bytes hashed, and says so
        with tqdm(total=data + hash_bytes, unit="B", unit_scale=True, file=sys.stderr,
                  disable=not progress, desc=f"to {to}: write" + (" + sha256" if hash_bytes else "")) as bar:
            for i, out in enumerate(files):
                _write_shard(tmp / out.name, out, out_dtype, bar.update)
                hashes.update({p.name: sha256_file(p, bar.update) for p in to_hash.get(i, [])})
        if to == "native":
            texts[PROVENANCE_FILE] = _provenance(ckpt, out_dtype, hashes)
        verified = _matches_recorded(ckpt, hashes) if verify else None
        for name, text in texts.items():
            _write_text(tmp / name, text)
    return Result(dst, [f.name for f in files] + list(texts), data, time.perf_counter() - start, verified)


# --- checks (all before anything is written) -------------------------------------------------

def _real_destination(dst: Path, force: bool) -> Path:
    """A symlinked DST is replaced where it points (the link keeps pointing at the new folder);
    a dangling link or a link loop is refused by name."""
    if not dst.is_symlink():
        return dst
    target = os.readlink(dst)
    try:
        os.stat(dst)
    except OSError as e:
        raise ConversionError(f"{dst} is a symlink to {target}, which {os_reason(e)}; remove the link or "
                              "choose another destination") from None
    if not force:
        raise ConversionError(f"{dst} already exists (a symlink to {target}); pass --force to replace the "
                              "folder it points to")
    return Path(os.path.realpath(dst))


def _check_destination(src: Path, dst: Path, force: bool) -> None:
    if dst.name in ("", ".", ".."):
        raise ConversionError(f"DST must name the folder to create, got {str(dst)!r}")
    s, d = Path(os.path.realpath(src)), Path(os.path.realpath(dst))  # realpath: no error on a link loop
    if d == s or s in d.parents or d in s.parents:
        raise ConversionError(f"{dst}: the destination must not be SRC ({src}), inside it, or contain it")
    if not (dst.exists() or dst.is_symlink()):
        return
    if not force:
        raise ConversionError(f"{dst} already exists; pass --force to replace it")
    # --force replaces only what looks like a checkpoint: a typo must not delete a home folder
    if not dst.is_dir() or not ((dst / CONFIG_FILE).exists() or not any(dst.iterdir())):
        raise ConversionError(f"{dst} exists and is not a checkpoint folder (no {CONFIG_FILE}); refusing to replace "
                              "it even with --force")


def _open_source(src: Path, to: str, config: dict[str, Any]) -> Checkpoint:
    ckpt = open_checkpoint(src)
    want = "hf" if to == "native" else "native"
    if ckpt.layout != want:
        example = next(iter(ckpt.tensors.values())).name
        hint = "it converts to HF with --to hf" if ckpt.layout == "native" else "it converts to native without --to hf"
        article = {"hf": "an HF", "native": "a native"}
        raise CheckpointError(f"{src} is {article[ckpt.layout]}-layout folder (tensor names like {example!r}), but "
                              f"{article[want]} folder was expected; {hint}")
    check_tensors(ckpt, expected_shapes(config), src / CONFIG_FILE)
    return ckpt


def _output_dtype(ckpt: Checkpoint, dtype: torch.dtype | None) -> torch.dtype:
    stored = ckpt.dtypes()
    if dtype is None:
        if len(stored) > 1:
            raise CheckpointError(f"{ckpt.folder}: tensors have mixed dtypes {sorted(map(str, stored))}; a native "
                                  "folder holds one, pass --dtype to choose it")
        return next(iter(stored))
    narrowed = sorted(str(d) for d in stored if d != dtype and dtype != torch.float32)
    if narrowed:  # float32 holds every bf16/fp16 value exactly; bf16 <-> fp16 lose mantissa or range
        warnings.warn(f"casting {', '.join(narrowed)} to {dtype} loses precision or range; the result will not "
                      "convert back to the original bytes", LossyCastWarning, stacklevel=3)
    return dtype


# --- plans: which tensor goes to which file, under which name ---------------------------------

def _plan_native(ckpt: Checkpoint, dtype: torch.dtype, max_shard_size: int | None):
    """Native shard k = the tensors of HF shard k, renamed (or re-packed by size)."""
    ordered = sorted(ckpt.tensors, key=lambda n: (ckpt.tensors[n].file.name, ckpt.tensors[n].start))
    if max_shard_size is None:
        by_file: dict[str, list[str]] = {}
        for name in ordered:
            by_file.setdefault(ckpt.tensors[name].file.name, []).append(name)
        groups = list(by_file.values())
    else:
        groups = pack_shards(ordered, lambda n: tensor_nbytes(ckpt.tensors[n].shape, dtype), max_shard_size)
    files = []
    for file_name, group in zip(shard_names(len(groups)), groups, strict=True):
        sources = sorted({ckpt.tensors[n].file.name for n in group})
        metadata = {"format": NATIVE_FORMAT, "format_version": NATIVE_FORMAT_VERSION, "dtype": dtype_name(dtype),
                    "tool": f"glm4v-convert {__version__}", "source_files": ",".join(sources)}
        files.append(OutFile(file_name, {n: ckpt.tensors[n] for n in group}, metadata))
    return files, _weight_map(files, dtype), len(files) > 1


def _plan_hf(ckpt: Checkpoint, config: dict[str, Any], dtype: torch.dtype, max_shard_size: int | None):
    """The original HF files when glm4v_native.json records them, else shards of max_shard_size."""
    sources: dict[str, TensorInfo | torch.Tensor] = {native_to_hf(n): info for n, info in ckpt.tensors.items()}
    recorded = _recorded_hf_layout(ckpt, set(sources)) if max_shard_size is None else None
    if recorded is not None:
        weight_map, with_index = recorded
    else:
        names = sorted([*sources, *HF_IGNORED_BUFFERS], key=_natural_key)  # save_pretrained writes the buffer
        sizes = {n: tensor_nbytes(sources[n].shape, dtype) if n in sources else 0 for n in names}
        groups = pack_shards(names, sizes.__getitem__, max_shard_size or DEFAULT_MAX_SHARD_SIZE)
        weight_map = {n: file for file, group in zip(shard_names(len(groups)), groups, strict=True) for n in group}
        with_index = len(groups) > 1
    source = (ckpt.provenance or {}).get("source") or {}
    for name in HF_IGNORED_BUFFERS:
        if name in weight_map:  # the original bytes when recorded in this dtype, else the reference's formula
            kept = _recorded_buffer(source.get("buffers", {}).get(name), dtype)
            sources[name] = kept if kept is not None else rotary_inv_freq(config, dtype)
    by_file: dict[str, dict[str, TensorInfo | torch.Tensor]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, {})[name] = sources[name]
    recorded_files = source.get("files", {}) if recorded is not None else {}
    files = [OutFile(file, by_file[file], (recorded_files.get(file) or {}).get("metadata") or dict(HF_FILE_METADATA))
             for file in sorted(by_file)]
    return files, weight_map, with_index


def _read_bytes(info: TensorInfo) -> bytes:
    with open(info.file, "rb") as f:
        f.seek(info.start)
        return f.read(info.nbytes)


def _recorded_buffer(record: dict | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A buffer glm4v_native.json stored byte for byte (e.g. inv_freq), if stored in `dtype`."""
    if not isinstance(record, dict) or DTYPES.get(record.get("dtype")) != dtype:
        return None
    try:
        raw = bytearray(base64.b64decode(record["base64"], validate=True))
    except ValueError as e:
        raise CheckpointError(f"{PROVENANCE_FILE}: a recorded buffer's base64 is invalid ({e})") from None
    if len(raw) != tensor_nbytes(tuple(record["shape"]), dtype):
        raise CheckpointError(f"{PROVENANCE_FILE}: a recorded buffer holds {len(raw)} bytes, shape {record['shape']} "
                              f"{dtype_name(dtype)} needs {tensor_nbytes(tuple(record['shape']), dtype)}")
    if not raw:  # frombuffer refuses an empty buffer
        return torch.empty(record["shape"], dtype=dtype)
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).view(record["shape"]).clone()


def rotary_inv_freq(config: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    """The reference's `transformer.rotary_pos_emb.inv_freq` buffer, computed as it does: in `dtype`
    (bf16 arithmetic for a bf16 model), over d = kv_channels // 2 (the rotating half of a head).
    Its forward never reads the values; we recreate them so HF files round-trip bit for bit."""
    d = config["kv_channels"] // 2
    return 1.0 / (10000 ** (torch.arange(0, d, 2).to(dtype) / d))


def _recorded_hf_layout(ckpt: Checkpoint, names: set[str]) -> tuple[dict[str, str], bool] | None:
    source = (ckpt.provenance or {}).get("source") or {}
    weight_map = source.get("weight_map")
    if not isinstance(weight_map, dict):
        return None
    path = ckpt.folder / PROVENANCE_FILE
    if set(weight_map) - set(HF_IGNORED_BUFFERS) != names:
        raise CheckpointError(f"{path}: its weight_map does not list the same tensors as the folder holds; "
                              "pass --max-shard-size to shard the HF output anew")
    for file in set(weight_map.values()):  # never write outside the output folder
        if not isinstance(file, str) or Path(file).name != file or not file.endswith(".safetensors"):
            raise CheckpointError(f"{path}: weight_map names an invalid file {file!r}")
    return weight_map, bool(source.get("index", True))


def _recorded_hf_files(ckpt: Checkpoint, max_shard_size: int | None, dtype: torch.dtype) -> bool:
    """Whether native -> HF should compare its files with the recorded sha256 of the originals."""
    source = (ckpt.provenance or {}).get("source") or {}
    return max_shard_size is None and source.get("dtype") == dtype_name(dtype) and isinstance(source.get("files"), dict)


def pack_shards(names: list[str], nbytes: Callable[[str], int], limit: int) -> list[list[str]]:
    """Greedy shards in the given order; a tensor larger than `limit` gets a file of its own."""
    groups: list[list[str]] = [[]]
    size = 0
    for name in names:
        if groups[-1] and size + nbytes(name) > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes(name)
    return groups


# --- writing ---------------------------------------------------------------------------------

def _write_shard(path: Path, out: OutFile, dtype: torch.dtype, on_bytes: Callable[[int], None]) -> None:
    """Map this shard's sources and stream them out; the maps die with this call, before the next shard."""
    mapped = MappedFiles()
    tensors = {n: mapped.tensor(s) if isinstance(s, TensorInfo) else s for n, s in out.tensors.items()}
    write_file(path, tensors, out.metadata, dtype, on_bytes)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _config_text(ckpt: Checkpoint, config: dict[str, Any], dtype: torch.dtype | None) -> str:
    """config.json unchanged, except torch_dtype when --dtype changed the stored dtype."""
    if dtype is None or config.get("torch_dtype") == dtype_name(dtype):
        return (ckpt.folder / CONFIG_FILE).read_text()
    return json.dumps({**config, "torch_dtype": dtype_name(dtype)}, indent=2) + "\n"


def _hash_schedule(ckpt: Checkpoint, files: list[OutFile]) -> dict[int, list[Path]]:
    """Source files to hash after output shard i: each right after the last shard that reads it."""
    last_use: dict[Path, int] = {info.file: 0 for info in ckpt.hf_buffers.values()}
    for i, out in enumerate(files):
        for source in out.tensors.values():
            if isinstance(source, TensorInfo):
                last_use[source.file] = i
    schedule: dict[int, list[Path]] = {}
    for path, i in sorted(last_use.items()):
        schedule.setdefault(i, []).append(path)
    return schedule


def _provenance(ckpt: Checkpoint, dtype: torch.dtype, hashes: dict[str, str]) -> str:
    """glm4v_native.json: what was converted, by which tool, and how to rebuild the HF files."""
    infos = sorted([*ckpt.tensors.values(), *ckpt.hf_buffers.values()], key=lambda i: (i.file.name, i.start))
    weight_map = read_index(ckpt.folder) or {info.name: info.file.name for info in infos}
    stored = ckpt.dtypes()
    buffers = {name: {"dtype": DTYPE_NAMES[info.dtype], "shape": list(info.shape),  # kept byte for byte here,
                      "base64": base64.b64encode(_read_bytes(info)).decode()}      # not as native tensors
               for name, info in sorted(ckpt.hf_buffers.items())}
    record = {
        "format": NATIVE_FORMAT,
        "format_version": NATIVE_FORMAT_VERSION,
        "tool": "glm4v-convert",
        "tool_version": __version__,
        "dtype": dtype_name(dtype),
        "source": {
            "layout": "hf",
            "dtype": dtype_name(next(iter(stored))) if len(stored) == 1 else "mixed",
            "index": (ckpt.folder / INDEX_FILE).exists(),
            "files": {name: {"bytes": (ckpt.folder / name).stat().st_size, "sha256": sha,
                             "metadata": read_header(ckpt.folder / name)[1]}
                      for name, sha in sorted(hashes.items())},
            "weight_map": weight_map,
            "buffers": buffers,
        },
    }
    return json.dumps(record, indent=2) + "\n"


def _matches_recorded(ckpt: Checkpoint, hashes: dict[str, str]) -> bool:
    """Native -> HF: is every written file the original, by the sha256 glm4v_native.json records?"""
    recorded = ckpt.provenance["source"]["files"]
    return sorted(hashes) == sorted(recorded) and all(
        isinstance(recorded[n], dict) and recorded[n].get("sha256") == h for n, h in hashes.items())


# --- small helpers ---------------------------------------------------------------------------

def _layout(out: OutFile, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {n: (dtype, tuple(s.shape)) for n, s in out.tensors.items()}


def _weight_map(files: list[OutFile], dtype: torch.dtype) -> dict[str, str]:
    return {n: f.name for f in files for n in storage_order(_layout(f, dtype))}


def _total_size(files: list[OutFile], dtype: torch.dtype) -> int:
    return sum(tensor_nbytes(s.shape, dtype) for f in files for s in f.tensors.values())


def _natural_key(name: str) -> list:
    """layers.2 before layers.10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
