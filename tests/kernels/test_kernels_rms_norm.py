"""Triton RMSNorm and fused add + RMSNorm vs `rms_norm_ref` / `add_rms_norm_ref`, forward and backward.

On CPU these run under TRITON_INTERPRET=1; without it (and without CUDA) they skip with a reason.
Tolerance (STYLE): 2x the error of the reference run in the low precision dtype vs the fp32
reference on the same inputs, plus a small atol.
"""
from __future__ import annotations

import pytest
import torch
from helpers.triton_env import DEVICE, needs_triton

import glm4v_kernels as K

pytestmark = needs_triton
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-4}
GLM_EPS, VIT_EPS = 1.5625e-07, 1e-6
SHAPES = [(1, 97), (3, 1792), (2, 3, 4096), (5, 1), (7, 111), (2, 1025)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(shape, dtype, seed=0, x_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * x_scale
    residual = torch.randn(shape, generator=g)
    weight = 1 + 0.5 * torch.randn(shape[-1], generator=g)
    return tuple(t.to(device=DEVICE, dtype=dtype) for t in (x, residual, weight))


def _assert_close(out, ref32, ref_lp, what=""):
    """out vs the fp32 reference, within 2x the low-precision reference's own error + atol."""
    assert out.shape == ref32.shape and out.dtype == ref_lp.dtype, (out.shape, out.dtype)
    err = (out.float() - ref32.float()).abs()
    ref_err = (ref_lp.float() - ref32.float()).abs().max().item()
    budget = 2 * ref_err + ATOL[ref_lp.dtype]
    assert err.max().item() <= budget, (
        f"{what} max diff {err.max().item():.3e} (mean {err.mean().item():.3e}) exceeds "
        f"2 x torch-{ref_lp.dtype} error {ref_err:.3e} + atol {ATOL[ref_lp.dtype]:.0e}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_forward(shape, dtype):
    x, _, w = _inputs(shape, dtype)
    for eps in (GLM_EPS, VIT_EPS):
        ref32 = K.rms_norm_ref(x.float(), w.float(), eps)
        _assert_close(K.rms_norm(x, w, eps), ref32, K.rms_norm_ref(x, w, eps), f"eps {eps}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:4], ids=str)
def test_add_rms_norm_forward(shape, dtype):
    x, residual, w = _inputs(shape, dtype)
    normed, new_residual = K.add_rms_norm(x, residual, w, GLM_EPS)
    ref_normed, ref_residual = K.add_rms_norm_ref(x, residual, w, GLM_EPS)
    # the residual stream is x + residual rounded to the input dtype: bit for bit
    assert torch.equal(new_residual, ref_residual)
    ref32 = K.rms_norm_ref(ref_residual.float(), w.float(), GLM_EPS)
    _assert_close(normed, ref32, ref_normed)


def test_bf16_output_matches_the_reference_bit_for_bit_almost_everywhere():
    """One fp32 pipeline and one rounding at the end: bf16 outputs equal the reference's except for
    rare last-bit flips (fp32 summation order). Llama's order (cast, then weight) fails this."""
    x, _, w = _inputs((16, 4096), torch.bfloat16, seed=1)
    out, ref = K.rms_norm(x, w, GLM_EPS), K.rms_norm_ref(x, w, GLM_EPS)
    assert (out != ref).float().mean().item() <= 0.01
    x32 = x.float()
    llama = w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + GLM_EPS)).to(x.dtype)
    assert (llama != ref).float().mean().item() > 0.01  # the check above can fail


def test_eps_is_applied_in_fp32():
    """Rows with mean(x^2) ~ eps: a dropped or mis-cast eps changes the result by ~40%."""
    x, _, w = _inputs((4, 256), torch.float32, seed=2, x_scale=3e-4)
    ref = K.rms_norm_ref(x, w, GLM_EPS)
    _assert_close(K.rms_norm(x, w, GLM_EPS), ref, ref)
    assert (K.rms_norm_ref(x, w, 0.0) - ref).abs().max() > 0.1


def test_non_contiguous_and_empty_inputs():
    x, _, w = _inputs((6, 2 * 97), torch.bfloat16, seed=3)
    view = x[:, ::2]  # column stride 2: copied explicitly
    assert torch.equal(K.rms_norm(view, w[:97], VIT_EPS), K.rms_norm(view.contiguous(), w[:97], VIT_EPS))
    rows = x.view(6, 2, 97)[:, 1]  # row stride 194, unit column stride: read in place
    assert torch.equal(K.rms_norm(rows, w[:97], VIT_EPS), K.rms_norm(rows.contiguous(), w[:97], VIT_EPS))
    strided_w = torch.stack([w[:97], w[97:]], dim=1)[:, 0]  # weight with stride 2
    assert torch.equal(K.rms_norm(rows, strided_w, VIT_EPS), K.rms_norm(rows, w[:97], VIT_EPS))
    empty = torch.empty(0, 3, 97, dtype=torch.bfloat16, device=DEVICE)
    assert K.rms_norm(empty, w[:97], VIT_EPS).shape == (0, 3, 97)
    normed, s = K.add_rms_norm(empty, empty, w[:97], VIT_EPS)
    assert normed.shape == s.shape == (0, 3, 97)


def _grads(fn, x, residual, w, dy, ds):
    """Gradients of <fn outputs, (dy, ds)> w.r.t. (x, residual, w); residual=None for rms_norm."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, residual, w) if t is not None]
    outs = fn(*leaves)
    if isinstance(outs, torch.Tensor):
        torch.autograd.backward([outs], [dy])
    else:
        torch.autograd.backward(list(outs), [dy, ds])
    return [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 97), (2, 5, 1792), (33, 256)], ids=str)
@pytest.mark.parametrize("fused", [False, True], ids=["rms_norm", "add_rms_norm"])
def test_backward_matches_autograd_of_reference(shape, dtype, fused):
    x, residual, w = _inputs(shape, dtype, seed=4)
    g = torch.Generator().manual_seed(5)
    dy, ds = (torch.randn(shape, generator=g).to(device=DEVICE, dtype=dtype) for _ in range(2))
    if fused:
        args = (x, residual, w, dy, ds)
        kernel = lambda x_, r_, w_: K.add_rms_norm(x_, r_, w_, GLM_EPS)  # noqa: E731
        ref = lambda x_, r_, w_: K.add_rms_norm_ref(x_, r_, w_, GLM_EPS)  # noqa: E731
    else:
        args = (x, None, w, dy, None)
        kernel = lambda x_, w_: K.rms_norm(x_, w_, GLM_EPS)  # noqa: E731
        ref = lambda x_, w_: K.rms_norm_ref(x_, w_, GLM_EPS)  # noqa: E731
    got = _grads(kernel, *args)
    ref_lp = _grads(ref, *args)
    ref32 = _grads(ref, *(None if t is None else t.float() for t in args))
    names = ["dx", "dresidual", "dweight"] if fused else ["dx", "dweight"]
    for name, a, r32, rlp in zip(names, got, ref32, ref_lp, strict=True):
        _assert_close(a, r32, rlp, name)


def test_no_autograd_graph_without_grad():
    x, residual, w = _inputs((2, 64), torch.float32)
    assert K.rms_norm(x, w, VIT_EPS).grad_fn is None
    assert K.rms_norm(x.requires_grad_(), w, VIT_EPS).grad_fn is not None
    with torch.no_grad():
        assert K.add_rms_norm(x, residual, w, VIT_EPS)[0].grad_fn is None


def test_checker_catches_a_wrong_kernel():
    """Negative control: a norm without the weight must fail the comparison."""
    x, _, w = _inputs((3, 97), torch.bfloat16, seed=6)
    ref32 = K.rms_norm_ref(x.float(), w.float(), GLM_EPS)
    with pytest.raises(AssertionError, match="max diff"):
        _assert_close(K.rms_norm(x, torch.ones_like(w), GLM_EPS), ref32, K.rms_norm_ref(x, w, GLM_EPS))


def _x(shape=(2, 8), dtype=torch.float32, device=DEVICE):
    return torch.randn(shape, device=device).to(dtype)


@pytest.mark.parametrize("call,error,match", [
    (lambda: K.rms_norm(_x(), _x((7,)), VIT_EPS), ValueError, r"weight must be 1-D with x's last dim"),
    (lambda: K.rms_norm(_x(), _x((2, 8)), VIT_EPS), ValueError, "weight must be 1-D"),
    (lambda: K.rms_norm(_x(dtype=torch.int32), _x((8,)), VIT_EPS), TypeError, "float16/bfloat16/float32"),
    (lambda: K.rms_norm(_x(), _x((8,), device="meta"), VIT_EPS), ValueError, "weight on meta"),
    (lambda: K.rms_norm(_x((1, 20000)), _x((20000,)), VIT_EPS), ValueError, r"last dim must be in 1\.\.16384"),
    (lambda: K.rms_norm(_x(), _x((8,)), None), TypeError, "eps must be a float"),
    (lambda: K.rms_norm([1.0], _x((8,)), VIT_EPS), TypeError, "x must be a torch.Tensor"),
    (lambda: K.add_rms_norm(_x(), _x(dtype=torch.bfloat16), _x((8,)), VIT_EPS), ValueError,
     "residual must match x"),
    (lambda: K.add_rms_norm(_x(), _x((3, 8)), _x((8,)), VIT_EPS), ValueError, "residual must match x"),
], ids=["weight-size", "weight-ndim", "int-dtype", "device-mismatch", "too-wide", "eps-type",
        "not-a-tensor", "residual-dtype", "residual-shape"])
def test_bad_input_raises_a_named_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.rms_norm(torch.randn(2, 8), torch.ones(8), VIT_EPS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(16384, 4096), (6401, 1792), (1, 4096)], ids=str)
def test_real_shapes_on_gpu(shape):
    x, residual, w = _inputs(shape, torch.bfloat16, seed=7)
    _assert_close(K.rms_norm(x, w, GLM_EPS), K.rms_norm_ref(x.float(), w.float(), GLM_EPS),
                  K.rms_norm_ref(x, w, GLM_EPS))
    normed, s = K.add_rms_norm(x, residual, w, GLM_EPS)
    ref_normed, ref_s = K.add_rms_norm_ref(x, residual, w, GLM_EPS)
    assert torch.equal(s, ref_s)
    _assert_close(normed, K.rms_norm_ref(ref_s.float(), w.float(), GLM_EPS), ref_normed)
