"""LoRA adapters on the tiny checkpoint: frozen base, per-part adapters on fused layers, exact
merge / unmerge, adapter files, and a merged model through save_model / glm4v-convert / load_model."""
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from glm4v_conversion.cli import main as convert_main
from glm4v_core import load_model, save_model
from glm4v_core.transforms import adapter_files
from glm4v_core.transforms import lora as transforms_lora
from glm4v_core.transforms.lora import LoRAConfig, LoRAError, LoRALinear

ALL_PARTS = ["decoder", "vision", "projector"]


@pytest.fixture
def tiny(fixtures_dir):
    return load_model(fixtures_dir / "tiny")


def inputs(model):
    c = model.config
    ids = torch.tensor([[5, 6, c.boi_token_id, c.pad_token_id, c.eoi_token_id, 7, 8, 9]])
    pixels = torch.randn(1, 3, c.vision.image_size, c.vision.image_size, generator=torch.Generator().manual_seed(1))
    return ids, pixels


def logits(model):
    with torch.no_grad():
        return model(*inputs(model)).logits


def randomize_b(model, seed=0):
    """Give every B a non-zero value (B starts at 0, which would make every test trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in transforms_lora.adapters_of(model).values():
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.05)


def test_fresh_adapters_change_nothing_and_only_adapters_train(tiny):
    before = logits(tiny)
    adapters = transforms_lora.add_lora(tiny, LoRAConfig.from_presets(ALL_PARTS, rank=4))
    c = tiny.config
    assert len(adapters) == 4 * c.num_layers + 4 * c.vision.num_layers + 4
    assert "text.lm_head" not in adapters and "text.layers.0.attn.qkv" in adapters
    assert torch.equal(logits(tiny), before)  # B = 0: the update starts at exactly 0
    trainable = {n for n, p in tiny.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert len(trainable) == 2 * len(adapters)


def test_fused_qkv_gets_one_adapter_per_part(tiny):
    """split_fused: q, k and v each get their own rank-r adapter, as three separate Linears would."""
    transforms_lora.add_lora(tiny, LoRAConfig(rank=3, alpha=6.0, targets=("text.layers.0.attn.qkv",)))
    randomize_b(tiny)
    adapter = tiny.text.layers[0].attn.qkv
    c = tiny.config
    parts = (c.num_heads * c.head_dim, c.num_kv_groups * c.head_dim, c.num_kv_groups * c.head_dim)
    assert adapter.parts == parts and adapter.lora_A.shape == (3 * 3, c.hidden_size)
    x = torch.randn(2, 5, c.hidden_size)
    A = adapter.lora_A.unflatten(0, (3, 3))
    expected = torch.cat([x @ A[p].T @ B.T for p, B in enumerate(adapter.lora_B.split(parts))], dim=-1)
    got = adapter(x) - adapter.base(x)
    torch.testing.assert_close(got, 2.0 * expected, rtol=1e-5, atol=1e-6)
    # a plain (unsplit) rank-3r adapter would mix the parts: the block-diagonal structure is real
    mixed = x @ adapter.lora_A.T @ torch.cat([adapter.lora_B] * 3, dim=1).T
    assert not torch.allclose(got, 2.0 * mixed, atol=1e-4)


def test_shared_fused_adapter_is_one_plain_adapter(tiny):
    transforms_lora.add_lora(tiny, LoRAConfig(rank=2, targets=("text.layers.*.mlp.gate_up",), split_fused=False))
    adapter = tiny.text.layers[1].mlp.gate_up
    assert adapter.parts == (2 * tiny.config.ffn_hidden_size,) and adapter.lora_A.shape[0] == 2


@pytest.mark.parametrize("split_fused", [True, False])
def test_merged_logits_equal_unmerged(tiny, split_fused):
    base_weights = {n: p.clone() for n, p in tiny.state_dict().items()}
    transforms_lora.add_lora(tiny, LoRAConfig.from_presets(ALL_PARTS, rank=4, split_fused=split_fused))
    randomize_b(tiny)
    unmerged = logits(tiny)
    base = tiny.text.layers[0].attn.qkv.base.weight.clone()
    transforms_lora.merge(tiny)
    assert not torch.equal(tiny.text.layers[0].attn.qkv.base.weight, base)  # the update is in the weight now
    merged = logits(tiny)
    err = (merged - unmerged).abs().max() / unmerged.abs().max()
    assert err < 1e-5, f"merged vs unmerged logits: max rel err {err:.2e}"
    transforms_lora.unmerge(tiny)
    torch.testing.assert_close(logits(tiny), unmerged, rtol=1e-5, atol=1e-5)
    transforms_lora.remove_lora(tiny, merge_first=False)
    for name, p in tiny.state_dict().items():  # the base weights are back within fp32 rounding
        torch.testing.assert_close(p, base_weights[name], rtol=0, atol=1e-6)


def test_adapter_file_round_trip_names_and_metadata(tiny, fixtures_dir, tmp_path):
    config = LoRAConfig.from_presets(["decoder", "projector"], rank=2, alpha=4.0, dropout=0.1)
    transforms_lora.add_lora(tiny, config, seed=3)
    randomize_b(tiny)
    path = adapter_files.save_adapters(tiny, tmp_path / "adapter.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]  # no temporary left behind
    with safe_open(str(path), framework="pt") as f:
        meta, names = f.metadata(), set(f.keys())
    assert meta["format"] == "glm4v-lora" and meta["format_version"] == "1"
    assert LoRAConfig(**json.loads(meta["lora_config"])) == config
    assert "text.layers.1.attn.qkv.lora_A" in names and "projector.glu.up.lora_B" in names
    fresh = load_model(fixtures_dir / "tiny")
    adapter_files.load_adapters(fresh, path)
    assert fresh.lora_config == config
    for name, t in transforms_lora.adapter_state(tiny).items():
        assert torch.equal(transforms_lora.adapter_state(fresh)[name], t), name
    torch.testing.assert_close(logits(fresh.eval()), logits(tiny.eval()), rtol=0, atol=0)


def test_adapter_file_errors(tiny, fixtures_dir, tmp_path):
    transforms_lora.add_lora(tiny, LoRAConfig(rank=2))
    path = adapter_files.save_adapters(tiny, tmp_path / "a.safetensors")
    other = load_model(fixtures_dir / "tiny")
    transforms_lora.add_lora(other, LoRAConfig(rank=3))
    with pytest.raises(LoRAError, match="holds adapters of"):
        adapter_files.load_adapters(other, path)
    save_model(load_model(fixtures_dir / "tiny"), tmp_path / "ckpt")
    with pytest.raises(LoRAError, match="not a glm4v-core adapter file"):
        adapter_files.load_adapters(load_model(fixtures_dir / "tiny"), tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(LoRAError, match="does not exist"):
        adapter_files.load_adapters(other, tmp_path / "missing.safetensors")
    with pytest.raises(LoRAError, match="matches no Linear"):
        transforms_lora.add_lora(load_model(fixtures_dir / "tiny"), LoRAConfig(targets=("text.layers.*.attn.qkvv",)))
    with pytest.raises(LoRAError, match="already has LoRA"):
        transforms_lora.add_lora(tiny, LoRAConfig())
    with pytest.raises(LoRAError, match="rank"):
        LoRAConfig(rank=0)


@pytest.mark.parametrize("via", ["hf", "native+convert"])
def test_merged_model_saves_loads_and_converts(tiny, fixtures_dir, tmp_path, via):
    transforms_lora.add_lora(tiny, LoRAConfig.from_presets(ALL_PARTS, rank=4))
    randomize_b(tiny)
    expected = logits(tiny)
    model = transforms_lora.remove_lora(tiny)  # merged into the base Linears, original parameter names
    assert not transforms_lora.adapters_of(model)
    if via == "hf":
        folder = save_model(model, tmp_path / "merged")
    else:
        save_model(model, tmp_path / "native", layout="native")
        assert convert_main([str(tmp_path / "native"), str(tmp_path / "merged"), "--to", "hf", "--no-progress"]) == 0
        folder = tmp_path / "merged"
    reloaded = load_model(folder)
    torch.testing.assert_close(logits(reloaded), expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(logits(reloaded), logits(load_model(fixtures_dir / "tiny")))


class ScaledLinear(nn.Module):
    """A stand-in for a quantized base: holds its weight differently and merges through merge_delta."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.scale = linear.weight.detach().abs().max()
        self.register_buffer("q", linear.weight.detach() / self.scale)

    def forward(self, x):
        return x @ (self.q * self.scale).T

    def merge_delta(self, delta):
        self.q = (self.q * self.scale + delta) / self.scale


def test_any_base_module_with_the_linear_contract_can_be_wrapped():
    torch.manual_seed(0)
    base = ScaledLinear(nn.Linear(16, 12, bias=False))
    adapter = LoRALinear(base, rank=2, alpha=2.0, parts=(4, 8))
    adapter.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapter.lora_B.normal_()
    x = torch.randn(3, 16)
    y = adapter(x)
    adapter.merge()
    torch.testing.assert_close(adapter(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base(x), y, rtol=1e-5, atol=1e-5)  # the update went into the base


def test_add_lora_wraps_a_stand_in_base_in_the_model(tiny):
    """QLoRA's order: replace a Linear by a quantized stand-in first, then add adapters."""
    tiny.text.layers[0].mlp.down = ScaledLinear(tiny.text.layers[0].mlp.down)
    adapters = transforms_lora.add_lora(tiny, LoRAConfig(rank=2, targets=("text.layers.*.mlp.down",)))
    assert isinstance(adapters["text.layers.0.mlp.down"].base, ScaledLinear)
    randomize_b(tiny)
    unmerged = logits(tiny)
    transforms_lora.merge(tiny)
    torch.testing.assert_close(logits(tiny), unmerged, rtol=1e-5, atol=1e-5)


def test_an_adapter_keeps_no_fp32_copy_of_its_input_for_backward():
    """In a bf16 model the adapter's fp32 A multiplies the bf16 input: autograd alone would keep the
    fp32 cast of the input (2x the bf16 size) for A's gradient. CastMatmul keeps the bf16 input and
    gives the plain expression's values and gradients exactly."""
    from glm4v_core.transforms.lora import CastMatmul, LoRALinear
    torch.manual_seed(0)
    adapter = LoRALinear(torch.nn.Linear(64, 48).to(torch.bfloat16).requires_grad_(False), rank=4, alpha=8,
                         parts=(16, 32))
    adapter.reset_parameters(torch.Generator().manual_seed(1))
    x = torch.randn(3, 10, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        adapter(x).float().sum().backward()
    assert saved and not any(t.dtype == torch.float32 and t.numel() == x.numel() for t in saved)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 37, 64, dtype=dtype, requires_grad=True)
        A, grad = torch.randn(24, 64, requires_grad=True), torch.randn(2, 37, 24)
        ours = torch.autograd.grad(CastMatmul.apply(x, A), (x, A), grad)
        plain = torch.autograd.grad(x.to(A.dtype) @ A.T, (x, A), grad)
        assert all(torch.equal(a, b) for a, b in zip(ours, plain, strict=True)), dtype
