"""The HF <-> native name table and the shape table, over the full-size real checkpoint layout.

Everything here runs on the `meta` device: the 13.9B-parameter model is built without storage."""
import json
import re

import pytest
import torch
from safetensors import safe_open

from glm4v_conversion.convert import rotary_inv_freq
from glm4v_conversion.names import HF_IGNORED_BUFFERS, HF_TO_NATIVE, hf_to_native, is_hf_name, native_to_hf
from glm4v_conversion.shapes import expected_shapes
from glm4v_core.checkpoint import build_meta_model
from glm4v_core.config import GLM4VConfig


@pytest.fixture(scope="module")
def manifest(fixtures_dir):
    return json.loads((fixtures_dir / "real_manifest.json").read_text())


@pytest.fixture(scope="module")
def real_meta_model(manifest):
    return build_meta_model(GLM4VConfig.from_hf(manifest["config"]))


def test_meta_model_allocates_nothing(real_meta_model):
    assert all(t.is_meta for t in real_meta_model.state_dict().values())


def test_hf_to_native_is_a_bijection_onto_the_meta_model_with_equal_shapes(manifest, real_meta_model):
    hf = {name: tuple(shape) for name, (shape, _dtype) in manifest["parameters"].items()}
    native = {name: tuple(t.shape) for name, t in real_meta_model.state_dict().items()}
    mapped = {name: hf_to_native(name) for name in hf}
    unmapped = sorted(n for n, m in mapped.items() if m is None)
    assert not unmapped, f"HF names without a native name: {unmapped[:5]}"
    assert len(set(mapped.values())) == len(hf), "two HF names map to one native name"
    assert set(mapped.values()) == set(native), (
        f"not onto: native-only {sorted(set(native) - set(mapped.values()))[:5]}, "
        f"HF-only {sorted(set(mapped.values()) - set(native))[:5]}")
    wrong = [(h, hf[h], native[n]) for h, n in mapped.items() if hf[h] != native[n]]
    assert not wrong, f"{len(wrong)} shape mismatches, e.g. {wrong[:3]}"
    assert all(native_to_hf(n) == h for h, n in mapped.items()), "the derived inverse does not undo the table"


def test_every_table_entry_is_used_by_the_real_checkpoint(manifest):
    for hf_pattern in HF_TO_NATIVE:
        regex = re.compile(re.escape(hf_pattern).replace(r"\{\}", r"\d+") + "$")
        assert any(regex.match(n) for n in manifest["parameters"]), f"dead table entry {hf_pattern!r}"


def test_parameter_count_and_split(manifest, real_meta_model):
    counts = {"vision": 0, "decoder": 0}
    for name, p in real_meta_model.named_parameters():
        counts["vision" if name.startswith(("vision.", "projector.")) else "decoder"] += p.numel()
    assert sum(counts.values()) == 13_906_320_896 == manifest["total_parameters"]
    assert counts == manifest["parameters_by_part"]


def test_every_stored_dtype_is_bf16(manifest):
    assert {dtype for _shape, dtype in manifest["parameters"].values()} == {"bfloat16"}


@pytest.mark.parametrize("source", ["real", "tiny", "narrow"])
def test_shape_table_equals_the_meta_model(source, manifest, fixtures_dir):
    hf = manifest["config"] if source == "real" else json.loads((fixtures_dir / source / "config.json").read_text())
    model = build_meta_model(GLM4VConfig.from_hf(hf))
    assert expected_shapes(hf) == {n: tuple(t.shape) for n, t in model.state_dict().items()}


def test_persistent_buffers_are_exactly_the_ignored_ones(manifest):
    assert set(manifest["persistent_buffers"]) == set(HF_IGNORED_BUFFERS)
    for name in HF_IGNORED_BUFFERS:
        assert hf_to_native(name) is None
        shape, dtype = manifest["persistent_buffers"][name]
        made = rotary_inv_freq(manifest["config"], getattr(torch, dtype))
        assert (list(made.shape), made.dtype) == (shape, torch.bfloat16)


@pytest.mark.parametrize("fixture", ["tiny", "narrow"])
def test_recreated_inv_freq_equals_the_stored_buffer_bit_for_bit(fixture, fixtures_dir):
    config = json.loads((fixtures_dir / fixture / "config.json").read_text())
    with safe_open(str(fixtures_dir / fixture / "model-00001-of-00002.safetensors"), "pt") as f:
        stored = f.get_tensor("transformer.rotary_pos_emb.inv_freq")
    made = rotary_inv_freq(config, torch.bfloat16)
    assert made.dtype == stored.dtype and torch.equal(made.view(torch.int16), stored.view(torch.int16)), (made, stored)


def test_inv_freq_must_be_computed_in_bf16_not_rounded_from_fp32(fixtures_dir):
    """Negative control: the narrow fixture (d = 64) tells the two recipes apart."""
    config = json.loads((fixtures_dir / "narrow" / "config.json").read_text())
    with safe_open(str(fixtures_dir / "narrow" / "model-00001-of-00002.safetensors"), "pt") as f:
        stored = f.get_tensor("transformer.rotary_pos_emb.inv_freq")
    rounded = rotary_inv_freq(config, torch.float32).to(torch.bfloat16)
    assert not torch.equal(rounded, stored)


def test_name_helpers():
    assert hf_to_native("transformer.encoder.layers.12.mlp.dense_4h_to_h.weight") == "text.layers.12.mlp.down.weight"
    assert native_to_hf("vision.layers.62.attn.qkv.bias") == \
        "transformer.vision.transformer.layers.62.attention.query_key_value.bias"
    assert hf_to_native("transformer.encoder.layers.x.mlp.dense_4h_to_h.weight") is None
    assert hf_to_native("transformer.vision.boi.extra") is None  # patterns are anchored at both ends
    assert is_hf_name("transformer.vision.boi") and not is_hf_name("projector.boi")
