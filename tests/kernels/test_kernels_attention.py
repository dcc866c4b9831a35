"""Triton flash attention vs `attention_ref`: prefill, decode (split-K), GQA, key ranges, strides, errors.

On CPU these run under TRITON_INTERPRET=1; without it (and without CUDA) they skip with a reason.
Tolerance (STYLE): 2x the error of the reference run in the low precision dtype vs the fp32
reference on the same inputs, plus a small atol, plus what fp32 scores may lose by rounding
(fp32 eps x max |score| x max |v|; it matters only when scores are large).
"""
from __future__ import annotations

import itertools
import os
import time

import pytest
import torch
from helpers.triton_env import DEVICE, needs_triton

import glm4v_kernels as K
from glm4v_kernels import flash_attention as attention_mod
from glm4v_kernels.flash_attention import attention_forward

pytestmark = needs_triton
ATOL = {torch.float32: 2e-5, torch.bfloat16: 1e-3, torch.float16: 2e-4}
F32, BF16 = torch.float32, torch.bfloat16

# A pairwise covering set over dtype x D x (Lq, Lk) x GQA ratio x causal x key_start: every pair
# of values of any two factors appears at least once (checked by test_case_table_is_pairwise).
# (Lq, Lk, D, ratio, causal, key_start, dtype)
CASES = [
    (1, 1, 64, 1, True, False, F32), (1, 1, 80, 16, False, True, BF16),
    (1, 1, 112, 4, True, False, F32), (1, 1, 128, 1, False, True, BF16),
    (1, 300, 64, 16, False, True, BF16), (1, 300, 80, 4, False, True, F32),
    (1, 300, 112, 16, True, False, BF16), (1, 300, 128, 1, False, True, BF16),
    (7, 7, 64, 16, True, False, F32), (7, 7, 80, 4, False, True, BF16),
    (7, 7, 112, 4, True, False, F32), (7, 7, 128, 1, False, True, BF16),
    (7, 97, 64, 1, True, False, BF16), (7, 97, 80, 4, True, False, F32),
    (7, 97, 112, 16, True, False, F32), (7, 97, 128, 16, False, True, F32),
    (97, 97, 64, 16, True, False, F32), (97, 97, 80, 1, False, True, BF16),
    (97, 97, 112, 4, False, False, F32), (97, 97, 128, 1, True, True, BF16),
    (97, 300, 64, 4, False, True, BF16), (97, 300, 80, 16, True, False, F32),
    (97, 300, 112, 1, False, True, BF16), (97, 300, 128, 4, True, False, F32),
    (128, 7, 64, 4, True, False, F32), (128, 7, 80, 1, True, False, F32),
    (128, 7, 112, 16, False, False, F32), (128, 7, 128, 1, True, True, BF16),
    (128, 128, 64, 4, False, True, BF16), (128, 128, 80, 1, True, False, F32),
    (128, 128, 112, 16, False, True, BF16), (128, 128, 128, 4, False, True, BF16),
    (300, 300, 64, 16, False, True, BF16), (300, 300, 80, 16, True, False, F32),
    (300, 300, 112, 1, False, True, F32), (300, 300, 128, 4, True, False, BF16),
]


def _case_id(case) -> str:
    Lq, Lk, D, ratio, causal, masked, dtype = case
    return (f"q{Lq}-k{Lk}-d{D}-gqa{ratio}-{'causal' if causal else 'bidir'}"
            f"{'-keymask' if masked else ''}-{str(dtype)[6:]}")


def _inputs(B, Hq, Hkv, Lq, Lk, D, dtype, seed=0, q_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g) * q_scale
    k, v = (torch.randn(B, Hkv, Lk, D, generator=g) for _ in range(2))
    return tuple(t.to(device=DEVICE, dtype=dtype) for t in (q, k, v))


def _attention(q, k, v, causal, **kw):
    """The forward kernels with a path / split count / config forced: the output only."""
    return attention_forward(q, k, v, causal, **kw)[0]


def score_rounding_bound(q, k, v, scale=None) -> float:
    """What fp32 rounding of the scores may move an output by: eps x max |score| x max |v|.

    Two correct fp32 computations of a score s = q.k * scale differ by about eps |s|; the softmax
    turns that into a relative change of its weights, and the output moves by up to that times |v|.
    """
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    scores = q.float().reshape(B, Hkv, Hq // Hkv * Lq, D) @ k.float().transpose(-1, -2)  # (B, Hkv, G*Lq, Lk)
    max_score = scores.abs().max().item() * (D ** -0.5 if scale is None else scale)
    return torch.finfo(torch.float32).eps * max_score * v.float().abs().max().item()


def _assert_matches_ref(out, q, k, v, *, causal, key_start=None, key_end=None, scale=None):
    """out vs the fp32 reference on the same (rounded) inputs, within 2x torch's own low-precision
    error, plus atol, plus the scores' fp32 rounding bound."""
    kw = dict(causal=causal, key_start=key_start, key_end=key_end, scale=scale)
    ref32 = K.attention_ref(q.float(), k.float(), v.float(), **kw)
    ref_lp = K.attention_ref(q, k, v, **kw)
    assert out.shape == ref32.shape and out.dtype == q.dtype
    err = (out.float() - ref32).abs()
    ref_err = (ref_lp.float() - ref32).abs().max().item()
    rounding = score_rounding_bound(q, k, v, scale)
    budget = 2 * ref_err + ATOL[q.dtype] + rounding
    assert err.max().item() <= budget, (
        f"max diff {err.max().item():.3e} (mean {err.mean().item():.3e}) exceeds 2 x torch-{q.dtype} "
        f"error {ref_err:.3e} + atol {ATOL[q.dtype]:.0e} + score rounding {rounding:.1e}")


def test_case_table_is_pairwise():
    factors = [sorted({c[i] for c in CASES}, key=str) for i in range(7)]
    factors[0:2] = [sorted({(c[0], c[1]) for c in CASES})]  # (Lq, Lk) is one factor
    rows = [((c[0], c[1]),) + c[2:] for c in CASES]
    for a, b in itertools.combinations(range(len(factors)), 2):
        missing = {(x, y) for x in factors[a] for y in factors[b]} - {(r[a], r[b]) for r in rows}
        assert not missing, f"factors {a} and {b}: pairs {sorted(missing, key=str)} not covered"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_attention_matches_reference(case):
    Lq, Lk, D, ratio, causal, masked, dtype = case
    Hkv = 1 if ratio == 16 else 2
    B = 2 if masked else 1
    q, k, v = _inputs(B, ratio * Hkv, Hkv, Lq, Lk, D, dtype)
    # row 0 unpadded, row 1 left-padded by an amount that does not end on a block edge
    key_start = torch.tensor([0, Lk // 3 + 1], device=DEVICE) if masked else None
    _assert_matches_ref(K.attention(q, k, v, causal=causal, key_start=key_start), q, k, v,
                        causal=causal, key_start=key_start)
    if Lq <= attention_mod.DECODE_MAX_LQ:  # the public call took the decode kernel: check prefill too
        out = _attention(q, k, v, causal, key_start=key_start, path="prefill")
        _assert_matches_ref(out, q, k, v, causal=causal, key_start=key_start)


@pytest.mark.parametrize("n_splits", [1, 2, 3, 7])
@pytest.mark.parametrize("Lq,Lk,causal", [(1, 300, True), (7, 97, True), (16, 128, False)])
def test_decode_split_k(Lq, Lk, causal, n_splits):
    """GLM-like grouping (16 query heads per KV head) with several split counts, padding included."""
    q, k, v = _inputs(2, 16, 1, Lq, Lk, 128, BF16, seed=1)
    key_start = torch.tensor([Lk - 40, 3], device=DEVICE)
    out = _attention(q, k, v, causal, key_start=key_start, path="decode", n_splits=n_splits)
    _assert_matches_ref(out, q, k, v, causal=causal, key_start=key_start)


def test_public_call_picks_decode_for_short_queries(monkeypatch):
    calls = []
    monkeypatch.setattr(attention_mod, "_decode", lambda *a, **kw: calls.append("decode"))
    monkeypatch.setattr(attention_mod, "_prefill", lambda *a, **kw: calls.append("prefill"))
    for Lq in (1, 16, 17):
        q, k, v = _inputs(1, 2, 1, Lq, 40, 64, F32)
        K.attention(q, k, v, causal=True)
    assert calls == ["decode", "decode", "prefill"]


@pytest.mark.parametrize("Lq", [1, 33])
def test_strided_views_of_a_static_cache(Lq):
    """k/v sliced from a (B, Hkv, Lmax, D) cache; q a transposed (B, L, H, D) projection."""
    B, Hq, Hkv, D, Lk, Lmax = 2, 8, 2, 112, 50, 96
    cache_k, cache_v = (torch.randn(B, Hkv, Lmax, D, device=DEVICE, dtype=BF16) for _ in range(2))
    q = torch.randn(B, Lq, Hq, D, device=DEVICE, dtype=BF16).transpose(1, 2)  # (B, Hq, Lq, D) view
    if Lq == 1:  # a transposed (B, 1, H, D) is still contiguous: slice a wider projection instead
        q = torch.randn(B, Hq, Lq, 2 * D, device=DEVICE, dtype=BF16)[..., :D]
    k, v = cache_k[:, :, :Lk], cache_v[:, :, :Lk]
    assert not (q.is_contiguous() or k.is_contiguous())
    key_start = torch.tensor([0, 9], device=DEVICE)
    out = K.attention(q, k, v, causal=True, key_start=key_start)
    _assert_matches_ref(out, q.contiguous(), k.contiguous(), v.contiguous(), causal=True, key_start=key_start)
    # a head dim that is not unit-stride is made contiguous explicitly, with the same result
    k_t = k.contiguous().transpose(2, 3).contiguous().transpose(2, 3)
    assert k_t.stride(-1) != 1
    torch.testing.assert_close(K.attention(q, k_t, v, causal=True, key_start=key_start), out, rtol=0, atol=0)


def test_left_padded_prompt_pad_queries_are_zero():
    """A left-padded causal prefill: pad query rows see no key and must come back as exact zeros."""
    q, k, v = _inputs(2, 4, 2, 40, 40, 64, F32, seed=2)
    key_start = torch.tensor([0, 21], device=DEVICE)
    out = K.attention(q, k, v, causal=True, key_start=key_start)
    assert torch.count_nonzero(out[1, :, :21]) == 0
    _assert_matches_ref(out, q, k, v, causal=True, key_start=key_start)


@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_key_start_out_of_range(path):
    """A negative start masks nothing; a start past Lk masks every key (rows come back as zeros)."""
    q, k, v = _inputs(2, 4, 2, 9, 30, 64, F32, seed=6)
    key_start = torch.tensor([-3, 35], device=DEVICE)
    out = _attention(q, k, v, True, key_start=key_start, path=path)
    assert torch.count_nonzero(out[1]) == 0
    _assert_matches_ref(out, q, k, v, causal=True, key_start=key_start)


@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_large_scores_and_custom_scale(path):
    """Scores in the hundreds (log2 domain) must neither overflow nor underflow the online softmax,
    also after a fully masked first block (key_start 37 > BLOCK_N = 32 on CPU). The budget grows
    with the scores (fp32 eps x max |score|), yet a 0.1% error in the scale still fails it."""
    q, k, v = _inputs(2, 4, 1, 9, 70, 80, F32, seed=3, q_scale=30.0)
    key_start = torch.tensor([37, 0], device=DEVICE)
    for scale in (None, 0.5):
        out = _attention(q, k, v, True, scale=scale, key_start=key_start, path=path)
        _assert_matches_ref(out, q, k, v, causal=True, key_start=key_start, scale=scale)
    out = _attention(q, k, v, True, scale=0.5 * 1.001, key_start=key_start, path=path)
    with pytest.raises(AssertionError, match="max diff"):
        _assert_matches_ref(out, q, k, v, causal=True, key_start=key_start, scale=0.5)


# ----------------------------------------------------------------------------- key_end: a static cache

def _static_cache_inputs(Lq, dtype, B=3, Hq=4, Hkv=2, max_len=80, D=112, seed=7):
    """A (B, Hkv, max_len, D) cache filled up to key_end[b]; what lies past it is NaN (never to be read)."""
    q, k, v = _inputs(B, Hq, Hkv, Lq, max_len, D, dtype, seed=seed)
    key_start = torch.tensor([0, 7, 2], device=DEVICE)[:B]
    key_end = torch.tensor([max_len, 45, 13], device=DEVICE)[:B]  # row 2: 11 keys, fewer than a block
    filled = torch.arange(max_len, device=DEVICE)[None, None, :, None] < key_end[:, None, None, None]
    return q, k, v, key_start, key_end, filled


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty returns NaN-filled float tensors: a kernel that reads an output or partial
    buffer it did not write first shows it."""
    empty = torch.empty

    def nan_filled(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", nan_filled)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("path,Lq", [("decode", 1), ("decode", 5), ("prefill", 5), ("prefill", 20)])
def test_key_end_static_cache(path, Lq, causal, dtype, nan_empty):
    """Keys j >= key_end[b] are invisible and causal alignment is to the last valid key; key_end
    below key_start, or a causal prefill longer than the filled range, leaves rows with zeros.
    Neither the cache past key_end nor the splits' unwritten partials (NaN here) are read."""
    q, k, v, key_start, key_end, filled = _static_cache_inputs(Lq, dtype)
    k_nan, v_nan = (t.masked_fill(~filled, float("nan")) for t in (k, v))
    out = _attention(q, k_nan, v_nan, causal, key_start=key_start, key_end=key_end, path=path)
    _assert_matches_ref(out, q, k, v, causal=causal, key_start=key_start, key_end=key_end)
    if path == "decode":
        for n_splits in (2, 5, 16):  # splits share the filled keys, not the buffer: some chunks are empty
            out = _attention(q, k_nan, v_nan, causal, key_start=key_start, key_end=key_end, path=path,
                             n_splits=n_splits)
            _assert_matches_ref(out, q, k, v, causal=causal, key_start=key_start, key_end=key_end)


def test_key_end_reference_equals_a_sliced_cache():
    """attention_ref itself: a cache read up to key_end is the same as the cache sliced there."""
    q, k, v, key_start, key_end, _ = _static_cache_inputs(6, F32)
    out = K.attention_ref(q, k, v, causal=True, key_start=key_start, key_end=key_end)
    for b in range(q.shape[0]):
        n = int(key_end[b])
        ref = K.attention_ref(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], causal=True,
                              key_start=key_start[b:b + 1])
        torch.testing.assert_close(out[b:b + 1], ref, rtol=0, atol=1e-6)


def test_key_end_out_of_range_and_empty():
    """key_end past the buffer is the buffer's end; key_end 0 (or negative) shows no key at all."""
    q, k, v = _inputs(3, 4, 2, 4, 30, 64, F32, seed=8)
    key_end = torch.tensor([99, 0, -2], device=DEVICE)
    for path in ("prefill", "decode"):
        out = _attention(q, k, v, True, key_end=key_end, path=path)
        assert torch.count_nonzero(out[1:]) == 0
        _assert_matches_ref(out, q, k, v, causal=True, key_end=key_end)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the interpreter's time is proportional to the blocks visited; on a GPU small kernels "
                           "cost their launch (benchmarks/kernels.py times the static-cache decode instead)")
@pytest.mark.parametrize("path,Lq", [("decode", 1), ("prefill", 20)])
def test_key_end_bounds_the_work(path, Lq):
    """A program never visits key blocks past key_end: reading a 32x longer buffer filled to the
    same key_end costs about the same (the interpreter's time is proportional to blocks visited;
    visiting the whole buffer would take ~32x longer). The grid (split count) is kept the same."""
    def best_time(max_len):
        q, k, v = _inputs(1, 2, 1, Lq, max_len, 64, F32, seed=9)
        key_end = torch.tensor([40], device=DEVICE)
        kw = dict(n_splits=2) if path == "decode" else {}
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            _attention(q, k, v, True, key_end=key_end, path=path, **kw)
            times.append(time.perf_counter() - t0)
        return min(times)
    short, long = best_time(64), best_time(64 * 32)
    assert long < 4 * short, f"buffer 2048 took {long:.3f}s vs buffer 64 {short:.3f}s with the same key_end"


def test_float16_and_other_head_dims():
    for D in (8, 256):
        q, k, v = _inputs(1, 2, 1, 20, 37, D, torch.float16, seed=D)
        _assert_matches_ref(K.attention(q, k, v, causal=True), q, k, v, causal=True)


def test_checker_catches_a_wrong_mask():
    """Negative control: a kernel run with the wrong causal flag must fail the comparison."""
    q, k, v = _inputs(1, 2, 1, 20, 20, 64, BF16, seed=4)
    with pytest.raises(AssertionError, match="max diff"):
        _assert_matches_ref(K.attention(q, k, v, causal=False), q, k, v, causal=True)


def _bad(**overrides):
    q, k, v = _inputs(2, 4, 2, 5, 6, 64, F32)
    args = dict(q=q, k=k, v=v, causal=True, key_start=None)
    args.update(overrides)
    return args


@pytest.mark.parametrize("args,error,match", [
    (lambda: _bad(k=torch.randn(2, 2, 6, 64, dtype=BF16, device=DEVICE)), TypeError, "share one dtype"),
    (lambda: _bad(q=torch.ones(2, 4, 5, 64, dtype=torch.int32, device=DEVICE)), TypeError, "dtype"),
    (lambda: _bad(k=torch.randn(2, 2, 6, 64, device="meta")), ValueError, "different devices"),
    (lambda: _bad(q=torch.randn(2, 3, 5, 64, device=DEVICE)), ValueError, "Hq=3 must be a multiple of KV heads Hkv=2"),
    (lambda: _bad(q=torch.randn(4, 5, 64, device=DEVICE)), ValueError, "q must be 4-D"),
    (lambda: _bad(v=torch.randn(2, 2, 7, 64, device=DEVICE)), ValueError, "k, v"),
    (lambda: _bad(q=torch.randn(2, 4, 5, 60, device=DEVICE), k=torch.randn(2, 2, 6, 60, device=DEVICE),
                  v=torch.randn(2, 2, 6, 60, device=DEVICE)), ValueError, "head dim D=60"),
    (lambda: _bad(q=torch.randn(2, 4, 5, 264, device=DEVICE), k=torch.randn(2, 2, 6, 264, device=DEVICE),
                  v=torch.randn(2, 2, 6, 264, device=DEVICE)), ValueError, "head dim D=264"),
    (lambda: _bad(key_start=torch.tensor([1, 2, 3], device=DEVICE)), ValueError, r"shape \(2,\)"),
    (lambda: _bad(key_start=torch.tensor([1.0, 2.0], device=DEVICE)), ValueError, "integer tensor"),
    (lambda: _bad(key_start=[1, 2]), ValueError, "integer tensor"),
    (lambda: _bad(causal=None), TypeError, "causal must be a bool"),
    (lambda: _bad(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
], ids=["dtype-mismatch", "int-dtype", "device-mismatch", "gqa-ratio", "ndim", "kv-shape", "head-dim-60",
        "head-dim-264", "key-mask-shape", "key-mask-dtype", "key-mask-list", "causal-type", "not-a-tensor"])
def test_bad_input_raises_a_named_error(args, error, match):
    with pytest.raises(error, match=match):
        K.attention(**args())


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = (torch.randn(1, 1, 4, 16) for _ in range(3))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.attention(q, k, v, causal=False)


# ----------------------------------------------------------------------------- real shapes on a GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,causal", [
    (1, 16, 16, 6401, 6401, 112, False),  # ViT self-attention
    (1, 32, 2, 2048, 2048, 128, True),     # decoder prefill
    (1, 32, 2, 512, 2560, 128, True),      # chunked prefill
    (16, 32, 2, 1, 8192, 128, True),       # decode, batch 16
    (1, 32, 2, 4, 8192, 128, True),        # multi-token decode
])
def test_real_shapes_on_gpu(B, Hq, Hkv, Lq, Lk, D, causal):
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lk, D, BF16, seed=5)
    key_start = torch.randint(0, Lk // 2, (B,), device=DEVICE) if B > 1 else None
    _assert_matches_ref(K.attention(q, k, v, causal=causal, key_start=key_start), q, k, v,
                        causal=causal, key_start=key_start)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("Lq", [1, 4, 64])
def test_static_cache_step_replays_in_a_cuda_graph(Lq):
    """One attention call over a fixed (B, Hkv, 4096, D) cache, captured once in a CUDA graph, then
    replayed with new queries and new key_end values written into the same tensors: no host sync,
    and a grid that does not depend on key_end, or the replays would be wrong."""
    B, Hq, Hkv, D, max_len = 4, 32, 2, 128, 4096
    q, k_buf, v_buf = _inputs(B, Hq, Hkv, Lq, max_len, D, BF16, seed=10)
    key_start = torch.tensor([0, 100, 5, 0], device=DEVICE, dtype=torch.int32)
    key_end = torch.tensor([max_len, 700, 64, 129], device=DEVICE, dtype=torch.int32)
    step = lambda: K.attention(q, k_buf, v_buf, causal=True, key_start=key_start, key_end=key_end)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: compiles the kernels
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed, ends in ((11, [17, 300, max_len, 1]), (12, [4000, 2000, 64, 129 + Lq])):
        q.copy_(_inputs(B, Hq, Hkv, Lq, 1, D, BF16, seed=seed)[0])
        key_end.copy_(torch.tensor(ends))
        graph.replay()
        torch.cuda.synchronize()
        _assert_matches_ref(out, q, k_buf, v_buf, causal=True, key_start=key_start, key_end=key_end)
