"""Every native tensor name and its shape, from a plain HF config dict (docs/architecture.md).

The converter checks checkpoints against this without building the model (it does not import
glm4v_core); tests/test_names.py proves it equals the state_dict of the model built on the
meta device, for the real config and both fixtures, so the two cannot drift apart.
"""
from __future__ import annotations

from typing import Any

from .config_check import check_config

Shape = tuple[int, ...]


def expected_shapes(hf_config: dict[str, Any]) -> dict[str, Shape]:
    """Native name -> shape for the model `hf_config` (an HF config.json dict) describes: the decoder's
    tensors, and the ViT's and the projector's when the config has a vision_config."""
    c = _sizes(hf_config)
    shapes = _vision_shapes(c) if "v_layers" in c else {}
    shapes.update(_text_shapes(c))
    return shapes


def _text_shapes(c: dict[str, int]) -> dict[str, Shape]:
    H, V, F = c["hidden_size"], c["padded_vocab_size"], c["ffn_hidden_size"]
    qkv = (c["num_attention_heads"] + 2 * c["multi_query_group_num"]) * c["kv_channels"]
    shapes = {
        "text.embed.weight": (V, H),
        "text.final_norm.weight": (H,),
        "text.lm_head.weight": (V, H),
    }
    layer = {
        "attn_norm.weight": (H,),
        "attn.qkv.weight": (qkv, H),
        "attn.qkv.bias": (qkv,),
        "attn.out.weight": (H, c["num_attention_heads"] * c["kv_channels"]),  # heads*kv may differ from H
        "mlp_norm.weight": (H,),
        "mlp.gate_up.weight": (2 * F, H),  # silu(a) * b, a and b stacked
        "mlp.down.weight": (H, F),
    }
    for i in range(c["num_layers"]):
        shapes.update({f"text.layers.{i}.{k}": v for k, v in layer.items()})
    return shapes


def _vision_shapes(c: dict[str, int]) -> dict[str, Shape]:
    H, F, Hv, P, M = c["hidden_size"], c["ffn_hidden_size"], c["v_hidden"], c["v_patch"], c["v_mlp"]
    shapes = {
        "vision.patch.proj.weight": (Hv, c["v_channels"], P, P),
        "vision.patch.proj.bias": (Hv,),
        "vision.patch.cls": (1, Hv),
        "vision.patch.pos.weight": (c["v_positions"], Hv),
        "projector.conv.weight": (H, Hv, 2, 2),  # 2x2 stride-2 conv from the ViT grid to the text width
        "projector.conv.bias": (H,),
        "projector.glu.proj.weight": (H, H),
        "projector.glu.norm.weight": (H,), "projector.glu.norm.bias": (H,),
        "projector.glu.gate.weight": (F, H),  # the GLU reuses the decoder's ffn width
        "projector.glu.up.weight": (F, H),
        "projector.glu.down.weight": (H, F),
        "projector.boi": (1, 1, H), "projector.eoi": (1, 1, H),
    }
    layer = {
        "attn.qkv.weight": (3 * Hv, Hv), "attn.qkv.bias": (3 * Hv,),
        "attn.out.weight": (Hv, Hv), "attn.out.bias": (Hv,),
        "attn_norm.weight": (Hv,), "attn_norm.bias": (Hv,),
        "mlp.fc1.weight": (M, Hv), "mlp.fc1.bias": (M,),
        "mlp.fc2.weight": (Hv, M), "mlp.fc2.bias": (Hv,),
        "mlp_norm.weight": (Hv,), "mlp_norm.bias": (Hv,),
    }
    for i in range(c["v_layers"]):
        shapes.update({f"vision.layers.{i}.{k}": v for k, v in layer.items()})
    return shapes


_TEXT_KEYS = ("hidden_size", "padded_vocab_size", "num_layers", "num_attention_heads", "multi_query_group_num",
              "kv_channels", "ffn_hidden_size")
_VISION_KEYS = {"v_hidden": "hidden_size", "v_layers": "num_hidden_layers", "v_mlp": "intermediate_size",
                "v_patch": "patch_size", "v_channels": "in_channels", "v_positions": "num_positions"}


def _sizes(hf_config: dict[str, Any]) -> dict[str, int]:
    """The integer sizes the shapes depend on, after the one config check (it names a bad key)."""
    hf_config = check_config(hf_config)
    vision = hf_config.get("vision_config")
    sizes = {k: hf_config[k] for k in _TEXT_KEYS}
    if vision is not None:
        sizes.update({k: vision[v] for k, v in _VISION_KEYS.items()})
    return sizes
