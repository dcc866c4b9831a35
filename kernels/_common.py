"""Helpers the kernel files share: where kernels can run, the current device, rounding casts, exact
dots, and the valid key range of a batch row."""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
LOG2E = 1.4426950408889634  # scores are kept in the log2 domain: exp2 replaces exp


@triton.jit
def round_to(x, DTYPE: tl.constexpr, INTERPRETED: tl.constexpr):
    """Cast fp32 -> DTYPE rounding to nearest even, as torch and the GPU's cvt.rn do.

    The Triton CPU interpreter (3.x) truncates fp32 -> bf16 casts, so there we round by hand:
    add half an ulp (minus one, plus the lowest kept bit for ties-to-even) and drop 16 bits.
    """
    if INTERPRETED and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def dot(a, b, acc, INTERPRETED: tl.constexpr):
    if INTERPRETED:  # the CPU interpreter multiplies bf16 as raw integers: widen (exactly) first
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision="ieee")  # fp32 inputs: exact products, no tf32


@triton.jit
def valid_range(key_start_ptr, key_end_ptr, b, Lk, HAS_KEY_START: tl.constexpr, HAS_KEY_END: tl.constexpr):
    """(key_start, kv_len) of batch row b, loaded on the device: its valid keys are [key_start, kv_len)."""
    key_start = 0
    if HAS_KEY_START:
        key_start = tl.maximum(tl.load(key_start_ptr + b), 0)
    kv_len = Lk
    if HAS_KEY_END:
        kv_len = tl.minimum(tl.maximum(tl.load(key_end_ptr + b), 0), Lk)
    return key_start, kv_len


def interpreted_on(device: torch.device) -> bool:
    """True when kernels run in the Triton interpreter (TRITON_INTERPRET=1, any device); raises
    where Triton cannot run at all (a CPU tensor without the interpreter)."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type == "cuda" or (device.type == "cpu" and interpret):
        return interpret
    raise RuntimeError(f"Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 (set before "
                       f"importing triton) for CPU tensors; got a tensor on {device}")


def on_device(device: torch.device):
    """Triton launches on the *current* CUDA device and stream: make that the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def strides3(t: torch.Tensor) -> tuple[int, int, int]:
    """The batch, head and sequence strides of a (B, H, L, D) tensor (D has unit stride)."""
    return t.stride(0), t.stride(1), t.stride(2)


def sm_count(device: torch.device) -> int:
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count_of(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count
