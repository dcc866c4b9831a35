"""EVA2-CLIP vision encoder and the conv + GLU projector into the decoder's width (docs/architecture.md)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from glm4v_core.config import GLM4VConfig, VisionConfig
from glm4v_core.model import ops


class PatchEmbedding(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls = nn.Parameter(torch.empty(1, cfg.hidden_size))
        # one learned row per token (cls + grid^2); the image size is fixed, so no interpolation
        positions = torch.empty(cfg.num_positions, cfg.hidden_size)
        self.pos = nn.Embedding(cfg.num_positions, cfg.hidden_size, _weight=positions)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = rearrange(self.proj(pixels), "b hv gh gw -> b (gh gw) hv")  # patches in row-major grid order
        cls = self.cls.expand(x.shape[0], 1, -1)  # (B, 1, Hv)
        return torch.cat((cls, x), dim=1) + self.pos.weight  # (B, 1 + grid^2, Hv)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.head_dim = cfg.hidden_size // cfg.num_heads  # the head count comes from the tensor (a rank's own)
        self.qkv = ops.Linear(cfg.hidden_size, 3 * cfg.hidden_size, parts=(cfg.hidden_size,) * 3)  # fused q | k | v
        self.out = ops.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b l (three nh hd) -> three b nh l hd", three=3, hd=self.head_dim)
        out = ops.attention(q, k, v, causal=False)  # bidirectional
        return self.out(rearrange(out, "b nh l hd -> b l (nh hd)"))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = ops.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = ops.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class VisionBlock(nn.Module):
    """Post-branch norm: the LayerNorm is applied to each branch's output, not its input."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.attn = VisionAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attn_norm(self.attn(x))
        return h + self.mlp_norm(self.mlp(h))


class VisionEncoder(nn.Module):
    """Pixels (B, 3, S, S) -> ViT tokens (B, 1 + grid^2, Hv), cls first."""

    checkpoint_layers = False  # GLM4V.gradient_checkpointing: recompute blocks in backward

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch = PatchEmbedding(cfg)
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixels)
        for layer in self.layers:
            if self.checkpoint_layers and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x


class GLU(nn.Module):
    def __init__(self, cfg: GLM4VConfig):
        super().__init__()
        H, ffn = cfg.hidden_size, cfg.ffn_hidden_size
        self.proj = ops.Linear(H, H, bias=False)
        self.norm = nn.LayerNorm(H)  # default eps 1e-5, not the ViT's 1e-6
        self.gate = ops.Linear(H, ffn, bias=False)
        self.up = ops.Linear(H, ffn, bias=False)
        self.down = ops.Linear(ffn, H, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm(self.proj(x)))
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Projector(nn.Module):
    """ViT tokens -> image embeddings (B, 2 + (grid/2)^2, H): drop cls, 2x2 stride-2 conv on the
    patch grid, GLU, then boi/eoi rows around it, everything divided by scaling_factor."""

    def __init__(self, cfg: GLM4VConfig):
        super().__init__()
        self.conv = nn.Conv2d(cfg.vision.hidden_size, cfg.hidden_size, kernel_size=2, stride=2)
        self.glu = GLU(cfg)
        self.boi = nn.Parameter(torch.empty(1, 1, cfg.hidden_size))
        self.eoi = nn.Parameter(torch.empty(1, 1, cfg.hidden_size))
        self.scaling_factor = cfg.vision.scaling_factor

    def downsample(self, vit_out: torch.Tensor) -> torch.Tensor:
        """(B, 1 + g*g, Hv) -> conv output (B, H, g/2, g/2)."""
        g = int((vit_out.shape[1] - 1) ** 0.5)  # the grid side: the patches after the cls token are g x g
        return self.conv(rearrange(vit_out[:, 1:], "b (gh gw) hv -> b hv gh gw", gh=g))

    def forward(self, vit_out: torch.Tensor) -> torch.Tensor:
        x = self.glu(rearrange(self.downsample(vit_out), "b h gh gw -> b (gh gw) h"))  # (B, (g/2)^2, H)
        B = x.shape[0]
        s = self.scaling_factor
        # divided before the cat (the same numbers): at batch 1 the expand is a no-op, and boi/eoi
        # would get views of the cat's gradient as theirs, strides (T*H, H, 1), which DDP warns about
        return torch.cat(((self.boi / s).expand(B, 1, -1), x / s, (self.eoi / s).expand(B, 1, -1)), dim=1)
