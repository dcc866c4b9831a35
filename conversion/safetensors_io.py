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

from .errors import ConversionError
from .files import check_folder, check_regular_file, open_regular, parse_json, read_text

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
_DTYPE_RANK = {name: rank for rank, name in
               enumerate(["BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64"])}
CHUNK_BYTES = 64 * 1024 * 1024  # what the writer holds in memory at once (one cast chunk)


def tensor_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


class CheckpointError(ConversionError):
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
    """Parse and validate one safetensors file's header: (tensors by name, metadata).

    Every number is checked against the file's size before anything is allocated or mapped:
    a header longer than the file, offsets that are negative, past the end or out of order,
    and two tensors sharing bytes are refused by name."""
    with open_regular(path, "safetensors file", CheckpointError) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path}: corrupt safetensors header (declares {header_len} header "
                                  f"bytes, file has {size}; the format allows at most {MAX_HEADER_BYTES})")
        raw = f.read(header_len)
    header = parse_json(raw, f"{path}: corrupt safetensors header", CheckpointError)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
    data_start = 8 + header_len
    data_size = size - data_start
    tensors = {}
    for name, entry in header.items():
        dtype_name, shape, offsets = _header_entry(path, name, entry)
        if dtype_name not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype_name!r}, "
                                  "which this reader does not support")
        dtype = DTYPES[dtype_name]
        begin, end = offsets
        if not 0 <= begin <= end:
            raise CheckpointError(f"{path}: tensor {name!r} has data_offsets {[begin, end]}; they must satisfy "
                                  "0 <= begin <= end")
        if end > data_size:
            raise CheckpointError(f"{path}: truncated file: tensor {name!r} ends at byte {data_start + end}, "
                                  f"file has {size}")
        nbytes = tensor_nbytes(shape, dtype)
        if end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes, shape {list(shape)} "
                                  f"{dtype_name} needs {nbytes}")
        tensors[name] = TensorInfo(name, path, dtype, shape, data_start + begin, nbytes)
    _check_no_overlap(path, tensors)
    return tensors, metadata


def _header_entry(path: Path, name: str, entry) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    """(dtype, shape, (begin, end)) of one header entry: exact JSON types, non-negative integers."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt header entry for tensor {name!r} ({why}): {str(entry)[:200]}")

    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise bad("needs dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise bad("dtype must be a string")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad("shape must be a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise bad("data_offsets must be two non-negative integers")
    return dtype, tuple(shape), (offsets[0], offsets[1])


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_no_overlap(path: Path, tensors: dict[str, TensorInfo]) -> None:
    """Two tensors sharing bytes would silently alias each other once mapped."""
    spans = sorted((info.start, info.start + info.nbytes, name) for name, info in tensors.items() if info.nbytes)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:], strict=False):  # consecutive pairs
        if begin < end:
            raise CheckpointError(f"{path}: tensors {first!r} and {second!r} share bytes (their data_offsets "
                                  "overlap); each tensor needs its own bytes")


def read_index(folder: Path) -> dict[str, str] | None:
    """The `weight_map` of the folder's index (tensor -> file, in file order), or None if unsharded."""
    index_path = folder / INDEX_FILE
    if not (index_path.exists() or index_path.is_symlink()):
        return None
    index = parse_json(read_text(index_path, "index file", CheckpointError), index_path, CheckpointError)
    try:
        weight_map = index["weight_map"]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: malformed index ({e!r})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: malformed index ('weight_map' must map names to file names)")
    return weight_map


def list_tensors(folder: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint folder (single file or index + shards), headers validated."""
    folder = Path(folder)
    check_folder(folder, "checkpoint folder", CheckpointError)
    index_path = folder / INDEX_FILE
    weight_map = read_index(folder)
    if weight_map is not None:
        shards = sorted(set(weight_map.values()))
    elif (folder / SINGLE_FILE).exists() or (folder / SINGLE_FILE).is_symlink():
        shards = [SINGLE_FILE]
    else:
        raise CheckpointError(f"{folder}: no {INDEX_FILE} and no {SINGLE_FILE}")
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        shard_path = folder / shard
        if Path(shard).name != shard:
            raise CheckpointError(f"{index_path}: names shard {shard!r}; shards are file names inside {folder}")
        if not (shard_path.exists() or shard_path.is_symlink()):
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
            size = check_regular_file(info.file, "safetensors file", CheckpointError).st_size
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
    with open_regular(path, "file", CheckpointError) as f:
        while n := f.readinto(buffer):
            digest.update(memoryview(buffer)[:n])
            if on_bytes is not None:
                on_bytes(n)
    return digest.hexdigest()
