"""A deliberately wrong rotary (half-split instead of interleaved): the negative control of the parity tests."""
from __future__ import annotations

import torch


def half_split_rotary(x, cos, sin):
    """The Llama/NeoX pairing (x[i], x[i + d/2]) instead of GLM's interleaved (x[2i], x[2i+1])."""
    c, s = cos[..., 0], sin[..., 1]  # (B, 1, T, rot/2) each (see text.rotary_tables)
    rot = 2 * c.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, x_pass), dim=-1)


