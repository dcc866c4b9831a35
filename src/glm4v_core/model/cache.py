"""Static KV cache: fixed-shape buffers allocated once, written at slots given as tensors.

Cache slots are not rotary positions: an image's patch rows fill one slot each but share one
position id. The cache owns the buffers and each row's first valid slot (`key_start`, left
padding); the caller owns the step's write slots as a tensor (like gpt-fast's `input_pos`), so a
decode step has the same shapes at every length and never syncs with the host. Attention reads
the whole buffer and masks keys outside [key_start, key_end).

Rows that finish early can be dropped (`keep_rows`, eager decoding only): the live rows move to
the front of the same buffers and later steps read and write only those.
"""
from __future__ import annotations

import torch

from glm4v_core.errors import GLM4VError


class CacheFullError(GLM4VError):
    """More tokens than the cache was sized for."""


class KVCache:
    def __init__(self, num_layers: int, batch: int, num_kv: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        # One tensor per layer, not one (layers, ...) tensor: a compiled step writes a view of a
        # shared tensor through a copy of the whole buffer, a layer's own tensor in place.
        shape = (batch, num_kv, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]  # rotated keys
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]  # per KV group
        self.key_start = torch.zeros(batch, dtype=torch.int32, device=device)  # first valid slot per row
        self.max_len = max_len
        self.rows = batch  # live rows, at the front of the buffers

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (rows, Hkv, T, D) at cache slots `slots` (T,); return the layer's whole buffers
        (rows, Hkv, max_len, D). Slots are shared by the rows: every row is left-padded to one length."""
        k_all, v_all = self.k[layer][:self.rows], self.v[layer][:self.rows]
        k_all.index_copy_(2, slots, k)
        v_all.index_copy_(2, slots, v)
        return k_all, v_all

    def keep_rows(self, rows: torch.Tensor, filled: int) -> None:
        """Keep only `rows` (indices among the live rows, in order), moved to the front, so rows
        that finished stop costing compute. Copies the `filled` slots once; nothing is reallocated."""
        n = rows.numel()
        for layer in range(len(self.k)):  # a layer at a time keeps the gather's temporary small
            # the gather copies before the write: overlap is safe
            self.k[layer][:n, :, :filled] = self.k[layer][rows, :, :filled]
            self.v[layer][:n, :, :filled] = self.v[layer][rows, :, :filled]
        self.key_start[:n] = self.key_start[rows]
        self.rows = n

    def check_room(self, slots_needed: int) -> None:
        if slots_needed > self.max_len:
            raise CacheFullError(f"KV cache holds {self.max_len} slots; {slots_needed} requested")
