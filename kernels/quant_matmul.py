"""Weight-only quantized matmul: y = x @ dequant(W).T with the dequantization fused into the loads.

Weights (the quantized native format): W is (N out, K in).
- int8: q int8 (N, K), scale (N,):                W[n, k] = q[n, k] * scale[n]
- int4: packed uint8 (N, K/2), scale/zero (N, K/G): W[n, k] = code(n, k) * scale[n, k//G] + zero[n, k//G],
        code(n, k) = (packed[n, k//2] >> 4*(k%2)) & 0xF  (even k in the low nibble)

Two kernels, both reading each weight byte once per output tile:
- `_gemv_kernel` (decode, M <= 8 rows): one program per (row, BLOCK_N outputs); a multiply and a
  row-sum over BLOCK_K inputs per step, no tensor cores: decode is bound by weight bytes.
- `_gemm_kernel` (prefill): BLOCK_M x BLOCK_N tiles, the dequantized BLOCK_N x BLOCK_K weight tile
  fed to tl.dot in the activation dtype; fp32 accumulation in both.
The int8 row scale is applied once to the fp32 accumulator; int4 scales and zeros per element.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreted_on, on_device, round_to

GEMV_MAX_ROWS = 8


def dequantize_int8_ref(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


def dequantize_int4_ref(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                        dtype: torch.dtype) -> torch.Tensor:
    N = packed.shape[0]
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).view(N, -1, group_size)  # (N, K/G, G), k in order
    w = codes.to(torch.float32) * scale.float()[..., None] + zero.float()[..., None]
    return w.view(N, -1).to(dtype)  # (N, K)


def int8_matmul_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ (q * scale).T -> (..., N): dequantize to x's dtype, then matmul (differentiable in x)."""
    return x @ dequantize_int8_ref(q, scale, x.dtype).T


def int4_matmul_ref(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """x (..., K) @ dequant(W).T -> (..., N), W from packed int4 codes with group scales and zeros."""
    return x @ dequantize_int4_ref(packed, scale, zero, group_size, x.dtype).T


@triton.jit
def _load_weight_tile(w_ptr, scale_ptr, zero_ptr, offs_n, offs_k, N, K, stride_wn, stride_sn,
                      GROUP: tl.constexpr, IS_INT4: tl.constexpr):
    """The (BLOCK_N, BLOCK_K) weight tile in fp32: int8 codes as they are (row scale applied later),
    int4 codes already scaled and shifted by their group's scale and zero."""
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    if IS_INT4:
        byte = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] // 2, mask=mask, other=0)
        code = ((byte.to(tl.int32) >> ((offs_k[None, :] % 2) * 4)) & 0xF).to(tl.float32)
        g = offs_n[:, None] * stride_sn + offs_k[None, :] // GROUP
        s = tl.load(scale_ptr + g, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(zero_ptr + g, mask=mask, other=0.0).to(tl.float32)
        return code * s + z
    return tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0).to(tl.float32)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, scale_ptr, zero_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                 GROUP: tl.constexpr, IS_INT4: tl.constexpr, INTERPRETED: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        w = _load_weight_tile(w_ptr, scale_ptr, zero_ptr, offs_n, offs_k, N, K, stride_wn, stride_sn, GROUP, IS_INT4)
        acc += tl.sum(w * x[None, :], axis=1)
    if not IS_INT4:
        acc *= tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    y = round_to(acc, y_ptr.dtype.element_ty, INTERPRETED)
    tl.store(y_ptr + m * stride_ym + offs_n, y, mask=offs_n < N)


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, scale_ptr, zero_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                 GROUP: tl.constexpr, IS_INT4: tl.constexpr, INTERPRETED: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _load_weight_tile(w_ptr, scale_ptr, zero_ptr, offs_n, offs_k, N, K, stride_wn, stride_sn, GROUP, IS_INT4)
        if INTERPRETED:  # the CPU interpreter multiplies bf16 as raw integers: widen (exactly) first
            acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
        else:  # fp32 activations: exact products (no tf32); bf16/fp16: the weight tile rounded to x's dtype
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision="ieee")
    if not IS_INT4:
        acc *= tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y = round_to(acc, y_ptr.dtype.element_ty, INTERPRETED)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y, mask=mask)


def launch_config(gemv: bool, dtype: torch.dtype, is_int4: bool) -> tuple[dict, int, int]:
    """(block sizes, num_warps, num_stages): chosen so that no config spills registers on sm_90
    (tests/test_kernels_quant_matmul.py compiles each one ahead of time and checks). int4 tiles hold a
    scale and a zero per element, so they get fewer elements per thread."""
    if gemv:
        return (dict(BLOCK_N=16, BLOCK_K=256) if is_int4 else dict(BLOCK_N=64, BLOCK_K=128)), 4, 1
    if dtype == torch.float32:  # fp32 dots run on CUDA cores: small tiles
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32), 4, 2
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), 8, 3


def _launch(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, N: int,
            group_size: int) -> torch.Tensor:
    K = x.shape[-1]
    x2 = x.reshape(-1, K).contiguous()  # (M, K)
    M = x2.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    is_int4 = zero is not None
    zero = zero if is_int4 else scale  # unused pointer for int8
    interpreted = interpreted_on(x.device)
    gemv = M <= GEMV_MAX_ROWS
    blocks, num_warps, num_stages = launch_config(gemv, x.dtype, is_int4)
    with on_device(x.device):
        if gemv:
            grid = (M, triton.cdiv(N, blocks["BLOCK_N"]))
            _gemv_kernel[grid](x2, w, scale, zero, y, N, K, x2.stride(0), w.stride(0), scale.stride(0), y.stride(0),
                               GROUP=group_size, IS_INT4=is_int4, INTERPRETED=interpreted, **blocks,
                               num_warps=num_warps, num_stages=num_stages)
        else:
            grid = (triton.cdiv(M, blocks["BLOCK_M"]), triton.cdiv(N, blocks["BLOCK_N"]))
            _gemm_kernel[grid](x2, w, scale, zero, y, M, N, K, x2.stride(0), w.stride(0), scale.stride(0),
                               y.stride(0), GROUP=group_size, IS_INT4=is_int4, INTERPRETED=interpreted, **blocks,
                               num_warps=num_warps, num_stages=num_stages)
    return y.view(*x.shape[:-1], N)


# One torch custom op per kernel call: an opaque node to torch.compile (no graph break; shapes from
# the fake), a plain kernel launch to a CUDA graph. Checks run before the op, in Python.

@torch.library.custom_op("glm4v_kernels::int8_matmul", mutates_args=())
def _int8_op(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _launch(x, q, scale, None, q.shape[0], 1)


@_int8_op.register_fake
def _(x, q, scale):
    return x.new_empty(*x.shape[:-1], q.shape[0])


@torch.library.custom_op("glm4v_kernels::int4_matmul", mutates_args=())
def _int4_op(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
             group_size: int) -> torch.Tensor:
    return _launch(x, packed, scale, zero, packed.shape[0], group_size)


@_int4_op.register_fake
def _(x, packed, scale, zero, group_size):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Triton version of int8_matmul_ref (forward only)."""
    if q.dtype != torch.int8 or q.shape[1] != x.shape[-1] or scale.shape != (q.shape[0],):
        raise ValueError(f"int8_matmul: x (..., {x.shape[-1]}), q {q.dtype} {tuple(q.shape)}, scale "
                         f"{tuple(scale.shape)}: expected int8 (N, K) and (N,)")
    return _int8_op(x, q.contiguous(), scale.contiguous())


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """Triton version of int4_matmul_ref (forward only)."""
    N, K = packed.shape[0], 2 * packed.shape[1]
    if (packed.dtype != torch.uint8 or x.shape[-1] != K or scale.shape != (N, K // group_size)
            or zero.shape != scale.shape):
        raise ValueError(f"int4_matmul: x (..., {x.shape[-1]}), packed {packed.dtype} {tuple(packed.shape)}, scale "
                         f"{tuple(scale.shape)}, zero {tuple(zero.shape)}, group {group_size}: expected uint8 "
                         "(N, K/2) and (N, K/G) twice")
    return _int4_op(x, packed.contiguous(), scale.contiguous(), zero.contiguous(), group_size)
