"""Random initialization of every GLM-4V parameter (GLM4V.from_config), by one documented scheme.

- Linear and Conv2d weights: normal, mean 0, std 1/sqrt(fan_in) (fan_in = input features, times
  the kernel area for a conv), so each layer keeps unit-scale activations; biases: 0.
- RMSNorm and LayerNorm: weight 1, bias 0 (the identity scale).
- Learned token vectors (word embeddings, the ViT's cls and position rows, boi/eoi): normal,
  mean 0, std 1, the scale the matrices' outputs have.

Parameters are drawn in module order from one generator seeded with `seed`, so the same seed
gives the same model on the same device. A parameter that no rule covers (a module added by a
fork) raises instead of keeping uninitialized memory.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from glm4v_core.errors import GLM4VError
from glm4v_core.model.decoder import RMSNorm
from glm4v_core.model.vision import PatchEmbedding, Projector


class InitError(GLM4VError):
    """A parameter that no initialization rule covers."""


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int) -> None:
    """Fill every parameter of `model` in place by the scheme above."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    done: set[int] = set()

    def normal(p: torch.Tensor, std: float) -> None:
        p.normal_(0.0, std, generator=gen)
        done.add(id(p))

    def const(p: torch.Tensor | None, value: float) -> None:
        if p is not None:
            p.fill_(value)
            done.add(id(p))

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fan_in = module.weight[0].numel()  # in_features, or in_channels * kernel area
            normal(module.weight, 1.0 / math.sqrt(fan_in))
            const(module.bias, 0.0)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            const(module.weight, 1.0)
            const(getattr(module, "bias", None), 0.0)
        elif isinstance(module, nn.Embedding):
            normal(module.weight, 1.0)
        elif isinstance(module, PatchEmbedding):
            normal(module.cls, 1.0)
        elif isinstance(module, Projector):
            normal(module.boi, 1.0)
            normal(module.eoi, 1.0)
    missed = [name for name, p in model.named_parameters() if id(p) not in done]
    if missed:
        raise InitError(f"no initialization rule for parameter(s) {missed[:5]}: add one in glm4v_core.model.init")
