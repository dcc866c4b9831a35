"""The one check of a GLM-4 `config.json` dict (GLM-4V-9B, or the text-only glm-4-9b-chat family),
shared by the converter and the loader.

It works on the plain HF dict (this layer imports nothing of glm4v_core and not torch), so the
converter refuses exactly the configs the loader refuses and never writes a folder that cannot
be loaded. `check_config` names the key at fault and what would be accepted: unknown keys,
missing keys, wrong types, switches this implementation does not model (e.g. `rmsnorm: false`),
non-positive sizes, sizes that do not divide, epsilons that are not finite and positive, a
rope ratio <= 0, an image size that is not a multiple of the patch size, token ids outside the
vocabulary, a `model_type` of another GLM layout.

A config without `vision_config` is a text-only GLM-4 (glm-4-9b-chat, glm-4-9b-chat-1m): the same
decoder with other values; it has no `boi_token_id` / `eoi_token_id` and no vision tower.
"""
from __future__ import annotations

import math
from typing import Any

from .errors import ConversionError


class ConfigError(ConversionError):
    """A config.json that this implementation cannot represent faithfully."""


# HF keys -> the JSON type they must have ("int" or "float"; an int is a valid float).
TEXT_KEYS = {
    "padded_vocab_size": "int", "hidden_size": "int", "num_layers": "int", "num_attention_heads": "int",
    "multi_query_group_num": "int", "kv_channels": "int", "ffn_hidden_size": "int", "layernorm_epsilon": "float",
    "rope_ratio": "float", "seq_length": "int", "eos_token_id": "ids", "pad_token_id": "int",
}
# Only a vision-language config has these (a text-only GLM-4 has none of them).
IMAGE_KEYS = {"boi_token_id": "int", "eoi_token_id": "int", "vision_config": "object"}
VISION_KEYS = {
    "hidden_size": "int", "num_hidden_layers": "int", "num_heads": "int", "intermediate_size": "int",
    "layer_norm_eps": "float", "image_size": "int", "patch_size": "int", "in_channels": "int",
    "num_positions": "int", "scaling_factor": "float",
}
MAX_SIZE = 2**31 - 1  # larger sizes overflow torch's layer constructors long before they could be real
DEFAULTS = {"rope_ratio": 1.0}  # the real glm-4v-9b config.json has no rope_ratio
# The text configs repeat num_layers as num_hidden_layers (transformers' generic name); it must agree.
ALIASES = {"num_hidden_layers": "num_layers"}
# Other GLM checkpoints that are not this ChatGLM layout, and what they are.
OTHER_LAYOUTS = {
    "glm": "the transformers-native layout of glm-4-9b-chat (glm-4-9b-chat-hf: other tensor names); use the "
           "ChatGLM remote-code checkpoint THUDM/glm-4-9b-chat instead",
    "glm4": "a GLM-4-0414 model, another architecture (extra norms in every block)",
    "glm4v": "a GLM-4.1V model, another architecture",
}
# HF keys that carry no information for the forward pass (bookkeeping, training-only dropout).
IGNORED_KEYS = {
    "_name_or_path", "model_type", "architectures", "auto_map", "torch_dtype",
    "transformers_version", "use_cache", "attention_dropout", "hidden_dropout",
    "bias_dropout_fusion", "attn_implementation", "apply_query_key_layer_scaling",
    "attention_softmax_in_fp32", "dropout_prob",
}
# HF switches that select code paths; we implement exactly one setting of each.
FIXED_TEXT = {
    "add_bias_linear": False, "add_qkv_bias": True, "apply_residual_connection_post_layernorm": False,
    "fp32_residual_connection": False, "multi_query_attention": True, "original_rope": True,
    "post_layer_norm": True, "rmsnorm": True, "tie_word_embeddings": False,
}
FIXED_VISION = {"hidden_act": "gelu"}


def check_config(hf: Any) -> dict[str, Any]:
    """Validate an HF config dict; returns it with defaults filled in and eos_token_id as a list."""
    if not isinstance(hf, dict):
        raise ConfigError(f"config must be a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type", "chatglm")
    if model_type != "chatglm":
        what = OTHER_LAYOUTS.get(model_type, "not a ChatGLM checkpoint")
        raise ConfigError(f"config: model_type {model_type!r} is {what}; this implementation reads model_type "
                          "'chatglm' (glm-4v-9b, glm-4-9b-chat, glm-4-9b-chat-1m)")
    vision = hf.get("vision_config")
    if vision is not None:
        if not isinstance(vision, dict):
            raise ConfigError(f"config: vision_config must be an object, got {vision!r}")
        _check_keys(vision, "vision_config", VISION_KEYS, FIXED_VISION, {})
    image_keys = IMAGE_KEYS if vision is not None else {}  # text-only: boi/eoi ids are neither needed nor read
    _check_keys(hf, "config", {**TEXT_KEYS, **image_keys}, FIXED_TEXT, DEFAULTS,
                allowed=(*ALIASES, *IMAGE_KEYS))
    for alias, key in ALIASES.items():
        if alias in hf and hf[alias] != hf[key]:
            raise ConfigError(f"config: {alias} ({hf[alias]!r}) must equal {key} ({hf[key]!r}): both name the "
                              "number of decoder layers")
    hf = {**DEFAULTS, **hf}
    eos = hf["eos_token_id"]
    hf["eos_token_id"] = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    _check_values(hf, vision)
    return hf


def _check_keys(raw: dict, where: str, keys: dict[str, str], fixed: dict, defaults: dict,
                allowed: tuple[str, ...] = ()) -> None:
    """Unknown keys, fixed switches and the required `keys` with their types; `allowed` keys may be
    present without being required (their values are checked by the caller)."""
    unknown = sorted(set(raw) - set(keys) - set(fixed) - IGNORED_KEYS - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}")
    for key, want in fixed.items():
        if key in raw and raw[key] != want:
            raise ConfigError(f"{where}: {key}={raw[key]!r} is not supported (only {want!r})")
    for key, kind in keys.items():
        if key not in raw:
            if key in defaults:
                continue
            raise ConfigError(f"{where}: missing required key {key!r}")
        value = raw[key]
        ok = {"int": _is_int, "float": _is_number, "object": lambda v: isinstance(v, dict),
              "ids": lambda v: _is_int(v) or (isinstance(v, list) and len(v) > 0 and all(map(_is_int, v)))}[kind](value)
        if not ok:
            want = {"int": "an integer", "float": "a number", "object": "an object",
                    "ids": "a token id or a non-empty list of token ids"}[kind]
            raise ConfigError(f"{where}: {key} must be {want}, got {value!r}")


def _check_values(hf: dict, v: dict | None) -> None:
    sizes = [("config", hf, ("padded_vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                             "multi_query_group_num", "kv_channels", "ffn_hidden_size", "seq_length"))]
    if v is not None:
        sizes.append(("vision_config", v, ("hidden_size", "num_hidden_layers", "num_heads", "intermediate_size",
                                           "image_size", "patch_size", "in_channels", "num_positions")))
    for where, raw, keys in sizes:
        for key in keys:
            if not 0 < raw[key] <= MAX_SIZE:
                raise ConfigError(f"{where}: {key} must be a positive integer below 2**31, got {raw[key]!r}")
    positive = [("config", "layernorm_epsilon", hf["layernorm_epsilon"]), ("config", "rope_ratio", hf["rope_ratio"])]
    if v is not None:
        positive += [("vision_config", "layer_norm_eps", v["layer_norm_eps"]),
                     ("vision_config", "scaling_factor", v["scaling_factor"])]
    for where, key, value in positive:
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{where}: {key} must be a finite number > 0, got {value!r}")
    heads, groups = hf["num_attention_heads"], hf["multi_query_group_num"]
    if heads % groups:
        raise ConfigError(f"config: num_attention_heads ({heads}) is not a multiple of multi_query_group_num "
                          f"({groups}): each KV group serves the same number of query heads")
    if hf["kv_channels"] % 4:
        raise ConfigError(f"config: kv_channels ({hf['kv_channels']}) must be a multiple of 4 "
                          "(half the head rotates, in pairs)")
    if v is not None:
        _check_vision_values(v)
    vocab = hf["padded_vocab_size"]
    ids = [("pad_token_id", hf["pad_token_id"]), *(("eos_token_id", i) for i in hf["eos_token_id"]),
           *((key, hf[key]) for key in ("boi_token_id", "eoi_token_id") if key in hf)]
    for name, value in ids:
        if not _is_int(value):
            raise ConfigError(f"config: {name} must be an integer, got {value!r}")
        if not 0 <= value < vocab:
            raise ConfigError(f"config: {name} {value!r} is not a token id in the vocabulary [0, {vocab})")


def _check_vision_values(v: dict) -> None:
    if v["hidden_size"] % v["num_heads"]:
        raise ConfigError(f"vision_config: hidden_size ({v['hidden_size']}) is not a multiple of num_heads "
                          f"({v['num_heads']})")
    size, patch = v["image_size"], v["patch_size"]
    if size % patch or (size // patch) % 2:
        example = 2 * patch * max(1, size // (2 * patch))
        raise ConfigError(f"vision_config: image_size {size} must be a multiple of patch_size {patch} with an even "
                          f"number of patches per side (the projector merges 2x2 patches); e.g. {example}")
    grid = size // patch
    if v["num_positions"] != grid ** 2 + 1:
        raise ConfigError(f"vision_config: num_positions is {v['num_positions']}, expected (image_size/patch_size)^2 "
                          f"+ 1 = {grid ** 2 + 1}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
