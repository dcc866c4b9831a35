"""Pure-torch references for the kernels: the executable spec and the CPU fallback.

These follow the HF reference numerics op for op, so that the torch path reproduces its
outputs bit for bit (in bf16 too). The Triton kernels are checked against these.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """GLM-4 RMSNorm: y = (w * (x * rsqrt(mean(x^2) + eps))).to(x.dtype).

    Everything in fp32, the weight multiply too; one cast at the very end
    (unlike Llama, which casts before multiplying by the weight).
    """
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    return (weight.float() * (x32 * torch.rsqrt(variance + eps))).to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """new_residual = x + residual (in the input dtype); returns (rms_norm(new_residual), new_residual)."""
    new_residual = x + residual
    return rms_norm_ref(new_residual, weight, eps), new_residual


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                  scale: float | None = None, key_start: torch.Tensor | None = None,
                  key_end: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention with grouped KV heads.

    q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D) with Hq a multiple of Hkv; query head h reads
    KV head h // (Hq // Hkv). Row b sees keys key_start[b] <= j < key_end[b] ((B,) int tensors;
    None: from 0, to Lk): left padding, and the filled part of a static cache. causal=True aligns
    the last query with the last visible key: query i sees keys j <= i + key_end[b] - Lq. A query
    row that sees no key at all (a pad query) returns zeros. Returns (B, Hq, Lq, D) in q's dtype.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if Lq == 1 and key_end is None:  # decode over exactly the filled keys: causal is moot for one query
        causal = False
    if Lq == 1 and not causal and Hq != Hkv:  # each group's query heads become queries of its KV head
        out = attention_ref(q.reshape(B, Hkv, Hq // Hkv, D), k, v, causal=False, scale=scale,
                            key_start=key_start, key_end=key_end)
        return out.reshape(B, Hq, 1, D)
    if Hq != Hkv:  # repeat each KV head for its query group, like the HF reference does
        k = k[:, :, None].expand(B, Hkv, Hq // Hkv, Lk, D).reshape(B, Hq, Lk, D)
        v = v[:, :, None].expand(B, Hkv, Hq // Hkv, Lk, D).reshape(B, Hq, Lk, D)
    if key_start is None and key_end is None and not causal:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if key_start is None and key_end is None and Lq == Lk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    cols = torch.arange(Lk, device=q.device)
    allowed = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=q.device)
    end = Lk if key_end is None else key_end.to(q.device)[:, None, None, None]
    if key_end is not None:
        allowed = allowed & (cols < end)
    if causal:
        rows = torch.arange(Lq, device=q.device)[:, None]
        allowed = allowed & (cols <= rows + (end - Lq))
    if key_start is not None:
        allowed = allowed & (cols >= key_start.to(q.device)[:, None, None, None])
    sees_any = allowed.any(-1, keepdim=True)  # (B, 1, Lq, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~sees_any, scale=scale)
    return out.masked_fill(~sees_any, 0.0)
