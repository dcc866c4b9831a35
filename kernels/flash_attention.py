"""Flash attention forward: causal GQA prefill, bidirectional ViT (head_dim 112), and decode.

Spec: `attention_ref`. For query i of a (batch b, query head h) pair, with scores kept in the log2
domain so that exp2 replaces exp, and n_b = min(key_end[b], Lk) the number of filled keys:

    s_ij = (q_i . k_j) * scale * log2(e)                   # fp32; scale defaults to 1/sqrt(D)
    visible(i, j) = key_start[b] <= j < n_b  and  (not causal or j <= i + n_b - Lq)
    o_i = sum_j 2^(s_ij - m_i) v_j / sum_j 2^(s_ij - m_i)    # over visible j; 0 if none is visible
    lse_i = m_i + log2(sum_j 2^(s_ij - m_i))               # kept for the backward; +inf if none

Online softmax, one key block at a time (m, l, acc in fp32; P rounded to v's dtype before P @ V,
as FlashAttention does):  m' = max(m, rowmax(s)),  alpha = 2^(m - m'),
l' = alpha * l + rowsum(2^(s - m')),  acc' = alpha * acc + 2^(s - m') @ V.

Query head h reads KV head h // GROUP (GROUP = Hq / Hkv) through its strides: K/V are never
repeated in memory, and may be views of a static cache (any batch/head/sequence strides).
key_start and key_end are read on the device: loop bounds come from them (a program never visits
a block past key_end), while launch grids depend only on shapes, so nothing syncs with the host
and a decode step over a fixed-size cache can be captured in a CUDA graph.
Head dims: any multiple of 8 up to 256. BLOCK_D = next_power_of_2(D), at least 16 (tl.dot's
smallest K); the padded columns load as zeros, which change neither q.k nor P @ V.

Keys are visited in three ranges (`_attend`) so the mask is built only where it can bite: the
block holding key_start (left padding), the blocks every row of the tile sees in full (no mask),
then the causal diagonal and ragged tail. A causal tile stops at its last row's limit.

Prefill (`_attn_fwd_kernel`): one program per (BLOCK_M queries, batch x query head).
Decode (`_attn_decode_kernel`, Lq <= 16): a program's rows are all (query head of one KV group,
query) pairs, so a group's heads share every K/V load; the filled keys are cut into n_splits
chunks (flash-decoding). Each chunk stores its normalized output o_s and lse_s, and
`_attn_combine_kernel` merges them: o = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M), M = max lse_s.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LOG2E, dot, interpreted_on, on_device, round_to, sm_count, strides3, valid_range

DECODE_MAX_LQ = 16  # Lq <= this takes the split-K decode path
MAX_SPLITS = 64     # the combine kernel holds (splits x BLOCK_D) fp32 partials in registers


@triton.jit
def _load_keys(ptrs, cols, kv_len, offs_d, MASK_KEYS: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """A (BLOCK_N, BLOCK_D) block of K or V: zeros past kv_len (if MASK_KEYS) and past HEAD_DIM."""
    if MASK_KEYS:
        return tl.load(ptrs, mask=(cols[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    elif HEAD_DIM == BLOCK_D:  # full blocks of a power-of-two head dim: no mask at all
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def _attn_tile(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, lo, hi, kv_len, key_start,
               row_limit, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               INTERPRETED: tl.constexpr):
    """Online-softmax update over the key blocks starting at lo, lo + BLOCK_N, ... < hi."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_keys(k_base + cols[:, None] * stride_kn + offs_d[None, :], cols, kv_len, offs_d,
                       MASK_KEYS=MASKED, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
        # a real zero accumulator: triton < 3.4 cannot pass acc=None through a nested jit function
        s = dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), INTERPRETED=INTERPRETED)
        s = s * qk_scale  # (BLOCK_M, BLOCK_N)
        if MASKED:
            visible = (cols[None, :] < kv_len) & (cols[None, :] >= key_start)
            if CAUSAL:
                visible = visible & (cols[None, :] <= row_limit[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = m_new
        if MASKED:  # a row that sees nothing yet keeps m = -inf: subtract 0 instead (2^-inf = 0)
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_keys(v_base + cols[:, None] * stride_vn + offs_d[None, :], cols, kv_len, offs_d,
                       MASK_KEYS=MASKED, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
        p = round_to(p, DTYPE=v.dtype, INTERPRETED=INTERPRETED)
        acc = dot(p, v, acc * alpha[:, None], INTERPRETED=INTERPRETED)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attend(q, k_base, v_base, stride_kn, stride_vn, lo, hi, kv_len, key_start, row_limit,
            first_row_limit, qk_scale, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            INTERPRETED: tl.constexpr):
    """Attend q to keys [lo, hi) (lo a multiple of BLOCK_N); returns (acc, l, m).

    first_row_limit: the last key the tile's first row may see (kv_len - 1 when not causal).
    """
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    full_begin = tl.maximum(lo, (key_start + BLOCK_N - 1) // BLOCK_N * BLOCK_N)
    full_end = tl.minimum(hi, tl.maximum(tl.minimum(kv_len, first_row_limit + 1), 0) // BLOCK_N * BLOCK_N)
    full_end = tl.maximum(full_end, full_begin)
    # 1) the block holding the first valid key, when left padding does not end on a block edge
    acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                               tl.maximum(lo, key_start // BLOCK_N * BLOCK_N), tl.minimum(full_begin, hi),
                               kv_len, key_start, row_limit, qk_scale, MASKED=True, CAUSAL=CAUSAL, HEAD_DIM=HEAD_DIM,
                               BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, INTERPRETED=INTERPRETED)
    # 2) blocks that every row of the tile sees in full: no mask
    acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, full_begin, full_end,
                               kv_len, key_start, row_limit, qk_scale, MASKED=False, CAUSAL=CAUSAL, HEAD_DIM=HEAD_DIM,
                               BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, INTERPRETED=INTERPRETED)
    # 3) the causal diagonal and the ragged tail
    acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, full_end, hi,
                               kv_len, key_start, row_limit, qk_scale, MASKED=True, CAUSAL=CAUSAL, HEAD_DIM=HEAD_DIM,
                               BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, INTERPRETED=INTERPRETED)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, key_start_ptr, key_end_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
    Hq, Lq, Lk, qk_scale,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEY_START: tl.constexpr, HAS_KEY_END: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:  # the longest tiles (last queries) are scheduled first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    kv_h = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=io_mask, other=0.0)
    key_start, kv_len = valid_range(key_start_ptr, key_end_ptr, b, Lk, HAS_KEY_START=HAS_KEY_START,
                                    HAS_KEY_END=HAS_KEY_END)
    qk_scale = tl.cast(qk_scale, tl.float32)
    row_limit = offs_m + (kv_len - Lq)  # causal: query i sees keys j <= i + kv_len - Lq
    hi = kv_len
    first_row_limit = kv_len - 1
    if CAUSAL:
        hi = tl.minimum(kv_len, pid_m * BLOCK_M + BLOCK_M + (kv_len - Lq))
        first_row_limit = pid_m * BLOCK_M + (kv_len - Lq)
    acc, l_i, m_i = _attend(q, k_ptr + b * stride_kb + kv_h * stride_kh, v_ptr + b * stride_vb + kv_h * stride_vh,
                            stride_kn, stride_vn, 0, hi, kv_len, key_start, row_limit, first_row_limit, qk_scale,
                            CAUSAL=CAUSAL, HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                            BLOCK_D=BLOCK_D, INTERPRETED=INTERPRETED)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]  # a row that sees no key: acc = 0 -> zeros
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             round_to(o, DTYPE=o_ptr.dtype.element_ty, INTERPRETED=INTERPRETED), mask=io_mask)
    lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.log2(l_safe))  # +inf: the backward's p = 2^(s - lse) = 0
    tl.store(lse_ptr + (b * Hq + h) * Lq + offs_m, lse, mask=offs_m < Lq)


@triton.jit
def _attn_decode_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, part_o_ptr, part_lse_ptr, key_start_ptr, key_end_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
    Hq, Lq, Lk, qk_scale, min_split_blocks,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEY_START: tl.constexpr, HAS_KEY_END: tl.constexpr,
    SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, INTERPRETED: tl.constexpr,
):
    split = tl.program_id(0)
    n_splits = tl.num_programs(0)
    pid_bkv = tl.program_id(1)
    b = (pid_bkv // (Hq // GROUP)).to(tl.int64)
    kv_h = (pid_bkv % (Hq // GROUP)).to(tl.int64)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # row = head-in-group * Lq + query
    h = kv_h * GROUP + rows // Lq
    qi = rows % Lq
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = (rows[:, None] < GROUP * Lq) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + h[:, None] * stride_qh + qi[:, None] * stride_qm + offs_d[None, :],
                mask=io_mask, other=0.0)
    key_start, kv_len = valid_range(key_start_ptr, key_end_ptr, b, Lk, HAS_KEY_START=HAS_KEY_START,
                                    HAS_KEY_END=HAS_KEY_END)
    qk_scale = tl.cast(qk_scale, tl.float32)
    # the filled keys [0, kv_len), not the whole buffer, are shared among the splits, at least
    # min_split_blocks each: trailing splits may get none (and then write no partial output)
    keys_per_split = tl.maximum(tl.cdiv(tl.cdiv(kv_len, BLOCK_N), n_splits), min_split_blocks) * BLOCK_N
    lo = split * keys_per_split
    first_row_limit = kv_len - 1
    if CAUSAL:
        first_row_limit = kv_len - Lq  # query 0's limit bounds every row of the tile from below
    acc, l_i, m_i = _attend(q, k_ptr + b * stride_kb + kv_h * stride_kh, v_ptr + b * stride_vb + kv_h * stride_vh,
                            stride_kn, stride_vn, lo, tl.minimum(lo + keys_per_split, kv_len), kv_len, key_start,
                            qi + (kv_len - Lq), first_row_limit, qk_scale, CAUSAL=CAUSAL, HEAD_DIM=HEAD_DIM,
                            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, INTERPRETED=INTERPRETED)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    row_ok = rows < GROUP * Lq
    if SPLIT:
        part = ((b * Hq + h) * Lq + qi) * n_splits + split  # (B, Hq, Lq, n_splits) row-major
        tl.store(part_lse_ptr + part, m_i + tl.log2(l_safe), mask=row_ok)  # -inf if the chunk saw no key
        if lo < kv_len:  # an empty chunk writes no partial output: the combine skips it by its lse
            tl.store(part_o_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], o, mask=io_mask)
    else:
        tl.store(o_ptr + b * stride_ob + h[:, None] * stride_oh + qi[:, None] * stride_om + offs_d[None, :],
                 round_to(o, DTYPE=o_ptr.dtype.element_ty, INTERPRETED=INTERPRETED), mask=io_mask)
        tl.store(lse_ptr + (b * Hq + h) * Lq + qi, tl.where(l_i == 0.0, float("inf"), m_i + tl.log2(l_safe)),
                 mask=row_ok)


@triton.jit
def _attn_combine_kernel(
    part_o_ptr, part_lse_ptr, o_ptr, lse_ptr, stride_ob, stride_oh, stride_om, Hq, Lq, n_splits,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRETED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row = (b * Hq + h) * Lq + qi
    b = row // (Hq * Lq)
    h = (row // Lq) % Hq
    qi = row % Lq
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_splits
    lse = tl.load(part_lse_ptr + row * n_splits + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_sub)  # 0 for chunks that saw no key
    o_s = tl.load(part_o_ptr + (row * n_splits + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                  mask=(lse > float("-inf"))[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # skip empty
    denom = tl.sum(w, 0)
    o = tl.sum(w[:, None] * o_s, 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + qi * stride_om + offs_d,
             round_to(o, DTYPE=o_ptr.dtype.element_ty, INTERPRETED=INTERPRETED), mask=offs_d < HEAD_DIM)
    tl.store(lse_ptr + row, tl.where(denom == 0.0, float("inf"), m_sub + tl.log2(denom)))


# ----------------------------------------------------------------------------- launchers

def _shared_meta(q, k, causal, key_start, key_end, interpreted) -> dict:
    """The constexprs the prefill and decode kernels share."""
    D = q.shape[3]
    return dict(GROUP=q.shape[1] // k.shape[1], CAUSAL=causal, HAS_KEY_START=key_start is not None,
                HAS_KEY_END=key_end is not None, HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
                INTERPRETED=interpreted)


# Block configs: chosen so that ptxas (triton 3.6 and 3.9, sm_90) spills no register and the K/V
# loads are pipelined; benchmarks/kernel_resources.py checks this without a GPU.

def _prefill_config(D: int, dtype: torch.dtype, interpreted: bool,
                    key_start: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the prefill kernel."""
    if interpreted:  # the interpreter pays per op, not per element: few, mid-sized tiles
        return 64, 32, 4, 1
    if dtype == torch.float32:  # exact fp32 dots run on FMA units and need many registers
        return 32, 64 if D <= 128 else 16, 8, 2
    if D > 128:
        return 64, 32, 8, 2
    # the key_start prologue loop adds live registers: a third stage would spill at D > 64
    return 128, 64, 4 if D <= 64 else 8, 2 if key_start and D > 64 else 3


def _decode_config(D: int, dtype: torch.dtype, interpreted: bool) -> tuple[int, int, int, int]:
    """(largest BLOCK_M, BLOCK_N, num_warps, num_stages) of the decode kernel."""
    if interpreted:
        return 64, 32, 4, 1
    if dtype == torch.float32:
        return 16, 64, 8 if D <= 128 else 16, 2
    return 64, 64 if D <= 128 else 32, 8, 3 if D <= 128 else 2  # 4 warps spill the 64-row tile


def _prefill(q, k, v, out, lse, causal, qk_scale, key_start, key_end, config=None):
    """config=None picks (BLOCK_M, BLOCK_N, num_warps, num_stages) (benchmarks sweep others)."""
    B, Hq, Lq, D = q.shape
    interpreted = interpreted_on(q.device)
    block_m, block_n, num_warps, num_stages = config or _prefill_config(D, q.dtype, interpreted,
                                                                        key_start is not None)
    _attn_fwd_kernel[(triton.cdiv(Lq, block_m), B * Hq)](
        q, k, v, out, lse, q if key_start is None else key_start, q if key_end is None else key_end,
        *strides3(q), *strides3(k), *strides3(v), *strides3(out), Hq, Lq, k.shape[2], qk_scale,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages,
        **_shared_meta(q, k, causal, key_start, key_end, interpreted))


def _decode(q, k, v, out, lse, causal, qk_scale, key_start, key_end, n_splits=None):
    """Split-K decode; n_splits=None picks it from the shapes alone (tests force it)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    interpreted = interpreted_on(q.device)
    max_block_m, block_n, num_warps, num_stages = _decode_config(D, q.dtype, interpreted)
    block_m = min(max_block_m, max(16, triton.next_power_of_2(group * Lq)))
    m_tiles = triton.cdiv(group * Lq, block_m)
    n_blocks = triton.cdiv(Lk, block_n)
    # Fill the GPU about twice over, but keep chunks >= 16 * group * Lq keys so that the fp32
    # partials (written then read back) stay under ~1/8 of the K/V bytes the chunk streams.
    min_blocks = triton.cdiv(16 * group * Lq, block_n) if n_splits is None else 1
    if n_splits is None:
        target = 4 if interpreted else 2 * sm_count(q.device)
        n_splits = max(1, min(triton.cdiv(target, B * Hkv * m_tiles), n_blocks // min_blocks, MAX_SPLITS))
    n_splits = triton.cdiv(n_blocks, triton.cdiv(n_blocks, max(1, min(n_splits, n_blocks))))  # none empty at Lk
    split = n_splits > 1
    part_o = torch.empty((B, Hq, Lq, n_splits, D), dtype=torch.float32, device=q.device) if split else out
    part_lse = torch.empty((B, Hq, Lq, n_splits), dtype=torch.float32, device=q.device) if split else out
    meta = _shared_meta(q, k, causal, key_start, key_end, interpreted)
    _attn_decode_kernel[(n_splits, B * Hkv, m_tiles)](
        q, k, v, out, lse, part_o, part_lse, q if key_start is None else key_start,
        q if key_end is None else key_end,
        *strides3(q), *strides3(k), *strides3(v), *strides3(out), Hq, Lq, Lk, qk_scale, min_blocks,
        SPLIT=split, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **meta)
    if split:
        _attn_combine_kernel[(B * Hq * Lq,)](
            part_o, part_lse, out, lse, *strides3(out), Hq, Lq, n_splits, HEAD_DIM=D,
            BLOCK_S=max(2, triton.next_power_of_2(n_splits)), BLOCK_D=meta["BLOCK_D"],
            INTERPRETED=interpreted, num_warps=4)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                      scale: float | None = None, key_start: torch.Tensor | None = None,
                      key_end: torch.Tensor | None = None, path: str | None = None,
                      n_splits: int | None = None, config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward on checked inputs (see `attention`): o (B, Hq, Lq, D) in q's dtype and lse (B, Hq, Lq)
    fp32, log2 domain, +inf for a row that sees no key. path ("prefill" | "decode"; default: decode
    for Lq <= 16), n_splits and config force a choice (tests and benchmarks)."""
    # the kernels index the head dim with unit stride; every other stride is passed as it is
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.empty((B, Hq, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or Lk == 0:  # no key at all: every row sees nothing
        return out.zero_(), lse.fill_(float("inf"))
    qk_scale = (D ** -0.5 if scale is None else float(scale)) * LOG2E
    key_start, key_end = (None if t is None else t.to(device=q.device, dtype=torch.int32).contiguous()
                          for t in (key_start, key_end))
    path = path or ("decode" if Lq <= DECODE_MAX_LQ else "prefill")
    if path not in ("decode", "prefill"):
        raise ValueError(f"attention: unknown path {path!r}")
    with on_device(q.device):
        if path == "decode":
            _decode(q, k, v, out, lse, causal, qk_scale, key_start, key_end, n_splits)
        else:
            _prefill(q, k, v, out, lse, causal, qk_scale, key_start, key_end, config)
    return out, lse
