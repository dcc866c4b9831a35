"""Flash attention backward: dq, dk, dv for the forward in flash_attention.py.

With the forward's lse (log2 domain) saved per query row, the probabilities are recomputed one
tile at a time instead of being stored (scale = 1/sqrt(D) unless given; natural-log domain below):

    p_ij  = 2^(s_ij - lse_i)  on visible (i, j), else 0     # s_ij = q_i . k_j * scale * log2(e)
    delta_i = sum_d o_id * do_id                             # = sum_j p_ij dp_ij
    dv_j  = sum_i p_ij do_i
    dp_ij = do_i . v_j,    ds_ij = p_ij (dp_ij - delta_i)
    dq_i  = scale * sum_j ds_ij k_j,    dk_j = scale * sum_i ds_ij q_i

Visibility is the forward's (key_start, key_end, causal bottom-right on the filled keys). A row
that saw no key has lse = +inf, so its p, and its gradients, are 0. As in the forward, p and ds are
rounded to the inputs' dtype before they enter a matmul; everything else is fp32.

Two kernels, neither with atomics (deterministic): `_attn_bwd_dkdv_kernel`, one program per
(BLOCK_N keys, batch x KV head), loops over every query head of the KV head's group and every query
block that can see its keys, so GQA's dk/dv are summed over the group without repeating K/V (when
that leaves SMs idle, the group is split over GROUP_SPLIT programs whose fp32 partials are summed);
`_attn_bwd_dq_kernel`, one program per (BLOCK_M queries, batch x query head), loops over the key
blocks its rows can see.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LOG2E, dot, interpreted_on, on_device, round_to, sm_count, strides3, valid_range


@triton.jit
def _probabilities(q_rows, k_rows, qk_scale, lse, offs_m, offs_n, key_start, kv_len, Lq,
                   CAUSAL: tl.constexpr, INTERPRETED: tl.constexpr):
    """p (rows of q_rows x rows of k_rows) = 2^(s - lse) where visible, else 0; offs_m / offs_n
    are the query / key indices laid out along p's axes (one of them broadcast as a column)."""
    s = dot(q_rows, tl.trans(k_rows), tl.zeros([q_rows.shape[0], k_rows.shape[0]], dtype=tl.float32),
            INTERPRETED=INTERPRETED) * qk_scale
    visible = (offs_n < kv_len) & (offs_n >= key_start)
    if CAUSAL:
        visible = visible & (offs_n <= offs_m + (kv_len - Lq))
    return tl.where(visible, tl.exp2(s - lse), 0.0)


@triton.jit
def _query_tiles(q_ptr, do_ptr, lse_ptr, delta_ptr, b, h, offs_m, offs_d, Hq, Lq, stride_qb, stride_qh, stride_qm,
                 stride_dob, stride_doh, stride_dom, HEAD_DIM: tl.constexpr):
    """The rows offs_m of query head h: q, do (0 past Lq) and their lse (+inf past Lq), delta."""
    row_ok = offs_m < Lq
    io_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=io_mask, other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=io_mask, other=0.0)
    lse = tl.load(lse_ptr + (b * Hq + h) * Lq + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_ptr + (b * Hq + h) * Lq + offs_m, mask=row_ok, other=0.0)
    return q, do, lse, delta


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, key_start_ptr, key_end_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn, Hq, Lq, Lk, qk_scale, sm_scale,
    GROUP: tl.constexpr, GROUP_SPLIT: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEY_START: tl.constexpr,
    HAS_KEY_END: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, INTERPRETED: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bs = tl.program_id(1)  # (batch, KV head, group part) = ((b * Hkv) + kv_h) * GROUP_SPLIT + part
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)
    b = (pid_bs // (Hq // GROUP * GROUP_SPLIT)).to(tl.int64)
    out_h = (pid_bs % (Hq // GROUP * GROUP_SPLIT)).to(tl.int64)  # the head index in dk / dv
    kv_h = out_h // GROUP_SPLIT
    first_h = kv_h * GROUP + out_h % GROUP_SPLIT * (GROUP // GROUP_SPLIT)
    key_start, kv_len = valid_range(key_start_ptr, key_end_ptr, b, Lk, HAS_KEY_START=HAS_KEY_START,
                                    HAS_KEY_END=HAS_KEY_END)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(k_ptr + b * stride_kb + kv_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * stride_vb + kv_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # the query blocks that can see a key of this block (none if the block holds no valid key)
    lo = 0
    if CAUSAL:  # query i sees key j only if i >= j - (kv_len - Lq)
        lo = tl.maximum(pid_n * BLOCK_N - (kv_len - Lq), 0) // BLOCK_M * BLOCK_M
    hi = tl.where((pid_n * BLOCK_N < kv_len) & (pid_n * BLOCK_N + BLOCK_N > key_start), Lq, 0)
    for g in range(GROUP // GROUP_SPLIT):  # the query heads (of this part of the group) that read kv_h
        h = first_h + g
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q, do, lse, delta = _query_tiles(q_ptr, do_ptr, lse_ptr, delta_ptr, b, h, offs_m, offs_d, Hq, Lq,
                                             stride_qb, stride_qh, stride_qm, stride_dob, stride_doh, stride_dom,
                                             HEAD_DIM=HEAD_DIM)
            # transposed tiles, (BLOCK_N, BLOCK_M): keys along rows, so dk, dv accumulate as rows
            p_t = _probabilities(k, q, qk_scale, lse[None, :], offs_m[None, :], offs_n[:, None], key_start,
                                 kv_len, Lq, CAUSAL=CAUSAL, INTERPRETED=INTERPRETED)
            dv = dot(round_to(p_t, DTYPE=do.dtype, INTERPRETED=INTERPRETED), do, dv, INTERPRETED=INTERPRETED)
            dp_t = dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), INTERPRETED=INTERPRETED)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = dot(round_to(ds_t, DTYPE=q.dtype, INTERPRETED=INTERPRETED), q, dk, INTERPRETED=INTERPRETED)
    out_mask = (offs_n[:, None] < Lk) & (offs_d[None, :] < HEAD_DIM)  # keys outside the range get 0
    tl.store(dk_ptr + b * stride_dkb + out_h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             round_to(dk * sm_scale, DTYPE=dk_ptr.dtype.element_ty, INTERPRETED=INTERPRETED), mask=out_mask)
    tl.store(dv_ptr + b * stride_dvb + out_h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             round_to(dv, DTYPE=dv_ptr.dtype.element_ty, INTERPRETED=INTERPRETED), mask=out_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, key_start_ptr, key_end_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm, Hq, Lq, Lk, qk_scale, sm_scale,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEY_START: tl.constexpr, HAS_KEY_END: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    kv_h = h // GROUP
    key_start, kv_len = valid_range(key_start_ptr, key_end_ptr, b, Lk, HAS_KEY_START=HAS_KEY_START,
                                    HAS_KEY_END=HAS_KEY_END)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q, do, lse, delta = _query_tiles(q_ptr, do_ptr, lse_ptr, delta_ptr, b, h, offs_m, offs_d, Hq, Lq,
                                     stride_qb, stride_qh, stride_qm, stride_dob, stride_doh, stride_dom,
                                     HEAD_DIM=HEAD_DIM)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = kv_len
    if CAUSAL:  # the tile's last row sees keys up to pid_m * BLOCK_M + BLOCK_M - 1 + kv_len - Lq
        hi = tl.minimum(kv_len, pid_m * BLOCK_M + BLOCK_M + (kv_len - Lq))
    k_base = k_ptr + b * stride_kb + kv_h * stride_kh
    v_base = v_ptr + b * stride_vb + kv_h * stride_vh
    for start_n in range(key_start // BLOCK_N * BLOCK_N, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        p = _probabilities(q, k, qk_scale, lse[:, None], offs_m[:, None], offs_n[None, :], key_start, kv_len,
                           Lq, CAUSAL=CAUSAL, INTERPRETED=INTERPRETED)
        dp = dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), INTERPRETED=INTERPRETED)
        ds = p * (dp - delta[:, None])
        dq = dot(round_to(ds, DTYPE=k.dtype, INTERPRETED=INTERPRETED), k, dq, INTERPRETED=INTERPRETED)
    tl.store(dq_ptr + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             round_to(dq * sm_scale, DTYPE=dq_ptr.dtype.element_ty, INTERPRETED=INTERPRETED),
             mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM))


# ----------------------------------------------------------------------------- launcher

def _backward_config(D: int, dtype: torch.dtype, interpreted: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of both backward kernels; chosen so that ptxas
    (sm_90) spills no register, checked by benchmarks/kernel_resources.py."""
    if interpreted:
        return 32, 32, 4, 1
    if dtype == torch.float32:
        return 32, 32 if D <= 128 else 16, 8, 1
    if D > 128:
        return 32, 32, 8, 1
    return 64, 64, 8, 2


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, causal: bool, scale: float | None = None,
                       key_start: torch.Tensor | None = None, key_end: torch.Tensor | None = None,
                       config=None, group_split: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `attention_forward(q, k, v, causal, scale, key_start, key_end)` -> (o, lse)
    for the output gradient do; contiguous, in the inputs' dtype. config forces the blocks,
    group_split the number of programs that share a KV head's query heads (tests)."""
    q, k, v, do = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, do))
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    dq = torch.empty((B, Hq, Lq, D), dtype=q.dtype, device=q.device)
    if dq.numel() == 0 or Lk == 0:
        return dq.zero_(), torch.zeros_like(k), torch.zeros_like(v)
    delta = (o.float() * do.float()).sum(-1).contiguous()  # (B, Hq, Lq)
    lse = lse.contiguous()
    sm_scale = D ** -0.5 if scale is None else float(scale)
    key_start, key_end = (None if t is None else t.to(device=q.device, dtype=torch.int32).contiguous()
                          for t in (key_start, key_end))
    interpreted = interpreted_on(q.device)
    block_m, block_n, num_warps, num_stages = config or _backward_config(D, q.dtype, interpreted)
    common = (q if key_start is None else key_start, q if key_end is None else key_end,
              *strides3(q), *strides3(k), *strides3(v), *strides3(do))
    group = Hq // Hkv
    n_key_blocks = triton.cdiv(Lk, block_n)
    if group_split is None:
        # Few KV heads and short sequences leave SMs idle (GLM-4 at 2k: 2 KV heads x 32 key blocks):
        # split each group's query heads over more programs, each writing fp32 partial dk / dv.
        group_split, target = 1, 4 if interpreted else sm_count(q.device)
        while n_key_blocks * B * Hkv * group_split < target and group % (2 * group_split) == 0:
            group_split *= 2
    # dk, dv: (B, Hkv * group_split, Lk, D), summed over the parts below when group_split > 1
    part_dtype = torch.float32 if group_split > 1 else k.dtype
    dk, dv = (torch.empty((B, Hkv * group_split, Lk, D), dtype=part_dtype, device=q.device) for _ in range(2))
    meta = dict(GROUP=group, CAUSAL=causal, HAS_KEY_START=key_start is not None,
                HAS_KEY_END=key_end is not None, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n,
                BLOCK_D=max(16, triton.next_power_of_2(D)), INTERPRETED=interpreted,
                num_warps=num_warps, num_stages=num_stages)
    with on_device(q.device):
        _attn_bwd_dkdv_kernel[(n_key_blocks, B * Hkv * group_split)](
            q, k, v, do, lse, delta, dk, dv, *common, *strides3(dk), *strides3(dv),
            Hq, Lq, Lk, sm_scale * LOG2E, sm_scale, GROUP_SPLIT=group_split, **meta)
        _attn_bwd_dq_kernel[(triton.cdiv(Lq, block_m), B * Hq)](
            q, k, v, do, lse, delta, dq, *common, *strides3(dq), Hq, Lq, Lk, sm_scale * LOG2E, sm_scale, **meta)
    if group_split > 1:
        dk, dv = (t.view(B, Hkv, group_split, Lk, D).sum(2).to(k.dtype) for t in (dk, dv))
    return dq, dk, dv
