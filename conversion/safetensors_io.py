"""Reading safetensors checkpoints without pickle and without copying: headers are parsed and
validated here (so a corrupt or truncated file is named before any data is touched), and
tensors are memory-mapped views of the file.

A checkpoint folder holds either one `model.safetensors`, or shards listed by
`model.safetensors.index.json` (`weight_map`: tensor name -> shard file name).
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be read as described; the message names it."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in `file`
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors file's header: (tensors by name, metadata)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{path}: corrupt safetensors header (declares {header_len} header "
                                      f"bytes, file has {size})")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}: {entry!r}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes, shape {list(shape)} "
                                  f"{entry['dtype']} needs {nbytes}")
        if data_start + end > size:
            raise CheckpointError(f"{path}: truncated file: tensor {name!r} ends at byte {data_start + end}, "
                                  f"file has {size}")
        tensors[name] = TensorInfo(name, path, dtype, shape, data_start + begin, nbytes)
    return tensors, metadata


def list_tensors(folder: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint folder (single file or index + shards), headers validated."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder")
    index_path = folder / INDEX_FILE
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: malformed index ({e!r})") from None
        shards = sorted(set(weight_map.values()))
    elif (folder / SINGLE_FILE).exists():
        weight_map, shards = None, [SINGLE_FILE]
    else:
        raise CheckpointError(f"{folder}: no {INDEX_FILE} and no {SINGLE_FILE}")
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        shard_path = folder / shard
        if not shard_path.exists():
            raise CheckpointError(f"{index_path}: names shard {shard!r}, which does not exist in {folder}")
        found, _ = read_header(shard_path)
        for name, info in found.items():
            if name in tensors:
                raise CheckpointError(f"{shard_path}: tensor {name!r} also stored in {tensors[name].file.name}")
            tensors[name] = info
    if weight_map is not None:
        for name, shard in weight_map.items():
            if tensors.get(name) is None or tensors[name].file.name != shard:
                raise CheckpointError(f"{index_path}: lists tensor {name!r} in {shard!r}, but that file lacks it")
        extra = sorted(set(tensors) - set(weight_map))
        if extra:
            raise CheckpointError(f"{tensors[extra[0]].file}: tensor(s) {extra[:5]} are not listed in {INDEX_FILE}")
    return tensors


class MappedFiles:
    """Memory maps of checkpoint files, opened once each; tensors are zero-copy views."""

    def __init__(self) -> None:
        self._maps: dict[Path, torch.Tensor] = {}

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        data = self._maps.get(info.file)
        if data is None:
            size = info.file.stat().st_size
            # shared=False maps the file copy-on-write: pages load lazily, the file is never written.
            data = self._maps[info.file] = torch.from_file(str(info.file), shared=False, size=size, dtype=torch.uint8)
        raw = data[info.start:info.start + info.nbytes]
        if info.start % info.dtype.itemsize:  # unaligned data cannot be viewed in place
            raw = raw.clone()
        return raw.view(info.dtype).view(info.shape)
