"""Model configuration: frozen dataclasses read from the HF `config.json` of GLM-4V-9B, or of a
text-only GLM-4 (glm-4-9b-chat, glm-4-9b-chat-1m: the same decoder, no `vision_config`).

`from_hf` runs the converter's own check of the dict (glm4v_conversion.config_check: unknown and
missing keys, types, unsupported switches such as `rmsnorm: false`, sizes that are not positive
or do not divide, epsilons, token ids), so the converter and the loader refuse the same configs.
This module does not import torch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glm4v_conversion.config_check import FIXED_TEXT, FIXED_VISION, ConfigError, check_config
from glm4v_conversion.files import parse_json, read_text

__all__ = ["BUNDLED_CHECKPOINT", "BUNDLED_VOCABULARY", "ConfigError", "GLM4VConfig", "VisionConfig"]

# The demo that ships inside the package (random weights: gibberish text, but every stage runs in seconds),
# with the real GLM-4 vocabulary that the tokenizer cuts to its size.
BUNDLED_CHECKPOINT = Path(__file__).resolve().parent / "demo" / "tiny"
BUNDLED_VOCABULARY = BUNDLED_CHECKPOINT.parent / "tokenizer" / "tokenizer.model"


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
    boi_token_id: int | None  # <|begin_of_image|> (None: a text-only GLM-4)
    eoi_token_id: int | None  # <|end_of_image|>
    vision: VisionConfig | None  # None: a text-only GLM-4, no vision tower
    num_hidden_layers: int | None = None  # the text configs' copy of num_layers, kept to write it back

    _HF_NAMES = {
        "vocab_size": "padded_vocab_size", "num_heads": "num_attention_heads",
        "num_kv_groups": "multi_query_group_num", "head_dim": "kv_channels",
        "eos_token_ids": "eos_token_id", "vision": "vision_config",
    }

    @property
    def has_vision(self) -> bool:
        return self.vision is not None

    @property
    def context_length(self) -> int:
        """Cache slots and rotary positions a prompt plus its answer may use: the config's seq_length
        (131072 for glm-4-9b-chat, 1048576 for -1m), and at least the 8K the GLM-4V-9B model card
        promises (its config says 8192; the test fixtures say less)."""
        return max(self.seq_length, 8192)

    @property
    def rotary_dim(self) -> int:
        """Only the first half of each head rotates (64 of 128 dims), in interleaved pairs."""
        return self.head_dim // 2

    @property
    def qkv_size(self) -> int:
        return (self.num_heads + 2 * self.num_kv_groups) * self.head_dim

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> GLM4VConfig:
        hf = check_config(hf)
        vision = hf.get("vision_config")
        vision = None if vision is None else _build(VisionConfig, vision)
        return _build(cls, {**hf, "vision_config": vision, "eos_token_id": tuple(hf["eos_token_id"])})

    @classmethod
    def from_json(cls, path: str | Path) -> GLM4VConfig:
        path = Path(path)
        data = parse_json(read_text(path, "config file", ConfigError), path, ConfigError)
        try:
            return cls.from_hf(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """The HF config.json dict (what `from_hf` reads back), fixed switches included."""
        out = _to_hf(self, FIXED_TEXT)
        if self.vision is None:  # a text-only GLM-4 writes none of the image keys
            for key in ("vision_config", "boi_token_id", "eoi_token_id"):
                del out[key]
        else:
            out["vision_config"] = _to_hf(self.vision, FIXED_VISION)
        if self.num_hidden_layers is None:
            del out["num_hidden_layers"]
        out["eos_token_id"] = list(self.eos_token_ids)
        return {"model_type": "chatglm", "architectures": ["ChatGLMModel"], **out}


def _build(cls, hf: dict[str, Any]):
    """Dataclass `cls` from an already checked HF dict (field names mapped from the HF keys)."""
    return cls(**{f.name: hf.get(cls._HF_NAMES.get(f.name, f.name)) for f in dataclasses.fields(cls)})


def _to_hf(obj, fixed: dict[str, Any]) -> dict[str, Any]:
    out = {obj._HF_NAMES.get(f.name, f.name): getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return {**out, **fixed}
