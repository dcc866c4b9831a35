"""Reading and writing safetensors checkpoints without pickle and without copying.

Reading: headers are parsed and validated here (so a corrupt or truncated file is named before
any data is touched), and tensors are memory-mapped views of the file.
Writing: `write_file` streams tensors chunk by chunk (casting on the way if asked), so writing
a shard from memory-mapped sources never holds more than one chunk in memory; its bytes are
exactly those of `safetensors.torch.save_file` for the same tensors (same header layout and
tensor order), with metadata keys in the order given (safetensors itself writes them in a random
hash order, so keeping a recorded order is what lets a rebuilt file match its original byte for byte).

A checkpoint folder holds either one `model.safetensors`, or shards listed by
`model.safetensors.index.json` (`weight_map`: tensor name -> shard file name).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable
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
# safetensors stores tensors by descending dtype rank, then by name (this keeps every tensor aligned)
_DTYPE_RANK = {name: rank for rank, name in enumerate(["BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64"])}
CHUNK_BYTES = 64 * 1024 * 1024  # what the writer holds in memory at once (one cast chunk)


def tensor_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


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
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        try:
            dtype_name = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}: {entry!r}") from None
        if dtype_name not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype_name!r}, which this reader does not support")
        dtype = DTYPES[dtype_name]
        if begin < 0 or min(shape, default=0) < 0:
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}: {entry!r}")
        nbytes = tensor_nbytes(shape, dtype)
        if end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes, shape {list(shape)} "
                                  f"{entry['dtype']} needs {nbytes}")
        if data_start + end > size:
            raise CheckpointError(f"{path}: truncated file: tensor {name!r} ends at byte {data_start + end}, "
                                  f"file has {size}")
        tensors[name] = TensorInfo(name, path, dtype, shape, data_start + begin, nbytes)
    return tensors, metadata


def read_index(folder: Path) -> dict[str, str] | None:
    """The `weight_map` of the folder's index (tensor -> file, in file order), or None if unsharded."""
    index_path = folder / INDEX_FILE
    if not index_path.exists():
        return None
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index_path}: malformed index ({e!r})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: malformed index ('weight_map' must map names to file names)")
    return weight_map


def list_tensors(folder: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint folder (single file or index + shards), headers validated."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder")
    index_path = folder / INDEX_FILE
    weight_map = read_index(folder)
    if weight_map is not None:
        shards = sorted(set(weight_map.values()))
    elif (folder / SINGLE_FILE).exists():
        shards = [SINGLE_FILE]
    else:
        raise CheckpointError(f"{folder}: no {INDEX_FILE} and no {SINGLE_FILE}")
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        shard_path = folder / shard
        if not shard_path.is_file():
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


def index_json(weight_map: dict[str, str], total_size: int) -> str:
    """An index file's text, formatted as transformers' save_pretrained writes it."""
    return json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2) + "\n"


def shard_names(n: int) -> list[str]:
    """HF file names for n shards: one `model.safetensors`, or `model-0000k-of-0000n.safetensors`."""
    return [SINGLE_FILE] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]


def storage_order(tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> list[str]:
    """The order safetensors stores tensors in: descending dtype rank, then name."""
    return sorted(tensors, key=lambda n: (-_DTYPE_RANK[DTYPE_NAMES[tensors[n][0]]], n))


def header_bytes(tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None) -> bytes:
    """The 8-byte length + JSON header of a file holding `tensors` (name -> (dtype, shape)) in storage order."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in storage_order(tensors):
        dtype, shape = tensors[name]
        nbytes = tensor_nbytes(shape, dtype)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # pad with spaces so the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def file_size(tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None) -> int:
    """Bytes `write_file` will write for these tensors: checked against free disk space up front."""
    data = sum(tensor_nbytes(shape, dtype) for dtype, shape in tensors.values())
    return len(header_bytes(tensors, metadata)) + data


def write_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
               dtype: torch.dtype | None = None, on_bytes: Callable[[int], None] | None = None) -> int:
    """Write `tensors` (cast to `dtype` if given) as one safetensors file; returns bytes written.

    Tensors may be memory-mapped views: each is streamed in CHUNK_BYTES pieces, so the peak
    memory is one chunk (plus the source pages the kernel keeps cached), never the file."""
    layout = {name: (dtype or t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    head = header_bytes(layout, metadata)
    written = len(head)
    with open(path, "wb") as f:
        f.write(head)
        if on_bytes is not None:
            on_bytes(len(head))
        for name in storage_order(layout):
            for chunk in _chunks(tensors[name], layout[name][0]):
                f.write(chunk)
                written += len(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
        f.flush()
        os.fsync(f.fileno())  # complete on disk before anyone renames the folder into place
    return written


def _chunks(tensor: torch.Tensor, dtype: torch.dtype):
    """The tensor's bytes in `dtype`, as memoryviews of at most CHUNK_BYTES."""
    flat = tensor.reshape(-1)  # a view for the contiguous mmapped tensors we write
    step = max(1, CHUNK_BYTES // max(flat.element_size(), dtype.itemsize))
    for start in range(0, flat.numel(), step):
        piece = flat[start:start + step].to(dtype).contiguous()
        yield memoryview(piece.view(torch.uint8).numpy())


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """sha256 of a whole file, read sequentially in chunks."""
    digest, buffer = hashlib.sha256(), bytearray(16 * 1024 * 1024)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(memoryview(buffer)[:n])
            if on_bytes is not None:
                on_bytes(n)
    return digest.hexdigest()
