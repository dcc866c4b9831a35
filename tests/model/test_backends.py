"""The torch and Triton paths are interchangeable: same logits on the fixtures, both pass parity.

On CPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1, as in CI)."""

import pytest
import torch
from helpers.triton_env import DEVICE, needs_triton
from safetensors.torch import load_file

from glm4v_core import load_model
from glm4v_core.model import ops as model_ops
from glm4v_core.parity.reference import case_inputs
from glm4v_core.parity.run import run_parity


@needs_triton
@pytest.mark.parametrize("fixture", ["tiny", "narrow"])
def test_triton_and_torch_backends_agree_and_pass_parity(fixtures_dir, fixture):
    model = load_model(fixtures_dir / fixture, device=DEVICE)
    ref = load_file(str(fixtures_dir / fixture / "reference.safetensors"), device=DEVICE)
    args = (ref["input_ids_c"], ref["pixel_values_c"], ref["attention_mask_c"], ref["position_ids_in_c"])
    rows = ref["attention_mask_expanded_c"].bool()
    with torch.no_grad(), model_ops.use_backend("torch"):
        torch_logits = model(*args).logits
    with torch.no_grad(), model_ops.use_backend("triton"):
        triton_logits = model(*args).logits
        reports = run_parity(fixtures_dir / fixture, device=DEVICE)
    diff = (triton_logits - torch_logits)[rows].abs()
    assert diff.max() <= 2e-5, f"max {diff.max():.3e} mean {diff.mean():.3e}"
    assert all(r.ok for r in reports), [(r.name, [s.name for s in r.stages if not s.ok]) for r in reports]


def test_backend_override_and_explicit_request_that_cannot_run(monkeypatch):
    x = torch.ones(2, 8)
    with model_ops.use_backend("torch"):
        assert model_ops.backend_for(x) == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert model_ops.backend_for(x) == "torch"  # auto on CPU
    with model_ops.use_backend("triton"), pytest.raises(model_ops.BackendError, match="cannot run on cpu"):
        model_ops.rms_norm(x, torch.ones(8), 1e-6)
    with pytest.raises(model_ops.BackendError, match="unknown backend"):
        with model_ops.use_backend("cuda"):
            pass


@needs_triton
@pytest.mark.parametrize("case", ["a", "c"])
def test_model_gradients_through_triton_equal_torch(fixtures_dir, case):
    """Training path: every parameter's gradient through the Triton kernels (attention and both
    RMSNorms, forward and backward) equals the torch backend's, within 1e-4 of its own scale."""
    model = load_model(fixtures_dir / "tiny", device=DEVICE)
    model.requires_grad_(True)
    ref = load_file(str(fixtures_dir / "tiny" / "reference.safetensors"), device=DEVICE)
    inputs = case_inputs(ref, case)
    weights = None
    grads = {}
    for backend in ("torch", "triton"):
        model.zero_grad(set_to_none=True)
        with model_ops.use_backend(backend):
            logits = model(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                           inputs["position_ids"]).logits
        if weights is None:
            weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0)).to(logits)
        (logits * weights).sum().backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["triton"].keys() == grads["torch"].keys() and len(grads["torch"]) > 10
    for name, g in grads["torch"].items():
        diff = (grads["triton"][name] - g).abs().max().item()
        assert diff <= 1e-4 * g.abs().max().item() + 1e-7, f"{name}: max diff {diff:.3e} vs scale {g.abs().max():.3e}"


@needs_triton
def test_compiled_fullgraph_equals_eager_on_triton_backend():
    """torch.compile(fullgraph=True) traces the ops as single nodes (no graph break), forward and
    backward, and gives eager's values."""
    def block(x, residual, w, q, k, v, key_start, key_end):
        normed, h = model_ops.add_rms_norm(x, residual, w, 1e-5)
        attn = model_ops.attention(q * normed.mean(), k, v, causal=True, key_start=key_start, key_end=key_end)
        return model_ops.rms_norm(attn, w[:16], 1e-5), h

    g = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(2, 5, 32, generator=g).to(DEVICE) for _ in range(2))
    w = torch.randn(32, generator=g).to(DEVICE)
    q = torch.randn(2, 4, 5, 16, generator=g).to(DEVICE)
    k, v = (torch.randn(2, 2, 24, 16, generator=g).to(DEVICE) for _ in range(2))
    key_start, key_end = torch.tensor([0, 3], device=DEVICE), torch.tensor([24, 11], device=DEVICE)
    leaves = (x, residual, w, q, k, v)
    results = []
    with model_ops.use_backend("triton"):
        for fn in (block, torch.compile(block, fullgraph=True)):
            args = [t.detach().clone().requires_grad_() for t in leaves]
            out, h = fn(*args, key_start, key_end)
            (out.sum() + h.sum()).backward()
            results.append([out, h] + [a.grad for a in args])
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("Lq", [1, 6])
def test_torch_backend_attention_with_key_range_compiles_fullgraph(Lq):
    """The reference path with per-row key ranges (the static-cache decode step) has no branch on
    tensor values: torch.compile(fullgraph=True) traces it and matches eager."""
    def step(q, k, v, key_start, key_end):
        with model_ops.use_backend("torch"):
            return model_ops.attention(q, k, v, causal=True, key_start=key_start, key_end=key_end)

    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, Lq, 16, generator=g)
    k, v = (torch.randn(2, 2, 32, 16, generator=g) for _ in range(2))
    key_start, key_end = torch.tensor([0, 4]), torch.tensor([32, 19])
    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, key_start, key_end), step(q, k, v, key_start, key_end),
                               rtol=1e-5, atol=1e-6)
    key_end = torch.tensor([7, 30])  # new values, same shapes: the same graph, right answer
    torch.testing.assert_close(compiled(q, k, v, key_start, key_end), step(q, k, v, key_start, key_end),
                               rtol=1e-5, atol=1e-6)


def test_unknown_backend_from_the_environment_is_named_at_first_use(monkeypatch):
    monkeypatch.setattr(model_ops, "_backend", "cuda-graphs")  # as if GLM4V_BACKEND=cuda-graphs at import
    with pytest.raises(model_ops.BackendError, match="unknown backend 'cuda-graphs'"):
        model_ops.rms_norm(torch.ones(2, 8), torch.ones(8), 1e-6)
