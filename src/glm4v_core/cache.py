"""Static KV cache: allocated once for (batch, max_len), written in place, never reallocated.

Cache slots are not rotary positions: an image's 1600 patch rows fill 1600 slots but share
one position id. `length` counts filled slots; the positions live with the caller as tensors.
Rows that finish early can be dropped (`keep_rows`): the live rows move to the front of the same
buffers and later steps read and write only those.
"""
from __future__ import annotations

import torch


class CacheFullError(ValueError):
    """More tokens than the cache was sized for."""


class KVCache:
    def __init__(self, num_layers: int, batch: int, num_kv: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_layers, batch, num_kv, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # rotated keys per KV group
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.rows = batch  # live rows, at the front of the buffers
        self.length = 0  # slots filled so far (same for every row: rows are left-padded)
        self.key_start: torch.Tensor | None = None  # (B,) first valid slot per row, set at prefill

    @property
    def batch(self) -> int:
        return self.rows

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hd) after the filled slots; return views of all filled slots."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise CacheFullError(f"KV cache holds {self.max_len} slots; {self.length} used, {k.shape[2]} more requested")
        self.k[layer, :self.rows, :, self.length:end] = k
        self.v[layer, :self.rows, :, self.length:end] = v
        return self.k[layer, :self.rows, :, :end], self.v[layer, :self.rows, :, :end]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices among the live rows, in order), moved to the front, so rows
        that finished stop costing compute. Copies the filled slots once; nothing is reallocated."""
        n, end = rows.numel(), self.length
        for layer in range(self.k.shape[0]):  # a layer at a time keeps the gather's temporary small
            # the gather copies before the write: overlap is safe
            self.k[layer, :n, :, :end] = self.k[layer, rows, :, :end]
            self.v[layer, :n, :, :end] = self.v[layer, rows, :, :end]
        self.rows = n
        if self.key_start is not None:
            self.key_start = self.key_start[rows]

    def advance(self, n: int) -> None:
        """Called once per forward, after every layer wrote its n new slots."""
        self.length += n
