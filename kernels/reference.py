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
    KV head h // (Hq // Hkv). Each row b's valid keys are key_start[b] <= j < key_end[b]:
    key_start (B,) int, optional, is the first valid key (left padding; None means 0); key_end
    (B,) int, optional, is one past the last valid key (a static cache filled up to there; None
    means Lk, larger values are clamped to Lk). causal=True aligns the last query with the last
    valid key: query i sees keys j <= i + key_end[b] - Lq. A query row that sees no key at all
    (a pad query) returns zeros. Returns (B, Hq, Lq, D) in q's dtype.

    No branch depends on tensor values, so torch.compile(fullgraph=True) traces it whole.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if Lq == 1:  # decode: the one query sees every valid key, causal or not
        causal = False
        if Hq != Hkv:  # each group's query heads become queries of its KV head: no K/V copy per head
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
    cols = torch.arange(Lk, device=q.device)  # (Lk,)
    end = torch.full((B,), Lk, device=q.device) if key_end is None else key_end.to(q.device).clamp(max=Lk)
    end = end[:, None, None, None]  # (B, 1, 1, 1)
    allowed = cols < end  # (B, 1, 1, Lk)
    if causal:
        rows = torch.arange(Lq, device=q.device)[:, None]  # (Lq, 1)
        allowed = allowed & (cols <= rows + end - Lq)  # (B, 1, Lq, Lk)
    if key_start is not None:
        allowed = allowed & (cols >= key_start.to(q.device)[:, None, None, None])
    allowed = allowed.expand(B, 1, Lq, Lk)
    sees_any = allowed.any(-1, keepdim=True)  # (B, 1, Lq, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~sees_any, scale=scale)
    return out.masked_fill(~sees_any, 0.0)
