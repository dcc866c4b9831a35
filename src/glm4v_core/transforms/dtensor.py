"""DTensor helpers that are cheap to import: they recognise a DTensor by its methods, so this module
never imports torch.distributed.tensor (seconds; see glm4v_core.transforms)."""
from __future__ import annotations

import torch


def whole(t: torch.Tensor | None) -> torch.Tensor | None:
    """The whole tensor of a DTensor shard (FSDP2 leaves each rank one; gathering is an all-gather,
    a collective every rank must call), else `t` itself (None included: a missing gradient)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
