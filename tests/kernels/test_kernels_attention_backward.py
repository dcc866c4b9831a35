"""Triton attention backward (dq, dk, dv) vs autograd through `attention_ref`.

On CPU these run under TRITON_INTERPRET=1. Tolerance: fp32 tight (1e-5 of each gradient's scale);
low precision within 2x torch's own bf16-vs-fp32 gradient error on the same inputs, plus a small atol.
"""
from __future__ import annotations

import pytest
import torch
from helpers.triton_env import DEVICE, needs_triton

import glm4v_kernels as K

pytestmark = needs_triton
F32, BF16 = torch.float32, torch.bfloat16
RTOL = {F32: 1e-5, BF16: 2e-3}  # of the gradient's max-abs

# (B, Hq, Hkv, Lq, Lk, D, causal, key_start, key_end, dtype): odd sizes, GQA, masks, both paths
CASES = [
    (1, 4, 2, 37, 53, 112, True, None, None, F32),            # causal bottom-right, GQA 2, ViT's D
    (1, 4, 2, 37, 53, 72, False, None, None, BF16),           # bidirectional, D 72
    (2, 4, 2, 37, 53, 112, True, [0, 9], None, BF16),         # left padding
    (2, 2, 2, 37, 53, 72, False, [3, 0], [53, 30], F32),      # both ends, no GQA
    (2, 4, 2, 37, 64, 112, True, [0, 5], [64, 41], F32),      # a static cache filled to key_end
    (2, 4, 2, 5, 53, 72, True, [0, 7], [53, 20], BF16),       # decode-sized query block
    (1, 2, 1, 53, 37, 64, False, None, None, F32),            # more queries than keys, GQA 2
]


def _case_id(c) -> str:
    B, Hq, Hkv, Lq, Lk, D, causal, ks, ke, dtype = c
    return (f"b{B}-h{Hq}/{Hkv}-q{Lq}-k{Lk}-d{D}-{'causal' if causal else 'bidir'}{'-start' if ks else ''}"
            f"{'-end' if ke else ''}-{str(dtype)[6:]}")


def _grads(fn, q, k, v, do, dtype, **kw):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    fn(q, k, v, **kw).backward(do.to(dtype))
    return [t.grad.float() for t in (q, k, v)]


def _assert_grads_match(fn, case, ref_causal=None):
    B, Hq, Hkv, Lq, Lk, D, causal, ks, ke, dtype = case
    g = torch.Generator().manual_seed(Lq * Lk + D)
    q, do = (torch.randn(B, Hq, Lq, D, generator=g).to(DEVICE, dtype) for _ in range(2))
    k, v = (torch.randn(B, Hkv, Lk, D, generator=g).to(DEVICE, dtype) for _ in range(2))
    kw = dict(key_start=None if ks is None else torch.tensor(ks, device=DEVICE),
              key_end=None if ke is None else torch.tensor(ke, device=DEVICE))
    ref_kw = dict(kw, causal=causal if ref_causal is None else ref_causal)
    ours = _grads(fn, q, k, v, do, dtype, causal=causal, **kw)
    ref32 = _grads(K.attention_ref, q, k, v, do, F32, **ref_kw)
    ref_lp = _grads(K.attention_ref, q, k, v, do, dtype, **ref_kw)
    for name, a, r, r_lp in zip(("dq", "dk", "dv"), ours, ref32, ref_lp, strict=True):
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        budget = 2 * (r_lp - r).abs().max().item() + RTOL[dtype] * max(1.0, r.abs().max().item())
        err = (a - r).abs().max().item()
        assert err <= budget, f"{name}: max diff {err:.3e} exceeds budget {budget:.3e}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_backward_matches_autograd_of_reference(case):
    _assert_grads_match(K.attention, case)


@pytest.mark.parametrize("group_split", [1, 2, 4])
def test_group_split_sums_the_same_gradients(group_split):
    """dk, dv of a KV head's 4 query heads from 1, 2 or 4 programs (fp32 partials summed)."""
    from glm4v_kernels.flash_attention import attention_forward
    from glm4v_kernels.flash_attention_backward import attention_backward
    g = torch.Generator().manual_seed(3)
    q, do = (torch.randn(2, 8, 21, 64, generator=g).to(DEVICE) for _ in range(2))
    k, v = (torch.randn(2, 2, 40, 64, generator=g).to(DEVICE) for _ in range(2))
    key_start, key_end = torch.tensor([0, 3], device=DEVICE), torch.tensor([40, 33], device=DEVICE)
    o, lse = attention_forward(q, k, v, True, key_start=key_start, key_end=key_end)
    ours = attention_backward(do, q, k, v, o, lse, True, key_start=key_start, key_end=key_end,
                              group_split=group_split)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    K.attention_ref(q, k, v, causal=True, key_start=key_start, key_end=key_end).backward(do)
    for name, a, r in zip(("dq", "dk", "dv"), ours, (q.grad, k.grad, v.grad), strict=True):
        assert a.dtype == r.dtype and a.shape == r.shape
        assert (a - r).abs().max() <= 1e-5 * max(1.0, r.abs().max().item()), name


def test_checker_catches_a_wrong_mask():
    """Negative control: the gradients of a causal kernel are not those of bidirectional attention."""
    with pytest.raises(AssertionError, match="max diff"):
        _assert_grads_match(K.attention, CASES[0], ref_causal=False)


def test_rows_that_see_no_key_get_zero_gradients():
    """Row 1 is empty (key_end <= key_start): its dq is 0 and no key gets a gradient from it."""
    q, k, v = (torch.randn(2, 2, n, 32, device=DEVICE, requires_grad=True) for n in (6, 20, 20))
    out = K.attention(q, k, v, causal=False, key_start=torch.tensor([0, 9], device=DEVICE),
                      key_end=torch.tensor([20, 9], device=DEVICE))
    out.sum().backward()
    assert torch.count_nonzero(out[1]) == 0
    for t in (q, k, v):
        assert torch.count_nonzero(t.grad[1]) == 0 and torch.count_nonzero(t.grad[0]) > 0


# ----------------------------------------------------------------------------- real shapes on a GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", [
    (1, 16, 16, 1025, 1025, 112, False, None, None, BF16),    # ViT-like, bidirectional
    (2, 32, 2, 1000, 1000, 128, True, [0, 300], None, BF16),  # decoder, left-padded batch
    (1, 8, 2, 300, 300, 256, True, None, None, BF16),         # the largest head dim
    (1, 4, 2, 257, 300, 128, True, [5], [290], F32),          # fp32, both ends
], ids=_case_id)
def test_backward_real_shapes_on_gpu(case):
    _assert_grads_match(K.attention, case)
