"""GLM-4 decoder: pre-norm blocks, fp32 RMSNorm, half-dim interleaved rotary, GQA (docs/architecture.md)."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from glm4v_core.config import GLM4VConfig
from glm4v_core.model import ops
from glm4v_core.model.cache import KVCache


class KeyRange(NamedTuple):
    """The keys row b may attend to: start[b] <= j < end[b], (B,) int32 (None: from 0 / to the last key).

    stop: with a cache, read only its slots [0, stop) (a Python int: a prefill chunk knows its end,
    so it never reads the unfilled rest of a long cache); None reads the whole buffer (decode)."""
    start: torch.Tensor | None
    end: torch.Tensor | None
    stop: int | None = None


def rotary_tables(position_ids: torch.Tensor, rotary_dim: int, base: float,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation tables for the given positions, built once per forward for every layer:
    cos (B, 1, T, rotary_dim/2, 2) = (cos, cos) and the signed sin (B, 1, T, rotary_dim/2, 2) = (-sin, sin).

    theta_i = base^(-2i/rotary_dim) in fp32; angles in float64, tables in fp32. Like the reference,
    the table is rounded to bf16/fp16 when the model runs in half precision (bf16 parity depends on
    it). cos is stored once per element of a pair, not broadcast over the pair: a product whose operands both have a
    contiguous last dim runs vectorized, while broadcasting a size-1 last dim makes torch's bf16
    multiply fall back to a scalar loop (a bf16 prefill's rotary on CPU was 2.5x slower on one thread,
    7x on two).
    """
    theta = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float, device=position_ids.device) / rotary_dim))
    # The frequencies are fp32, as in the checkpoints' own code; the angles are taken in float64 and
    # rounded once: an fp32 product position * theta is off by up to half an ulp of the angle, which
    # is 0.03 rad at position 1M (glm-4-9b-chat-1m) and still 1e-4 at 3K.
    angles = position_ids.double()[..., None] * theta.double()  # (B, T, rotary_dim/2)
    cos, sin = torch.cos(angles).float(), torch.sin(angles).float()
    if dtype in (torch.bfloat16, torch.float16):
        cos, sin = cos.to(dtype), sin.to(dtype)
    return torch.stack((cos, cos), dim=-1)[:, None], torch.stack((-sin, sin), dim=-1)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x1, x2) = (x[2i], x[2i+1]) of the first rotary_dim dims; the rest pass.

    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), written as pairs * (cos, cos) + swapped pairs * (-sin, sin):
    the same products and sums, so bit for bit the reference's result, in 5 kernels instead of 8.
    x: (B, nh, T, hd). Products are taken in x's dtype, as in the reference (bf16 parity)."""
    rot = 2 * cos.shape[-2]
    # a plain view, not a rearrange: the pair split is the rotary arithmetic itself, not a head layout
    pairs = x[..., :rot].unflatten(-1, (-1, 2))  # (B, nh, T, rot/2, 2)
    rotated = (pairs * cos + pairs.flip(-1) * sin).flatten(-2)
    return torch.cat((rotated, x[..., rot:]), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """rms_norm(x); with a residual, the fused residual step: (rms_norm(x + residual), x + residual).
        fp32 inside, one cast at the end (the sum is rounded to x's dtype before it is normalized)."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: GLM4VConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv, self.head_dim = cfg.num_heads, cfg.num_kv_groups, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_groups * cfg.head_dim
        self.qkv = ops.Linear(cfg.hidden_size, cfg.qkv_size, bias=True,  # fused q | k | v, with bias
                              parts=(self.q_size, self.kv_size, self.kv_size))
        self.out = ops.Linear(self.q_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], keys: KeyRange,
                cache: KVCache | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        qk, v = self.qkv(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = rearrange(qk, "b t (heads hd) -> b heads t hd", hd=self.head_dim)  # heads = nh + nkv, rotated at once
        q, k = apply_rotary(qk, *rope).split([self.num_heads, self.num_kv], dim=1)
        v = rearrange(v, "b t (nkv hd) -> b nkv t hd", hd=self.head_dim)
        if cache is not None:  # the cache holds rotated k per KV group, never expanded
            k_all, v_all = cache.write(self.layer_idx, slots, k, v)
            if keys.end is not None:  # decode, later prefill chunks: the buffer, valid up to keys.end
                k, v = k_all[:, :, :keys.stop], v_all[:, :, :keys.stop]  # (the first chunk: its own keys)
        out = ops.attention(q, k, v, causal=True, key_start=keys.start, key_end=keys.end)  # (B, nh, T, hd)
        return self.out(rearrange(out, "b nh t hd -> b t (nh hd)"))


class MLP(nn.Module):
    def __init__(self, cfg: GLM4VConfig):
        super().__init__()
        self.gate_up = ops.Linear(cfg.hidden_size, 2 * cfg.ffn_hidden_size, bias=False,  # fused gate | up
                                  parts=(cfg.ffn_hidden_size, cfg.ffn_hidden_size))
        self.down = ops.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # SwiGLU: first half gates the second
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm: h = x + Attn(RMSNorm(x)); out = h + MLP(RMSNorm(h))."""

    def __init__(self, cfg: GLM4VConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], keys: KeyRange,
                cache: KVCache | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        normed, h = self.mlp_norm(self.attn(self.attn_norm(x), rope, keys, cache, slots), residual=x)
        return h + self.mlp(normed)


class TextDecoder(nn.Module):
    checkpoint_layers = False  # GLM4V.gradient_checkpointing: recompute blocks in backward

    def __init__(self, cfg: GLM4VConfig):
        super().__init__()
        self.cfg = cfg
        # _weight=empty skips the random init (the checkpoint fills it; normal_ has no cheap meta kernel)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.lm_head = ops.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # untied from embed

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, keys: KeyRange = KeyRange(None, None),
                cache: KVCache | None = None, slots: torch.Tensor | None = None,
                hidden_states: list | None = None) -> torch.Tensor:
        """Embeddings (B, T, H) -> final-normed hidden states (B, T, H).

        position_ids (B, T): rotary positions (not cache slots). keys: the key range of each row
        (start: left padding; end: None attends the T new keys, else the whole cache buffer up to it).
        With a cache, the new keys are also written at cache slots `slots` (T,). Appends each layer's
        input and the last output to `hidden_states` when given (HF's output_hidden_states)."""
        rope = rotary_tables(position_ids, self.cfg.rotary_dim, 10000.0 * self.cfg.rope_ratio, x.dtype)
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(x)
            if self.checkpoint_layers and torch.is_grad_enabled():
                x = checkpoint(layer, x, rope, keys, cache, slots, use_reentrant=False)
            else:
                x = layer(x, rope, keys, cache, slots)
        if hidden_states is not None:
            hidden_states.append(x)
        return self.final_norm(x)
