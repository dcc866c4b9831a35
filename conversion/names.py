"""The one HF <-> native tensor-name table. `{}` stands for a layer index.

Native names follow our module tree (glm4v_core.GLM4V): `vision.*` (ViT),
`projector.*` (conv + GLU + boi/eoi) and `text.*` (GLM-4 decoder). The inverse map is
derived from the same table, never written by hand.
"""
from __future__ import annotations

import re

HF_TO_NATIVE: dict[str, str] = {
    # GLM-4 decoder
    "transformer.embedding.word_embeddings.weight": "text.embed.weight",
    "transformer.encoder.layers.{}.input_layernorm.weight": "text.layers.{}.attn_norm.weight",
    "transformer.encoder.layers.{}.self_attention.query_key_value.weight": "text.layers.{}.attn.qkv.weight",
    "transformer.encoder.layers.{}.self_attention.query_key_value.bias": "text.layers.{}.attn.qkv.bias",
    "transformer.encoder.layers.{}.self_attention.dense.weight": "text.layers.{}.attn.out.weight",
    "transformer.encoder.layers.{}.post_attention_layernorm.weight": "text.layers.{}.mlp_norm.weight",
    "transformer.encoder.layers.{}.mlp.dense_h_to_4h.weight": "text.layers.{}.mlp.gate_up.weight",
    "transformer.encoder.layers.{}.mlp.dense_4h_to_h.weight": "text.layers.{}.mlp.down.weight",
    "transformer.encoder.final_layernorm.weight": "text.final_norm.weight",
    "transformer.output_layer.weight": "text.lm_head.weight",
    # EVA2-CLIP ViT
    "transformer.vision.patch_embedding.proj.weight": "vision.patch.proj.weight",
    "transformer.vision.patch_embedding.proj.bias": "vision.patch.proj.bias",
    "transformer.vision.patch_embedding.cls_embedding": "vision.patch.cls",
    "transformer.vision.patch_embedding.position_embedding.weight": "vision.patch.pos.weight",
    "transformer.vision.transformer.layers.{}.attention.query_key_value.weight": "vision.layers.{}.attn.qkv.weight",
    "transformer.vision.transformer.layers.{}.attention.query_key_value.bias": "vision.layers.{}.attn.qkv.bias",
    "transformer.vision.transformer.layers.{}.attention.dense.weight": "vision.layers.{}.attn.out.weight",
    "transformer.vision.transformer.layers.{}.attention.dense.bias": "vision.layers.{}.attn.out.bias",
    "transformer.vision.transformer.layers.{}.input_layernorm.weight": "vision.layers.{}.attn_norm.weight",
    "transformer.vision.transformer.layers.{}.input_layernorm.bias": "vision.layers.{}.attn_norm.bias",
    "transformer.vision.transformer.layers.{}.mlp.fc1.weight": "vision.layers.{}.mlp.fc1.weight",
    "transformer.vision.transformer.layers.{}.mlp.fc1.bias": "vision.layers.{}.mlp.fc1.bias",
    "transformer.vision.transformer.layers.{}.mlp.fc2.weight": "vision.layers.{}.mlp.fc2.weight",
    "transformer.vision.transformer.layers.{}.mlp.fc2.bias": "vision.layers.{}.mlp.fc2.bias",
    "transformer.vision.transformer.layers.{}.post_attention_layernorm.weight": "vision.layers.{}.mlp_norm.weight",
    "transformer.vision.transformer.layers.{}.post_attention_layernorm.bias": "vision.layers.{}.mlp_norm.bias",
    # conv downsample + GLU projector
    "transformer.vision.conv.weight": "projector.conv.weight",
    "transformer.vision.conv.bias": "projector.conv.bias",
    "transformer.vision.linear_proj.linear_proj.weight": "projector.glu.proj.weight",
    "transformer.vision.linear_proj.norm1.weight": "projector.glu.norm.weight",
    "transformer.vision.linear_proj.norm1.bias": "projector.glu.norm.bias",
    "transformer.vision.linear_proj.gate_proj.weight": "projector.glu.gate.weight",
    "transformer.vision.linear_proj.dense_h_to_4h.weight": "projector.glu.up.weight",
    "transformer.vision.linear_proj.dense_4h_to_h.weight": "projector.glu.down.weight",
    "transformer.vision.boi": "projector.boi",
    "transformer.vision.eoi": "projector.eoi",
}

# Buffers the HF reference saves but never reads: the rotary inverse frequencies (we compute
# the angles from the config). Loading ignores them; writing HF recreates them.
HF_IGNORED_BUFFERS = ("transformer.rotary_pos_emb.inv_freq",)

NATIVE_TO_HF: dict[str, str] = {native: hf for hf, native in HF_TO_NATIVE.items()}
if len(NATIVE_TO_HF) != len(HF_TO_NATIVE):
    raise AssertionError("HF_TO_NATIVE is not one-to-one")


def _compile(table: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile(re.escape(src).replace(r"\{\}", r"(\d+)") + "$"), dst) for src, dst in table.items()]


_HF_PATTERNS = _compile(HF_TO_NATIVE)
_NATIVE_PATTERNS = _compile(NATIVE_TO_HF)


def _translate(name: str, patterns: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, dst in patterns:
        m = pattern.match(name)
        if m:
            return dst.replace("{}", m.group(1)) if m.groups() else dst
    return None


def hf_to_native(name: str) -> str | None:
    """Native name of an HF tensor, or None when the table has no entry for it."""
    return _translate(name, _HF_PATTERNS)


def native_to_hf(name: str) -> str | None:
    """HF name of a native tensor, or None when the table has no entry for it."""
    return _translate(name, _NATIVE_PATTERNS)


def is_hf_name(name: str) -> bool:
    """HF checkpoints name everything under `transformer.`; native names never do."""
    return name.startswith("transformer.")
