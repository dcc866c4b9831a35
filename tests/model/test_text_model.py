"""The text-only GLM-4 checkpoints (glm-4-9b-chat, -1m): config, model, chunked prefill, rotary at 1M.

Expected values come from tests/fixtures/text_tiny (made with the HF reference code run text-only)
and from float64 computations, never from this implementation's earlier output."""
from __future__ import annotations

import json

import pytest
import torch
from helpers.paths import FIXTURES
from helpers.triton_env import DEVICE, needs_triton
from safetensors.torch import load_file

from glm4v_conversion.shapes import expected_shapes
from glm4v_core import load_model
from glm4v_core.config import GLM4VConfig
from glm4v_core.generation.loop import generate
from glm4v_core.model import ops
from glm4v_core.model.decoder import rotary_tables
from glm4v_core.model.glm4v import GLM4V
from glm4v_core.model.splice import InputError

TEXT = FIXTURES / "text_tiny"


@pytest.fixture(scope="module")
def text_model():
    return load_model(TEXT)


@pytest.fixture(scope="module")
def text_ref():
    return load_file(str(TEXT / "reference.safetensors"))


def real_text_config(groups: int, rope_ratio: float, seq_length: int) -> dict:
    """glm-4-9b-chat's config.json (the fixture has its exact key set) at the real sizes."""
    hf = json.loads((TEXT / "config.json").read_text())
    return {**hf, "hidden_size": 4096, "num_layers": 40, "num_hidden_layers": 40, "num_attention_heads": 32,
            "kv_channels": 128, "ffn_hidden_size": 13696, "padded_vocab_size": 151552,
            "multi_query_group_num": groups, "rope_ratio": rope_ratio, "seq_length": seq_length,
            "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329}


@pytest.mark.parametrize("name, groups, rope_ratio, seq_length", [
    ("glm-4-9b-chat", 2, 500, 131072), ("glm-4-9b-chat-1m", 4, 10000, 1048576)])
def test_the_real_text_configs_load_with_their_kv_groups_and_rope(name, groups, rope_ratio, seq_length):
    config = GLM4VConfig.from_hf(real_text_config(groups, rope_ratio, seq_length))
    assert config.vision is None and config.boi_token_id is None and not config.has_vision
    assert config.num_kv_groups == groups and config.rope_ratio == rope_ratio
    assert config.context_length == seq_length
    model = GLM4V(config)  # meta device: shapes only
    assert model.vision is None and model.projector is None
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == expected_shapes(real_text_config(groups, rope_ratio, seq_length))
    assert shapes["text.layers.0.attn.qkv.weight"] == ((32 + 2 * groups) * 128, 4096)
    n = sum(p.numel() for p in model.parameters())
    assert 9.3e9 < n < 9.5e9, n  # glm-4-9b-chat: 9.4B parameters


def test_the_text_config_round_trips_with_its_own_keys():
    hf = json.loads((TEXT / "config.json").read_text())
    config = GLM4VConfig.from_hf(hf)
    out = config.to_hf()
    assert not {"vision_config", "boi_token_id", "eoi_token_id"} & set(out)
    assert out["num_hidden_layers"] == hf["num_hidden_layers"] and out["rope_ratio"] == 500
    assert GLM4VConfig.from_hf(out) == config
    assert set(out) <= set(hf) | {"model_type", "architectures"}


def test_a_text_model_refuses_images(text_model, text_ref):
    ids = text_ref["input_ids_b"].long()
    with pytest.raises(InputError, match="text-only GLM-4"):
        text_model(ids, pixel_values=torch.zeros(1, 3, 16, 16))
    with pytest.raises(InputError, match="text-only GLM-4"):
        generate(text_model, ids, pixel_values=torch.zeros(1, 3, 16, 16), max_new_tokens=2)


def test_the_text_context_is_the_configs_seq_length(text_model, text_ref):
    ids = text_ref["input_ids_b"].long()
    text_model.check_prompt(ids, max_new_tokens=131072 - 15)  # fits exactly
    with pytest.raises(InputError, match="context of 131072"):
        text_model.check_prompt(ids, max_new_tokens=131072 - 14)


@pytest.mark.parametrize("chunk", [None, 7, 1000, 2048])
def test_chunked_prefill_gives_the_references_logits_and_tokens(text_model, text_ref, chunk, monkeypatch):
    """The 3000-token case: every chunk size gives the reference's last logits and greedy tokens,
    and no attention call sees more queries than a chunk (no (T, T) tensor)."""
    ids = text_ref["input_ids_long"].long()
    seen = []
    real = ops.attention

    def recording(q, k, v, **kw):
        seen.append((q.shape[2], k.shape[2]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(ops, "attention", recording)
    monkeypatch.setattr(text_model, "prefill_chunk", chunk)
    state = text_model.prefill(text_model.check_prompt(ids, max_new_tokens=8), 3008)
    torch.testing.assert_close(state.logits, text_ref["logits_long_last16"][:, -1], atol=1e-4, rtol=1e-4)
    queries = max(q for q, _ in seen)
    assert queries == (3000 if chunk is None else min(chunk, 3000))
    assert all(k <= 3000 for _, k in seen)  # a chunk reads the filled slots only, not the whole cache
    tokens = generate(text_model, ids, max_new_tokens=8, stop_ids=[])
    assert torch.equal(tokens, text_ref["gen_tokens_long"])


@pytest.mark.parametrize("chunk", [3, 5])
def test_chunked_prefill_with_left_padding_gives_the_references_logits(text_model, text_ref, chunk, monkeypatch):
    monkeypatch.setattr(text_model, "prefill_chunk", chunk)
    prompt = text_model.check_prompt(text_ref["input_ids_d"].long(), attention_mask=text_ref["attention_mask_d"].long())
    state = text_model.prefill(prompt, 20)
    torch.testing.assert_close(state.logits, text_ref["logits_d"][:, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk", [4, 9])
def test_chunked_prefill_across_an_image_gives_the_references_logits(chunk, monkeypatch):
    """GLM-4V: the image's rows are spliced first, so a chunk boundary may fall inside them."""
    model = load_model(FIXTURES / "tiny")
    ref = load_file(str(FIXTURES / "tiny" / "reference.safetensors"))
    monkeypatch.setattr(model, "prefill_chunk", chunk)
    prompt = model.check_prompt(ref["input_ids_a"].long(), ref["pixel_values_a"], max_new_tokens=1)
    assert prompt.spliced_length > 2 * chunk
    state = model.prefill(prompt, prompt.spliced_length + 1)
    torch.testing.assert_close(state.logits, ref["logits_a"][:, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk", [0, -1, 2.5, True])
def test_a_bad_prefill_chunk_is_named(text_model, text_ref, chunk, monkeypatch):
    monkeypatch.setattr(text_model, "prefill_chunk", chunk)
    with pytest.raises(InputError, match="prefill_chunk must be a positive int"):
        text_model.prefill(text_model.check_prompt(text_ref["input_ids_b"].long()), 16)


@pytest.mark.parametrize("base", [10000.0 * 500, 10000.0 * 10000])
def test_rotary_tables_are_exact_up_to_position_1m(base):
    """cos / sin of position * theta against float64 at positions up to 1M (-1m's context): within
    fp32 rounding. An fp32 product position * theta is off by up to 0.03 rad there."""
    positions = torch.tensor([[0, 1, 3000, 131071, 524287, 1048575]])
    cos, sin = rotary_tables(positions, 64, base, torch.float32)
    theta = 1.0 / (base ** (torch.arange(0, 64, 2, dtype=torch.float) / 64))  # the checkpoints' fp32 frequencies
    angles = positions.double()[0, :, None] * theta.double()
    torch.testing.assert_close(cos[0, 0, :, :, 0].double(), torch.cos(angles), atol=1e-7, rtol=0)
    torch.testing.assert_close(sin[0, 0, :, :, 1].double(), torch.sin(angles), atol=1e-7, rtol=0)
    torch.testing.assert_close(sin[0, 0, :, :, 0].double(), -torch.sin(angles), atol=1e-7, rtol=0)


def test_logits_to_keep_gives_the_last_slots(text_model, text_ref):
    ids = text_ref["input_ids_b"].long()
    out = text_model(ids, logits_to_keep=4)
    assert out.logits.shape == (1, 4, text_model.config.vocab_size)
    torch.testing.assert_close(out.logits, text_ref["logits_b"][:, -4:], atol=1e-4, rtol=1e-4)
    with pytest.raises(InputError, match="logits_to_keep must be a positive int"):
        text_model(ids, logits_to_keep=0)


@needs_triton
def test_the_triton_kernels_give_the_text_references_logits(text_ref, monkeypatch):
    """The Triton attention and RMSNorm (the interpreter on CPU) with the text config's 2 KV groups and
    rope ratio 500: a padded batch, and a chunked prefill whose later chunks read the cache."""
    model = load_model(TEXT, device=DEVICE)
    ref = {k: v.to(DEVICE) for k, v in text_ref.items()}
    rows = ref["attention_mask_d"].bool()
    with torch.no_grad(), ops.use_backend("triton"):
        logits = model(ref["input_ids_d"], attention_mask=ref["attention_mask_d"]).logits
        monkeypatch.setattr(model, "prefill_chunk", 6)
        state = model.prefill(model.check_prompt(ref["input_ids_b"]), 16)
    torch.testing.assert_close(logits[rows], ref["logits_d"][rows], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state.logits, ref["logits_b"][:, -1], atol=1e-4, rtol=1e-4)
