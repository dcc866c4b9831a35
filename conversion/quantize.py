"""Weight-only quantization: the math and the quantized native format (`glm4v-convert --quantize`).

Which tensors: every Linear weight of the ViT, projector and decoder, lm_head included
(`LINEAR_WEIGHTS`). Embeddings, norms, biases, convolutions, cls/pos/boi/eoi keep the source dtype.

Schemes, for a Linear weight W of shape (N out, K in) stored as `P.weight` in a float folder:
- int8, symmetric, one scale per output row:
      scale[n] = max_k |W[n, k]| / 127,  q = round(W / scale) in [-127, 127],  W ~ q * scale
  tensors `P.weight_int8` int8 (N, K) and `P.weight_scale` float32 (N,).
- int4, asymmetric, groups of G consecutive inputs (G = 32, 64 or 128):
      scale[n, g] = (hi - lo) / 15,  zero[n, g] = lo,  q = round((W - zero) / scale) in [0, 15],
      W ~ q * scale + zero      (zero is the value of code 0, a float, not an integer offset)
  with lo/hi the group's min/max (round to nearest, method "rtn"), or (method "mse") the min/max
  shrunk by the per-group factor in CLIP_RATIOS that minimizes the group's squared reconstruction
  error, followed by a few rounds of: refit (scale, zero) to the chosen codes by least squares,
  re-pick the codes, keep whichever is better per group. Scales and zeros are rounded to bfloat16
  *before* the codes are chosen, so the codes are the best ones for the stored scales. Tensors:
  `P.weight_int4` uint8 (N, K / 2), two codes per byte along K, the even k in the low nibble
  (byte = q[2i] | q[2i+1] << 4);
  `P.weight_scale` and `P.weight_zero` bfloat16 (N, K / G).
- The group rule: an int4 layer whose input width K is not a multiple of G is stored as int8
  (never padded, never silently wrong); glm4v_native.json lists every layer's scheme.

Folder: config.json unchanged, safetensors shards (<= max_shard_size each), and glm4v_native.json
with `dtype` (that of the unquantized tensors) and `quantization` = {scheme, group_size, method,
int8_scale_dtype, int4_scale_dtype, layers: {weight name: "int8" | "int4"}} plus `source`
(layout, dtype, and each source file's bytes and sha256). Every shard's metadata repeats
format, dtype, quantization and group_size.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import __version__
from .atomic import check_free_space, destination_lock, no_space_named, staging
from .checkpoint import (
    CONFIG_FILE,
    FLOAT_DTYPES,
    NATIVE_FORMAT,
    NATIVE_FORMAT_VERSION,
    PROVENANCE_FILE,
    Checkpoint,
    check_tensors,
    dtype_name,
    open_checkpoint,
    read_config,
)
from .errors import ConversionError
from .safetensors_io import (
    INDEX_FILE,
    CheckpointError,
    MappedFiles,
    file_size,
    index_json,
    sha256_file,
    shard_names,
    tensor_nbytes,
    write_file,
)
from .shapes import expected_shapes

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
METHODS = ("rtn", "mse")
INT8_SCALE_DTYPE = torch.float32
INT4_SCALE_DTYPE = torch.bfloat16
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 down to 0.5: the "mse" search grid
REFIT_ROUNDS = 3  # "mse": least-squares refits of (scale, zero) after the clipping search
ROWS_PER_CHUNK = 4096  # rows quantized at once: bounds the fp32 temporaries
DEFAULT_QUANTIZED_SHARD_SIZE = 2 * 10**9  # a shard is quantized in memory before it is written

# Native names of the Linear weights; `{}` is a layer index.
LINEAR_WEIGHTS = (
    "text.layers.{}.attn.qkv.weight", "text.layers.{}.attn.out.weight",
    "text.layers.{}.mlp.gate_up.weight", "text.layers.{}.mlp.down.weight", "text.lm_head.weight",
    "vision.layers.{}.attn.qkv.weight", "vision.layers.{}.attn.out.weight",
    "vision.layers.{}.mlp.fc1.weight", "vision.layers.{}.mlp.fc2.weight",
    "projector.glu.proj.weight", "projector.glu.gate.weight", "projector.glu.up.weight", "projector.glu.down.weight",
)
_LINEAR = re.compile("|".join(re.escape(p).replace(r"\{\}", r"\d+") for p in LINEAR_WEIGHTS))


class QuantizationError(ConversionError):
    """A quantization request that cannot be honoured (scheme, group size, method); says which and why."""


def check_request(scheme: str, group_size: int | None, method: str = "rtn") -> None:
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization scheme {scheme!r}; expected one of {SCHEMES}")
    if scheme == "int4" and group_size not in GROUP_SIZES:
        raise QuantizationError(f"int4 needs a group size in {GROUP_SIZES}, got {group_size!r}")
    if scheme == "int8" and group_size is not None:
        raise QuantizationError("int8 has one scale per output row: --group-size applies to int4 only")
    if method not in METHODS:
        raise QuantizationError(f"unknown int4 method {method!r}; expected one of {METHODS}")


def is_linear_weight(name: str) -> bool:
    return _LINEAR.fullmatch(name) is not None


def layer_scheme(in_features: int, scheme: str, group_size: int | None) -> str:
    """The group rule: int4 needs K to be a multiple of the group size, else the layer is int8."""
    if scheme == "int4" and in_features % group_size == 0:
        return "int4"
    return "int8"


def quantized_layout(name: str, shape: tuple[int, int], scheme: str, group_size: int | None
                     ) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Stored tensors (name -> (dtype, shape)) that replace the Linear weight `name` of `shape`."""
    base = name.removesuffix(".weight")
    N, K = shape
    if scheme == "int8":
        return {f"{base}.weight_int8": (torch.int8, (N, K)), f"{base}.weight_scale": (INT8_SCALE_DTYPE, (N,))}
    return {f"{base}.weight_int4": (torch.uint8, (N, K // 2)),
            f"{base}.weight_scale": (INT4_SCALE_DTYPE, (N, K // group_size)),
            f"{base}.weight_zero": (INT4_SCALE_DTYPE, (N, K // group_size))}


# --- the math -----------------------------------------------------------------------------------

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (N, K) -> (q int8 (N, K), scale float32 (N,)) with W ~ q * scale[:, None]."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int, method: str = "rtn"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W (N, K) -> (packed uint8 (N, K/2), scale bf16 (N, K/G), zero bf16 (N, K/G)); see the module doc."""
    N, K = w.shape
    groups = w.float().reshape(N, K // group_size, group_size)  # (N, groups, G)
    lo, hi = groups.amin(dim=2), groups.amax(dim=2)
    ratios = CLIP_RATIOS if method == "mse" else (1.0,)
    best_err = best_scale = best_zero = None
    for r in ratios:
        scale, zero = _int4_params(lo * r, hi * r)
        err = _int4_error(groups, scale, zero)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    if method == "mse":  # then refit (scale, zero) to the chosen codes by least squares, re-pick the codes
        for _ in range(REFIT_ROUNDS):
            scale, zero = _least_squares_fit(groups, _int4_codes(groups, best_scale, best_zero).float())
            err = _int4_error(groups, scale, zero)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    q = _int4_codes(groups, best_scale, best_zero).reshape(N, K)
    return pack_int4(q), best_scale.to(INT4_SCALE_DTYPE), best_zero.to(INT4_SCALE_DTYPE)


def _int4_error(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Squared reconstruction error per group, (N, groups)."""
    deq = _int4_codes(groups, scale, zero) * scale[..., None] + zero[..., None]
    return (deq - groups).square().sum(dim=2)


def _least_squares_fit(groups: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16-rounded (scale, zero) minimizing sum (codes * scale + zero - w)^2 in each group."""
    qm, wm = codes.mean(dim=2, keepdim=True), groups.mean(dim=2, keepdim=True)
    var = (codes - qm).square().sum(dim=2)
    scale = ((codes - qm) * (groups - wm)).sum(dim=2) / var.clamp_min(1e-12)
    scale = scale.clamp_min(torch.finfo(INT4_SCALE_DTYPE).tiny)
    zero = wm[..., 0] - scale * qm[..., 0]
    return scale.to(INT4_SCALE_DTYPE).float(), zero.to(INT4_SCALE_DTYPE).float()


def _int4_params(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16-rounded (scale, zero) for a [lo, hi] range, returned in fp32 for the arithmetic."""
    scale = ((hi - lo) / 15).clamp_min(torch.finfo(INT4_SCALE_DTYPE).tiny)
    return scale.to(INT4_SCALE_DTYPE).float(), lo.to(INT4_SCALE_DTYPE).float()


def _int4_codes(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return torch.round((groups - zero[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes (N, K) in [0, 15] -> bytes (N, K/2): even k in the low nibble, odd k in the high one."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Bytes (N, K/2) -> codes (N, K) uint8: the inverse of pack_int4."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)  # (N, K/2, 2) -> (N, K)


def dequantize(stored: dict[str, torch.Tensor], group_size: int | None) -> torch.Tensor:
    """The fp32 weight (N, K) a layer's stored tensors stand for (keys as quantized_layout names them,
    any prefix): the inverse of quantize_weight up to rounding."""
    by_suffix = {name.rsplit(".", 1)[-1]: t for name, t in stored.items()}
    scale = by_suffix["weight_scale"].float()
    if "weight_int8" in by_suffix:
        return by_suffix["weight_int8"].float() * scale[:, None]
    codes = unpack_int4(by_suffix["weight_int4"]).float()
    N = codes.shape[0]
    w = codes.view(N, -1, group_size) * scale[..., None] + by_suffix["weight_zero"].float()[..., None]
    return w.view(N, -1)


def quantize_weight(w: torch.Tensor, name: str, scheme: str, group_size: int | None, method: str = "rtn"
                    ) -> dict[str, torch.Tensor]:
    """The stored tensors (named as quantized_layout names them) for Linear weight `name`.

    Rows are quantized in chunks (each row is independent), so the fp32 temporaries of the
    151552-row lm_head stay small."""
    scheme = layer_scheme(w.shape[1], scheme, group_size)
    parts = []
    for rows in w.split(ROWS_PER_CHUNK):
        parts.append(quantize_int8(rows) if scheme == "int8" else quantize_int4(rows, group_size, method))
    values = [torch.cat(p) for p in zip(*parts, strict=True)]
    return dict(zip(quantized_layout(name, tuple(w.shape), scheme, group_size), values, strict=True))


# --- the folder -------------------------------------------------------------------------------

def quantize_checkpoint(src: str | Path, dst: str | Path, scheme: str, group_size: int | None = None, *,
                        method: str = "rtn", max_shard_size: int | None = None, force: bool = False,
                        progress: bool = False) -> tuple[Path, list[str], int, float]:
    """Write a quantized native folder from an HF or (float) native folder `src`.

    Returns (dst, file names, bytes of tensor data written, seconds)."""
    from .convert import _check_destination, _real_destination, pack_shards  # the float converter's checks
    start = time.perf_counter()
    check_request(scheme, group_size, method)
    src, dst = Path(src), _real_destination(Path(dst), force)
    _check_destination(src, dst, force)  # early, before reading SRC; again below under the lock
    config = read_config(src)
    ckpt = open_checkpoint(src)
    if ckpt.provenance and "quantization" in ckpt.provenance:
        raise QuantizationError(f"{src} is already quantized ({ckpt.provenance['quantization'].get('scheme')}); "
                                "quantize a float checkpoint")
    check_tensors(ckpt, expected_shapes(config), src / CONFIG_FILE)
    stored = ckpt.dtypes()
    if len(stored) > 1:
        raise CheckpointError(f"{src}: tensors have mixed dtypes {sorted(map(str, stored))}")
    dtype = next(iter(stored))
    layers = {n: layer_scheme(info.shape[1], scheme, group_size)
              for n, info in ckpt.tensors.items() if is_linear_weight(n)}
    layout = stored_layout({n: info.shape for n, info in ckpt.tensors.items()}, dtype, layers, group_size)
    # pack source tensors into shards by their *quantized* size, in file order
    ordered = sorted(ckpt.tensors, key=lambda n: (ckpt.tensors[n].file.name, ckpt.tensors[n].start))
    out_names = {n: [o for o in layout if o == n or o.startswith(n.removesuffix("weight") + "weight_")]
                 for n in ordered}
    size = {n: sum(tensor_nbytes(layout[o][1], layout[o][0]) for o in out_names[n]) for n in ordered}
    groups = pack_shards(ordered, size.__getitem__, max_shard_size or DEFAULT_QUANTIZED_SHARD_SIZE)
    files = shard_names(len(groups))
    metadata = {"format": NATIVE_FORMAT, "format_version": NATIVE_FORMAT_VERSION, "dtype": dtype_name(dtype),
                "quantization": scheme, "group_size": str(group_size or ""), "tool": f"glm4v-convert {__version__}"}
    weight_map = {o: f for f, group in zip(files, groups, strict=True) for n in group for o in out_names[n]}
    texts = {CONFIG_FILE: (src / CONFIG_FILE).read_text()}
    if len(files) > 1:
        texts[INDEX_FILE] = index_json(weight_map, sum(tensor_nbytes(s, d) for d, s in layout.values()))
    # every shard's exact size from the layout; glm4v_native.json (its layer table and source hashes) estimated
    needed = (sum(file_size({o: layout[o] for n in group for o in out_names[n]}, metadata) for group in groups)
              + sum(len(t.encode()) for t in texts.values()) + 200 * len(layout) + 4096)
    # one writer per destination, the float converter's lock: a second run is refused naming this one,
    # and the staging folder a killed run left beside `dst` is removed (with a LeftoversWarning);
    # a disk that fills up anyway is named, with nothing partial left
    with no_space_named(dst), destination_lock(dst):
        _check_destination(src, dst, force)
        check_free_space(dst, needed)
        mapped = MappedFiles()
        with staging(dst) as tmp:
            with tqdm(total=len(ordered), unit="tensor", file=sys.stderr, disable=not progress,
                      desc=f"quantize {scheme}") as bar:
                for file, group in zip(files, groups, strict=True):
                    tensors: dict[str, torch.Tensor] = {}
                    for n in group:
                        t = mapped.tensor(ckpt.tensors[n])
                        tensors.update(quantize_weight(t, n, scheme, group_size, method) if n in layers else {n: t})
                        bar.update(1)
                    write_file(tmp / file, tensors, metadata)
            texts[PROVENANCE_FILE] = _provenance(ckpt, dtype, scheme, group_size, method, layers)
            for name, text in texts.items():
                (tmp / name).write_text(text)
    data = sum(tensor_nbytes(s, d) for d, s in layout.values())
    return dst, files + list(texts), data, time.perf_counter() - start


def stored_layout(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, layers: dict[str, str],
                  group_size: int | None) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Every stored tensor of a quantized folder: (dtype, shape) by name."""
    layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        if name in layers:
            layout.update(quantized_layout(name, shape, layers[name], group_size))
        else:
            layout[name] = (dtype, tuple(shape))
    return layout


def _provenance(ckpt: Checkpoint, dtype: torch.dtype, scheme: str, group_size: int | None, method: str,
                layers: dict[str, str]) -> str:
    files = sorted({info.file for info in ckpt.tensors.values()})
    record = {
        "format": NATIVE_FORMAT, "format_version": NATIVE_FORMAT_VERSION,
        "tool": "glm4v-convert", "tool_version": __version__, "dtype": dtype_name(dtype),
        "quantization": {"scheme": scheme, "group_size": group_size, "method": method if scheme == "int4" else None,
                         "int8_scale_dtype": dtype_name(INT8_SCALE_DTYPE),
                         "int4_scale_dtype": dtype_name(INT4_SCALE_DTYPE), "layers": dict(sorted(layers.items()))},
        "source": {"layout": ckpt.layout, "dtype": dtype_name(dtype),
                   "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}},
    }
    return json.dumps(record, indent=2) + "\n"


# --- reading back -------------------------------------------------------------------------------

def quantization_record(ckpt: Checkpoint) -> dict[str, Any] | None:
    """The `quantization` entry of a native folder's glm4v_native.json, checked; None for a float folder."""
    record = (ckpt.provenance or {}).get("quantization")
    if record is None:
        return None
    path = ckpt.folder / PROVENANCE_FILE
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: `quantization` must be an object")
    try:
        check_request(record.get("scheme"), record.get("group_size"), record.get("method") or "rtn")
    except QuantizationError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if ckpt.provenance.get("dtype") not in {dtype_name(d) for d in FLOAT_DTYPES}:
        raise CheckpointError(f"{path}: unknown dtype {ckpt.provenance.get('dtype')!r}")
    return record


def quantized_scheme_of(folder: str | Path) -> str | None:
    """The scheme a folder's glm4v_native.json records (None: not a quantized folder); reads nothing else."""
    try:
        record = json.loads((Path(folder) / PROVENANCE_FILE).read_text()).get("quantization")
    except (OSError, ValueError, AttributeError):
        return None
    return record.get("scheme", "?") if isinstance(record, dict) else None


def check_quantized_tensors(ckpt: Checkpoint, expected: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                            config_path: Path) -> None:
    """Every expected tensor present, nothing extra, the exact dtype and shape of each."""
    missing = [n for n in expected if n not in ckpt.tensors]
    if missing:
        raise CheckpointError(f"{ckpt.folder}: missing tensor {missing[0]!r}, which {config_path} and "
                              f"{PROVENANCE_FILE}'s quantization require" + (f" (and {len(missing) - 1} more)"
                                                                             if len(missing) > 1 else ""))
    for name, info in ckpt.tensors.items():
        if name not in expected:
            raise CheckpointError(f"{info.file}: unexpected tensor {name!r} for this config and quantization")
        dtype, shape = expected[name]
        if info.shape != tuple(shape):
            raise CheckpointError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, expected "
                                  f"{list(shape)}")
        if info.dtype != dtype:
            raise CheckpointError(f"{info.file}: tensor {name!r} is {info.dtype}, expected {dtype}")
