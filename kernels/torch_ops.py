"""The public kernel entry points: input checks, then one torch custom op per kernel call.

A custom op is one opaque node to torch.compile (no graph break; its output shapes come from the
`register_fake` function) and a plain series of kernel launches to a CUDA graph. Each op's backward
is registered with autograd and is a custom op too, so a compiled training step stays whole.
The Python checks run before the op, where torch.compile traces them away.
"""
from __future__ import annotations

import torch

from . import flash_attention as A
from . import fused_rms_norm as R
from ._common import FLOAT_DTYPES, INT_DTYPES, interpreted_on
from .flash_attention_backward import attention_backward

ATTENTION_ARGS = "Tensor q, Tensor k, Tensor v, bool causal, float? scale, Tensor? key_start, Tensor? key_end"


# ----------------------------------------------------------------------------- attention

@torch.library.custom_op("glm4v_kernels::attention", mutates_args=(),
                         schema=f"({ATTENTION_ARGS}) -> (Tensor, Tensor)")
def _attention_op(q, k, v, causal, scale, key_start, key_end):
    return A.attention_forward(q, k, v, causal, scale, key_start, key_end)


@_attention_op.register_fake
def _(q, k, v, causal, scale, key_start, key_end):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)  # o, lse (B, Hq, Lq)


@torch.library.custom_op("glm4v_kernels::attention_backward", mutates_args=(),
                         schema=f"(Tensor do, Tensor o, Tensor lse, {ATTENTION_ARGS}) -> (Tensor, Tensor, Tensor)")
def _attention_backward_op(do, o, lse, q, k, v, causal, scale, key_start, key_end):
    return attention_backward(do, q, k, v, o, lse, causal, scale, key_start, key_end)


@_attention_backward_op.register_fake
def _(do, o, lse, q, k, v, causal, scale, key_start, key_end):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup(ctx, inputs, output):
    q, k, v, ctx.causal, ctx.scale, key_start, key_end = inputs
    ctx.save_for_backward(q, k, v, *output, key_start, key_end)


def _attention_grad(ctx, do, _dlse):
    q, k, v, o, lse, key_start, key_end = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(do, o, lse, q, k, v, ctx.causal, ctx.scale, key_start, key_end)
    return dq, dk, dv, None, None, None, None


_attention_op.register_autograd(_attention_grad, setup_context=_attention_setup)


def _check_attention(q, k, v, causal, scale, key_start, key_end) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"attention: {name} must be 4-D (B, H, L, D), got shape {tuple(t.shape)}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"attention: q, k, v must share one dtype among float16/bfloat16/float32; "
                        f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"attention: q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    (B, Hq, _, D), (Bk, Hkv, _, Dk) = q.shape, k.shape
    if v.shape != k.shape or Bk != B or Dk != D:
        raise ValueError(f"attention: expected q (B, Hq, Lq, D) and k, v (B, Hkv, Lk, D); got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"attention: query heads Hq={Hq} must be a multiple of KV heads Hkv={Hkv} "
                         f"(q {tuple(q.shape)}, k {tuple(k.shape)})")
    if D % 8 or not 8 <= D <= 256:
        raise ValueError(f"attention: head dim D={D} unsupported: needs a multiple of 8 in 8..256")
    if not isinstance(causal, bool):
        raise TypeError(f"attention: causal must be a bool, got {type(causal).__name__}")
    if scale is not None and not isinstance(scale, (float, int)):
        raise TypeError(f"attention: scale must be a float or None, got {type(scale).__name__}")
    for name, t, what in (("key_start", key_start, "first valid key"), ("key_end", key_end, "end of valid keys")):
        if t is not None and not (isinstance(t, torch.Tensor) and t.shape == (B,) and t.dtype in INT_DTYPES):
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else t
            raise ValueError(f"attention: {name} must be an integer tensor of shape ({B},) (each row's "
                             f"{what}); got {got!s:.60}")
    interpreted_on(q.device)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float | None = None,
              key_start: torch.Tensor | None = None, key_end: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention, q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D) -> (B, Hq, Lq, D) in q's dtype.

    Same contract as `attention_ref` (key_start / key_end: each row's valid key range, read on the
    device); differentiable in q, k and v. Lq <= 16 takes the split-K decode kernel.
    """
    _check_attention(q, k, v, causal, scale, key_start, key_end)
    return _attention_op(q, k, v, causal, None if scale is None else float(scale), key_start, key_end)[0]


# ----------------------------------------------------------------------------- RMSNorm

@torch.library.custom_op("glm4v_kernels::rms_norm", mutates_args=(),
                         schema="(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)")
def _rms_norm_op(x, weight, eps):
    y, _, rstd = R.rms_norm_forward(R.rows(x), weight, eps)
    return y.view(x.shape), rstd.view(x.shape[:-1])


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)  # y, rstd


@torch.library.custom_op("glm4v_kernels::add_rms_norm", mutates_args=(),
                         schema="(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)")
def _add_rms_norm_op(x, residual, weight, eps):
    y, s, rstd = R.rms_norm_forward(R.rows(x), weight, eps, residual=R.rows(residual))
    return y.view(x.shape), s.view(x.shape), rstd.view(x.shape[:-1])


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("glm4v_kernels::rms_norm_backward", mutates_args=(),
                         schema="(Tensor dy, Tensor x, Tensor weight, Tensor rstd, Tensor? ds) -> (Tensor, Tensor)")
def _rms_norm_backward_op(dy, x, weight, rstd, ds):
    dx, dw = R.rms_norm_backward(R.rows(dy), R.rows(x), weight, rstd.reshape(-1),
                                 None if ds is None else R.rows(ds))
    return dx.view(x.shape), dw.to(weight.dtype)


@_rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd, ds):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[-1])


def _rms_norm_grad(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    return *_rms_norm_backward_op(dy, x, weight, rstd, None), None


def _add_rms_norm_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], inputs[2], output[2])  # s = x + residual, weight, rstd


def _add_rms_norm_grad(ctx, dy, ds, _drstd):
    s, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_backward_op(dy, s, weight, rstd, ds)
    return dx, dx, dw, None  # s = x + residual: both get d(s)


_rms_norm_op.register_autograd(_rms_norm_grad, setup_context=_rms_norm_setup)
_add_rms_norm_op.register_autograd(_add_rms_norm_grad, setup_context=_add_rms_norm_setup)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """GLM-4 RMSNorm of x (..., N) over its last dim (spec: `rms_norm_ref`); differentiable."""
    R.check(x, weight, eps)
    return _rms_norm_op(x, weight, float(eps))[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(s), s) with s = x + residual rounded to x's dtype (spec: `add_rms_norm_ref`); differentiable."""
    R.check(x, weight, eps, residual)
    y, s, _ = _add_rms_norm_op(x, residual, weight, float(eps))
    return y, s
