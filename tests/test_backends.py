"""The torch and Triton paths are interchangeable: same logits on the fixtures, both pass parity.

On CPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1, as in CI)."""

import pytest
import torch
from safetensors.torch import load_file

from glm4v_core import load_model, ops
from glm4v_core.parity import run_parity
from triton_env import DEVICE, needs_triton


@needs_triton
@pytest.mark.parametrize("fixture", ["tiny", "narrow"])
def test_triton_and_torch_backends_agree_and_pass_parity(fixtures_dir, fixture):
    model = load_model(fixtures_dir / fixture, device=DEVICE)
    ref = load_file(str(fixtures_dir / fixture / "reference.safetensors"), device=DEVICE)
    args = (ref["input_ids_c"], ref["pixel_values_c"], ref["attention_mask_c"], ref["position_ids_in_c"])
    rows = ref["attention_mask_expanded_c"].bool()
    with torch.no_grad(), ops.use_backend("torch"):
        torch_logits = model(*args).logits
    with torch.no_grad(), ops.use_backend("triton"):
        triton_logits = model(*args).logits
        reports = run_parity(fixtures_dir / fixture, device=DEVICE)
    diff = (triton_logits - torch_logits)[rows].abs()
    assert diff.max() <= 2e-5, f"max {diff.max():.3e} mean {diff.mean():.3e}"
    assert all(r.ok for r in reports), [(r.name, [s.name for s in r.stages if not s.ok]) for r in reports]


def test_backend_override_and_explicit_request_that_cannot_run(monkeypatch):
    x = torch.ones(2, 8)
    with ops.use_backend("torch"):
        assert ops.backend_for(x) == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert ops.backend_for(x) == "torch"  # auto on CPU
    with ops.use_backend("triton"), pytest.raises(ops.BackendError, match="cannot run on cpu"):
        ops.rms_norm(x, torch.ones(8), 1e-6)
    with pytest.raises(ops.BackendError, match="unknown backend"):
        with ops.use_backend("cuda"):
            pass


@needs_triton
def test_attention_with_gradients_auto_falls_back_explicit_triton_raises(monkeypatch):
    q, k, v = (torch.randn(1, 2, 4, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    with pytest.raises(NotImplementedError, match="forward-only"):
        with ops.use_backend("triton"):
            ops.attention(q, k, v, causal=True)
    monkeypatch.setattr(ops, "backend_for", lambda x: "triton")  # as 'auto' picks on CUDA
    out = ops.attention(q, k, v, causal=True)
    out.sum().backward()  # the torch path carries the gradient
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_unknown_backend_from_the_environment_is_named_at_first_use(monkeypatch):
    monkeypatch.setattr(ops, "_backend", "cuda-graphs")  # as if GLM4V_BACKEND=cuda-graphs at import
    with pytest.raises(ops.BackendError, match="unknown backend 'cuda-graphs'"):
        ops.rms_norm(torch.ones(2, 8), torch.ones(8), 1e-6)
