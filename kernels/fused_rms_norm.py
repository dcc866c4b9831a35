"""Fused RMSNorm with GLM-4 numerics, and the fused residual-add + RMSNorm, forward and backward.

Per row x of length N, with weight w (spec: `rms_norm_ref`, `add_rms_norm_ref`):

    rstd = 1 / sqrt(mean(x^2) + eps)          # fp32; eps pinned to fp32 (1.5625e-7 in GLM-4)
    y    = (w * (x * rstd)).to(x.dtype)      # weight multiplied in fp32: ONE cast, at the end

The decoder's residual step `s = x + residual` is fused in front of it; s is rounded to the input
dtype *before* it is normalized (it is the residual stream kept for the next block), so the kernel
returns exactly `(rms_norm(s), s)` with s bit-identical to torch's `x + residual`.

Backward, in fp32, with x_hat = x * rstd and g = dy * w:

    dx = rstd * (g - x_hat * mean(g * x_hat))
    dw = sum over rows of dy * x_hat            # per-program partial sums, then one torch sum
    add_rms_norm: d(x) = d(residual) = dx.to(dtype) + d(s)   (autograd's order of rounding)

One program normalizes one row held in registers (BLOCK_N = next_power_of_2(N), N <= 16384).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, interpreted_on, on_device, round_to, sm_count

MAX_N = 16384  # one row lives in registers (wider rows spill); GLM-4V rows are 1792 and 4096 wide


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, x_row_stride, res_ptr, res_row_stride, w_ptr, y_ptr, y_row_stride,
    s_ptr, s_row_stride, rstd_ptr, N, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x32 = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        res32 = tl.load(res_ptr + row * res_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        # rounded to the input dtype FIRST
        s = round_to(x32 + res32, DTYPE=s_ptr.dtype.element_ty, INTERPRETED=INTERPRETED)
        tl.store(s_ptr + row * s_row_stride + cols, s, mask=mask)
        x32 = s.to(tl.float32)
    eps32 = tl.cast(eps, tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x32 * x32, axis=0) / N + eps32)
    w32 = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = w32 * (x32 * rstd)  # the reference's order: normalize, then weight, all fp32
    tl.store(y_ptr + row * y_row_stride + cols, round_to(y, DTYPE=y_ptr.dtype.element_ty, INTERPRETED=INTERPRETED),
             mask=mask)
    tl.store(rstd_ptr + row, rstd)  # for the backward


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, dy_row_stride, x_ptr, x_row_stride, w_ptr, rstd_ptr, ds_ptr, ds_row_stride,
    dx_ptr, dx_row_stride, dw_part_ptr, n_rows, rows_per_program, N,
    HAS_DS: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRETED: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w32 = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        x32 = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        dy32 = tl.load(dy_ptr + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        x_hat = x32 * rstd
        g = dy32 * w32
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / N))
        if HAS_DS:  # autograd rounds the norm's grad to the dtype, then adds d(s)
            dx = round_to(dx, DTYPE=dx_ptr.dtype.element_ty, INTERPRETED=INTERPRETED).to(tl.float32)
            dx += tl.load(ds_ptr + row * ds_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * dx_row_stride + cols,
                 round_to(dx, DTYPE=dx_ptr.dtype.element_ty, INTERPRETED=INTERPRETED),
                 mask=mask)
        dw_acc += dy32 * x_hat
    tl.store(dw_part_ptr + pid * N + cols, dw_acc, mask=mask)


# ----------------------------------------------------------------------------- launchers

def _num_warps(block_n: int) -> int:
    return 4 if block_n < 2048 else 8 if block_n < 8192 else 16


def rows(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (rows, N) with unit column stride; copies only a non-viewable layout."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def check(x: torch.Tensor, weight: torch.Tensor, eps: float,
           residual: torch.Tensor | None = None) -> None:
    for name, t in (("x", x), ("weight", weight), ("residual", residual)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"rms_norm: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in FLOAT_DTYPES or weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"rms_norm: x and weight must be float16/bfloat16/float32, "
                        f"got x {x.dtype}, weight {weight.dtype}")
    if x.ndim < 1 or weight.ndim != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight must be 1-D with x's last dim; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if not 1 <= x.shape[-1] <= MAX_N:
        raise ValueError(f"rms_norm: last dim must be in 1..{MAX_N}, got x {tuple(x.shape)}")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: x on {x.device} but weight on {weight.device}")
    if not isinstance(eps, (float, int)):
        raise TypeError(f"rms_norm: eps must be a float, got {type(eps).__name__}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.device != x.device):
        raise ValueError(f"add_rms_norm: residual must match x in shape, dtype and device; got x "
                         f"{tuple(x.shape)} {x.dtype} {x.device}, residual {tuple(residual.shape)} "
                         f"{residual.dtype} {residual.device}")
    interpreted_on(x.device)


def rms_norm_forward(x, weight, eps, residual=None):
    """Returns (y, s or None, rstd); x and residual are (rows, N) with unit column stride."""
    n_rows, N = x.shape
    y = torch.empty((n_rows, N), dtype=x.dtype, device=x.device)
    s = torch.empty_like(y) if residual is not None else None
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, s, rstd
    block_n = triton.next_power_of_2(N)
    res = residual if residual is not None else x  # placeholders never read: HAS_RESIDUAL is off
    with on_device(x.device):
        _rms_norm_fwd_kernel[(n_rows,)](
            x, x.stride(0), res, res.stride(0), weight.contiguous(), y, y.stride(0),
            s if s is not None else y, y.stride(0), rstd, N, float(eps),
            HAS_RESIDUAL=residual is not None, BLOCK_N=block_n,
            INTERPRETED=interpreted_on(x.device), num_warps=_num_warps(block_n))
    return y, s, rstd


def rms_norm_backward(dy, x, weight, rstd, ds=None):
    """Returns (dx, dw in fp32); every tensor is (rows, N) with unit column stride."""
    n_rows, N = x.shape
    interpreted = interpreted_on(x.device)
    n_programs = max(1, min(n_rows, 4 if interpreted else 2 * sm_count(x.device)))
    rows_per_program = triton.cdiv(n_rows, n_programs)
    dx = torch.empty_like(x)
    dw_part = torch.zeros((n_programs, N), dtype=torch.float32, device=x.device)
    block_n = triton.next_power_of_2(N)
    ds_ = ds if ds is not None else dy
    with on_device(x.device):
        _rms_norm_bwd_kernel[(n_programs,)](
            dy, dy.stride(0), x, x.stride(0), weight.contiguous(), rstd, ds_, ds_.stride(0),
            dx, dx.stride(0), dw_part, n_rows, rows_per_program, N,
            HAS_DS=ds is not None, BLOCK_N=block_n, INTERPRETED=interpreted,
            num_warps=_num_warps(block_n))
    return dx, dw_part.sum(0)
