"""Flash attention forward: causal GQA prefill, bidirectional ViT (head_dim 112), and decode.

Spec: `attention_ref`. For query i of a (batch b, query head h) pair, with scores kept in the log2
domain so that exp2 replaces exp:

    s_ij = (q_i . k_j) * scale * log2(e)                   # fp32; scale defaults to 1/sqrt(D)
    visible(i, j) = key_start[b] <= j < Lk  and  (not causal or j <= i + Lk - Lq)
    o_i = sum_j 2^(s_ij - m_i) v_j / sum_j 2^(s_ij - m_i)    # over visible j; 0 if none is visible

Online softmax, one key block at a time (m, l, acc in fp32; P rounded to v's dtype before P @ V,
as FlashAttention does):  m' = max(m, rowmax(s)),  alpha = 2^(m - m'),
l' = alpha * l + rowsum(2^(s - m')),  acc' = alpha * acc + 2^(s - m') @ V.

Query head h reads KV head h // GROUP (GROUP = Hq / Hkv) through its strides: K/V are never
repeated in memory, and may be views of a static cache (any batch/head/sequence strides).
Head dims: any multiple of 8 up to 256. BLOCK_D = next_power_of_2(D), at least 16 (tl.dot's
smallest K); the padded columns load as zeros, which change neither q.k nor P @ V, so D = 112
runs like 128.

Keys are visited in three ranges (`_attend`) so the mask is built only where it can bite: the
block holding key_start (left padding), the blocks every row of the tile sees in full (no mask),
then the causal diagonal and ragged tail. A causal tile stops at its last row's limit.

Prefill (`_attn_fwd_kernel`): one program per (BLOCK_M queries, batch x query head).
Decode (`_attn_decode_kernel`, Lq <= 16): a program's rows are all (query head of one KV group,
query) pairs, so a group's heads share every K/V load; the keys are cut into n_splits chunks
(flash-decoding). Each chunk stores its normalized output o_s and lse_s = m + log2(l), and
`_attn_combine_kernel` merges them: o = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M), M = max lse_s.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, interpreted_on, on_device, round_to, sm_count

LOG2E = 1.4426950408889634
DECODE_MAX_LQ = 16  # Lq <= this takes the split-K decode path
MAX_SPLITS = 64     # the combine kernel holds (splits x BLOCK_D) fp32 partials in registers
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


@triton.jit
def _dot(a, b, acc, INTERPRETED: tl.constexpr):
    if INTERPRETED:  # the CPU interpreter multiplies bf16 as raw integers: widen (exactly) first
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision="ieee")  # fp32 inputs: exact products, no tf32


@triton.jit
def _load_keys(ptrs, cols, Lk, offs_d, MASK_KEYS: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """A (BLOCK_N, BLOCK_D) block of K or V: zeros past Lk (if MASK_KEYS) and past HEAD_DIM."""
    if MASK_KEYS:
        return tl.load(ptrs, mask=(cols[:, None] < Lk) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    elif HEAD_DIM == BLOCK_D:  # full blocks of a power-of-two head dim: no mask at all
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def _attn_tile(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, lo, hi, Lk, key_start,
               row_limit, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               INTERPRETED: tl.constexpr):
    """Online-softmax update over the key blocks starting at lo, lo + BLOCK_N, ... < hi."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_keys(k_base + cols[:, None] * stride_kn + offs_d[None, :], cols, Lk, offs_d,
                       MASKED, HEAD_DIM, BLOCK_D)
        # a real zero accumulator: triton < 3.4 cannot pass acc=None through a nested jit function
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), INTERPRETED)
        s = s * qk_scale  # (BLOCK_M, BLOCK_N)
        if MASKED:
            visible = (cols[None, :] < Lk) & (cols[None, :] >= key_start)
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
        v = _load_keys(v_base + cols[:, None] * stride_vn + offs_d[None, :], cols, Lk, offs_d,
                       MASKED, HEAD_DIM, BLOCK_D)
        acc = _dot(round_to(p, v.dtype, INTERPRETED), v, acc * alpha[:, None], INTERPRETED)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attend(q, k_base, v_base, stride_kn, stride_vn, lo, hi, Lk, key_start, row_limit,
            first_row_limit, qk_scale, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            INTERPRETED: tl.constexpr):
    """Attend q to keys [lo, hi) (lo a multiple of BLOCK_N); returns (acc, l, m).

    first_row_limit: the last key the tile's first row may see (Lk - 1 when not causal).
    """
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    full_begin = tl.maximum(lo, (key_start + BLOCK_N - 1) // BLOCK_N * BLOCK_N)
    full_end = tl.minimum(hi, tl.maximum(tl.minimum(Lk, first_row_limit + 1), 0) // BLOCK_N * BLOCK_N)
    full_end = tl.maximum(full_end, full_begin)
    # 1) the block holding the first valid key, when left padding does not end on a block edge
    acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                               tl.maximum(lo, key_start // BLOCK_N * BLOCK_N),
                               tl.minimum(full_begin, hi), Lk, key_start, row_limit, qk_scale,
                               True, CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, INTERPRETED)
    # 2) blocks that every row of the tile sees in full: no mask
    acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                               full_begin, full_end, Lk, key_start, row_limit, qk_scale,
                               False, CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, INTERPRETED)
    # 3) the causal diagonal and the ragged tail
    acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                               full_end, hi, Lk, key_start, row_limit, qk_scale,
                               True, CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, INTERPRETED)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, key_start_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
    Hq, Lq, Lk, qk_scale,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEY_START: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
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
    key_start = 0
    if HAS_KEY_START:
        key_start = tl.maximum(tl.load(key_start_ptr + b), 0)
    qk_scale = tl.cast(qk_scale, tl.float32)
    row_limit = offs_m + (Lk - Lq)  # causal: query i sees keys j <= i + Lk - Lq
    hi = Lk
    first_row_limit = Lk - 1
    if CAUSAL:
        hi = tl.minimum(Lk, pid_m * BLOCK_M + BLOCK_M + (Lk - Lq))
        first_row_limit = pid_m * BLOCK_M + (Lk - Lq)
    acc, l_i, m_i = _attend(q, k_ptr + b * stride_kb + kv_h * stride_kh, v_ptr + b * stride_vb + kv_h * stride_vh,
                            stride_kn, stride_vn, 0, hi, Lk, key_start, row_limit, first_row_limit,
                            qk_scale, CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, INTERPRETED)
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a row that sees no key: acc = 0 -> zeros
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             round_to(o, o_ptr.dtype.element_ty, INTERPRETED), mask=io_mask)


@triton.jit
def _attn_decode_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, part_o_ptr, part_lse_ptr, key_start_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
    Hq, Lq, Lk, qk_scale, keys_per_split,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEY_START: tl.constexpr, SPLIT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    split = tl.program_id(0)
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
    key_start = 0
    if HAS_KEY_START:
        key_start = tl.maximum(tl.load(key_start_ptr + b), 0)
    qk_scale = tl.cast(qk_scale, tl.float32)
    lo = split * keys_per_split
    first_row_limit = Lk - 1
    if CAUSAL:
        first_row_limit = Lk - Lq  # query 0's limit bounds every row of the tile from below
    acc, l_i, m_i = _attend(q, k_ptr + b * stride_kb + kv_h * stride_kh, v_ptr + b * stride_vb + kv_h * stride_vh,
                            stride_kn, stride_vn, lo, tl.minimum(lo + keys_per_split, Lk), Lk, key_start,
                            qi + (Lk - Lq), first_row_limit, qk_scale,
                            CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, INTERPRETED)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    if SPLIT:
        n_splits = tl.num_programs(0)
        part = ((b * Hq + h) * Lq + qi) * n_splits + split  # (B, Hq, Lq, n_splits) row-major
        tl.store(part_lse_ptr + part, m_i + tl.log2(l_safe), mask=rows < GROUP * Lq)  # -inf if empty
        tl.store(part_o_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], o, mask=io_mask)
    else:
        tl.store(o_ptr + b * stride_ob + h[:, None] * stride_oh + qi[:, None] * stride_om + offs_d[None, :],
                 round_to(o, o_ptr.dtype.element_ty, INTERPRETED), mask=io_mask)


@triton.jit
def _attn_combine_kernel(
    part_o_ptr, part_lse_ptr, o_ptr, stride_ob, stride_oh, stride_om, Hq, Lq, n_splits,
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
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # 0 for chunks that saw no key
    o_s = tl.load(part_o_ptr + (row * n_splits + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                  mask=s_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    denom = tl.sum(w, 0)
    o = tl.sum(w[:, None] * o_s, 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + qi * stride_om + offs_d,
             round_to(o, o_ptr.dtype.element_ty, INTERPRETED), mask=offs_d < HEAD_DIM)


# ----------------------------------------------------------------------------- launchers

def _check(q, k, v, causal, scale, key_start) -> None:
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
    if key_start is not None and not (isinstance(key_start, torch.Tensor) and key_start.shape == (B,)
                                     and key_start.dtype in INT_DTYPES):
        got = f"{tuple(key_start.shape)} {key_start.dtype}" if isinstance(key_start, torch.Tensor) else key_start
        raise ValueError(f"attention: key_start must be an integer tensor of shape ({B},) (each row's "
                         f"first valid key); got {got!s:.60}")
    interpreted_on(q.device)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _shared_meta(q, k, causal, key_start, interpreted) -> dict:
    """The constexprs the prefill and decode kernels share."""
    D = q.shape[3]
    return dict(GROUP=q.shape[1] // k.shape[1], CAUSAL=causal, HAS_KEY_START=key_start is not None,
                HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), INTERPRETED=interpreted)


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
        return 16, 64, 4 if D <= 64 else 8 if D <= 128 else 16, 2
    return 64, 64 if D <= 128 else 32, 8, 3 if D <= 128 else 2  # 4 warps spill the 64-row tile


def _prefill(q, k, v, out, causal, qk_scale, key_start, config=None):
    """config=None picks (BLOCK_M, BLOCK_N, num_warps, num_stages) (benchmarks sweep others)."""
    B, Hq, Lq, D = q.shape
    interpreted = interpreted_on(q.device)
    block_m, block_n, num_warps, num_stages = config or _prefill_config(D, q.dtype, interpreted,
                                                                        key_start is not None)
    _attn_fwd_kernel[(triton.cdiv(Lq, block_m), B * Hq)](
        q, k, v, out, key_start if key_start is not None else q,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), Hq, Lq, k.shape[2], qk_scale,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages,
        **_shared_meta(q, k, causal, key_start, interpreted))


def _decode(q, k, v, out, causal, qk_scale, key_start, n_splits=None):
    """Split-K decode; n_splits=None picks it (tests force it)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    interpreted = interpreted_on(q.device)
    max_block_m, block_n, num_warps, num_stages = _decode_config(D, q.dtype, interpreted)
    block_m = min(max_block_m, max(16, triton.next_power_of_2(group * Lq)))
    m_tiles = triton.cdiv(group * Lq, block_m)
    n_blocks = triton.cdiv(Lk, block_n)
    if n_splits is None:
        # Fill the GPU about twice over, but keep chunks >= 16 * group * Lq keys so that the fp32
        # partials (written then read back) stay under ~1/8 of the K/V bytes the chunk streams.
        target = 4 if interpreted else 2 * sm_count(q.device)
        min_blocks = triton.cdiv(16 * group * Lq, block_n)
        n_splits = max(1, min(triton.cdiv(target, B * Hkv * m_tiles), n_blocks // min_blocks, MAX_SPLITS))
    keys_per_split = triton.cdiv(n_blocks, max(1, min(n_splits, n_blocks))) * block_n
    n_splits = triton.cdiv(Lk, keys_per_split)  # no empty trailing chunk
    split = n_splits > 1
    part_o = torch.empty((B, Hq, Lq, n_splits, D), dtype=torch.float32, device=q.device) if split else out
    part_lse = torch.empty((B, Hq, Lq, n_splits), dtype=torch.float32, device=q.device) if split else out
    meta = _shared_meta(q, k, causal, key_start, interpreted)
    _attn_decode_kernel[(n_splits, B * Hkv, m_tiles)](
        q, k, v, out, part_o, part_lse, key_start if key_start is not None else q,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), Hq, Lq, Lk, qk_scale, keys_per_split,
        SPLIT=split, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **meta)
    if split:
        _attn_combine_kernel[(B * Hq * Lq,)](
            part_o, part_lse, out, *_strides(out), Hq, Lq, n_splits, HEAD_DIM=D,
            BLOCK_S=max(2, triton.next_power_of_2(n_splits)), BLOCK_D=meta["BLOCK_D"],
            INTERPRETED=interpreted, num_warps=4)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
              scale: float | None = None, key_start: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention, q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D) -> (B, Hq, Lq, D) in q's dtype.

    Same contract as `attention_ref`. Forward only (inference): no gradient flows through it.
    Lq <= 16 takes the split-K decode kernel, longer queries the prefill kernel.
    """
    return _attention(q, k, v, causal, scale, key_start)


def _attention(q, k, v, causal, scale=None, key_start=None, path=None, n_splits=None, config=None):
    """`attention`, with the kernel ("prefill" | "decode"), the split count or the prefill config
    forced (tests and benchmarks)."""
    _check(q, k, v, causal, scale, key_start)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise NotImplementedError("glm4v_kernels.attention is forward-only (no backward): use attention_ref "
                                  "(GLM4V_BACKEND=torch) where gradients are needed")
    # the kernels index the head dim with unit stride; every other stride is passed as it is
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.empty((B, Hq, Lq, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0 or Lk == 0:
        return out.zero_()  # no key at all: every row sees nothing
    qk_scale = (1.0 / math.sqrt(D) if scale is None else float(scale)) * LOG2E
    key_start = None if key_start is None else key_start.to(device=q.device, dtype=torch.int32).contiguous()
    path = path or ("decode" if Lq <= DECODE_MAX_LQ else "prefill")
    if path not in ("decode", "prefill"):
        raise ValueError(f"attention: unknown path {path!r}")
    with on_device(q.device):
        if path == "decode":
            _decode(q, k, v, out, causal, qk_scale, key_start, n_splits)
        else:
            _prefill(q, k, v, out, causal, qk_scale, key_start, config)
    return out
