"""Model configuration: frozen dataclasses read from the HF `config.json` of GLM-4V-9B.

`from_hf` rejects unknown keys and missing required keys by name, and refuses settings that
this implementation does not model (e.g. `rmsnorm: false`) instead of silently ignoring them.
This module does not import torch.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that this implementation cannot represent faithfully."""


# HF keys that carry no information for the forward pass (bookkeeping, training-only dropout).
_IGNORED_KEYS = {
    "_name_or_path", "model_type", "architectures", "auto_map", "torch_dtype",
    "transformers_version", "use_cache", "attention_dropout", "hidden_dropout",
    "bias_dropout_fusion", "attn_implementation", "apply_query_key_layer_scaling",
    "attention_softmax_in_fp32", "dropout_prob",
}
# HF switches that select code paths; we implement exactly one setting of each.
_FIXED_TEXT = {
    "add_bias_linear": False, "add_qkv_bias": True, "apply_residual_connection_post_layernorm": False,
    "fp32_residual_connection": False, "multi_query_attention": True, "original_rope": True,
    "post_layer_norm": True, "rmsnorm": True, "tie_word_embeddings": False,
}
_FIXED_VISION = {"hidden_act": "gelu"}


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int          # ViT width (1792)
    num_layers: int           # ViT blocks (63)
    num_heads: int            # attention heads; head_dim = hidden/heads = 112, not a power of two
    intermediate_size: int    # MLP width (15360)
    layer_norm_eps: float     # ViT LayerNorm eps (1e-6); the projector's LayerNorm uses 1e-5
    image_size: int           # input side in pixels (1120): fixed, no interpolation of positions
    patch_size: int           # conv patch side (14)
    in_channels: int          # 3 (RGB)
    num_positions: int        # learned position rows = 1 + (image/patch)^2 (6401)
    scaling_factor: float     # image embeddings are divided by this (8)

    _HF_NAMES = {"num_layers": "num_hidden_layers"}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        """Patches per side (80): the ViT sees grid*grid patches plus one cls token."""
        return self.image_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        """Tokens per image after the 2x2 stride-2 conv (1600), without boi/eoi."""
        return (self.grid // 2) ** 2


@dataclass(frozen=True)
class GLM4VConfig:
    vocab_size: int           # embedding/output rows (151552, padded; the tokenizer uses 151343)
    hidden_size: int          # decoder width (4096)
    num_layers: int           # decoder blocks (40)
    num_heads: int            # query heads (32)
    num_kv_groups: int        # KV heads shared by num_heads/num_kv_groups query heads each (2)
    head_dim: int             # per-head width (128); heads*head_dim may differ from hidden
    ffn_hidden_size: int      # SwiGLU width (13696)
    layernorm_epsilon: float  # RMSNorm eps (1.5625e-7: meaningful only in fp32)
    rope_ratio: float         # rotary base = 10000 * rope_ratio
    seq_length: int           # the HF config's nominal context; positions are not capped at it
    eos_token_ids: tuple[int, ...]  # generation stops on any of these
    pad_token_id: int         # left padding, and the image placeholder between boi and eoi
    boi_token_id: int         # <|begin_of_image|>
    eoi_token_id: int         # <|end_of_image|>
    vision: VisionConfig

    _HF_NAMES = {
        "vocab_size": "padded_vocab_size", "num_heads": "num_attention_heads",
        "num_kv_groups": "multi_query_group_num", "head_dim": "kv_channels",
        "eos_token_ids": "eos_token_id", "vision": "vision_config",
    }
    _DEFAULTS = {"rope_ratio": 1.0}  # the real glm-4v-9b config.json has no rope_ratio

    @property
    def rotary_dim(self) -> int:
        """Only the first half of each head rotates (64 of 128 dims), in interleaved pairs."""
        return self.head_dim // 2

    @property
    def qkv_size(self) -> int:
        return (self.num_heads + 2 * self.num_kv_groups) * self.head_dim

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "GLM4VConfig":
        if not isinstance(hf, dict):
            raise ConfigError(f"config must be a JSON object, got {type(hf).__name__}")
        vision_raw = hf.get("vision_config")
        if not isinstance(vision_raw, dict):
            raise ConfigError("config.json: missing or malformed 'vision_config' object")
        vision = _build(VisionConfig, vision_raw, "vision_config", _FIXED_VISION, {})
        if "eos_token_id" in hf:  # HF allows one id or a list
            eos = hf["eos_token_id"]
            hf = {**hf, "eos_token_id": tuple(eos) if isinstance(eos, list) else (eos,)}
        config = _build(cls, {**hf, "vision_config": vision}, "config", _FIXED_TEXT, cls._DEFAULTS)
        config._validate()
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> "GLM4VConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_hf(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """The HF config.json dict (what `from_hf` reads back), fixed switches included."""
        out = _to_hf(self, _FIXED_TEXT)
        out["vision_config"] = _to_hf(self.vision, _FIXED_VISION)
        out["eos_token_id"] = list(self.eos_token_ids)
        return {"model_type": "chatglm", "architectures": ["ChatGLMModel"], **out}

    def _validate(self) -> None:
        if self.num_heads % self.num_kv_groups:
            raise ConfigError(f"num_attention_heads ({self.num_heads}) is not a multiple of "
                              f"multi_query_group_num ({self.num_kv_groups})")
        if self.head_dim % 4:
            raise ConfigError(f"kv_channels ({self.head_dim}) must be a multiple of 4 "
                              "(half the head rotates in pairs)")
        v = self.vision
        if v.hidden_size % v.num_heads:
            raise ConfigError(f"vision hidden_size ({v.hidden_size}) is not a multiple of num_heads ({v.num_heads})")
        if v.image_size % v.patch_size or v.grid % 2:
            raise ConfigError(f"vision image_size {v.image_size} / patch_size {v.patch_size} must give an even grid")
        if v.num_positions != v.grid ** 2 + 1:
            raise ConfigError(f"vision num_positions is {v.num_positions}, expected (image/patch)^2 + 1 = {v.grid ** 2 + 1}")
        ids = [("pad_token_id", self.pad_token_id), ("boi_token_id", self.boi_token_id),
               ("eoi_token_id", self.eoi_token_id), *(("eos_token_id", i) for i in self.eos_token_ids)]
        for name, value in ids:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name} {value!r} is not a token id in the vocabulary [0, {self.vocab_size})")


def _build(cls, raw: dict[str, Any], where: str, fixed: dict[str, Any], defaults: dict[str, Any]):
    """Construct dataclass `cls` from HF keys, naming every unknown, missing or unsupported key."""
    names = {f.name: cls._HF_NAMES.get(f.name, f.name) for f in dataclasses.fields(cls)}
    known = set(names.values()) | set(fixed) | _IGNORED_KEYS | {"rope_ratio"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}")
    for key, want in fixed.items():
        if key in raw and raw[key] != want:
            raise ConfigError(f"{where}: {key}={raw[key]!r} is not supported (only {want!r})")
    values = {}
    for field, hf_key in names.items():
        if hf_key in raw:
            values[field] = raw[hf_key]
        elif field in defaults:
            values[field] = defaults[field]
        else:
            raise ConfigError(f"{where}: missing required key {hf_key!r}")
    for f in dataclasses.fields(cls):
        value, kinds = values[f.name], _TYPES.get(f.type)
        if kinds and (isinstance(value, bool) or not isinstance(value, kinds)):
            raise ConfigError(f"{where}: {names[f.name]} must be {'an integer' if kinds == (int,) else 'a number'}, "
                              f"got {value!r}")
    return cls(**values)


_TYPES = {"int": (int,), "float": (int, float)}  # annotation (a string here) -> accepted JSON types


def _to_hf(obj, fixed: dict[str, Any]) -> dict[str, Any]:
    out = {obj._HF_NAMES.get(f.name, f.name): getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return {**out, **fixed}
