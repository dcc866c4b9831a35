"""Stand-in for the GLM-4V checkpoint's `visual.py`: the EVA2-CLIP tower with the real module names.

Module tree as in the real code (so hooks on `transformer.vision.*` find the same modules and the
checkpoint's tensor names load): patch_embedding (proj, cls_embedding, position_embedding),
transformer.layers.N (input_layernorm, attention.query_key_value/dense, mlp.fc1/fc2,
post_attention_layernorm), conv, linear_proj (linear_proj, norm1, gate_proj, dense_h_to_4h,
dense_4h_to_h), boi, eoi. The math reuses glm4v_core (its attention op); this file tests the
plumbing of `glm4v make-reference`, not the numerics (the HF-made fixtures do that).
"""
import torch
import torch.nn.functional as F
from torch import nn

from glm4v_core.model import ops


class PatchEmbedding(nn.Module):
    def __init__(self, vc):
        super().__init__()
        self.proj = nn.Conv2d(vc["in_channels"], vc["hidden_size"], kernel_size=vc["patch_size"],
                              stride=vc["patch_size"])
        self.cls_embedding = nn.Parameter(torch.zeros(1, vc["hidden_size"]))
        self.position_embedding = nn.Embedding(vc["num_positions"], vc["hidden_size"])

    def forward(self, images):
        x = self.proj(images).flatten(2).transpose(1, 2)  # (B, g*g, Hv)
        x = torch.cat((self.cls_embedding.expand(x.shape[0], -1, -1), x), dim=1)
        return x + self.position_embedding.weight[None]


class Attention(nn.Module):
    def __init__(self, vc):
        super().__init__()
        self.num_heads = vc["num_heads"]
        self.query_key_value = nn.Linear(vc["hidden_size"], 3 * vc["hidden_size"])
        self.dense = nn.Linear(vc["hidden_size"], vc["hidden_size"])

    def forward(self, x):
        B, L, H = x.shape
        qkv = self.query_key_value(x).view(B, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, nh, L, hd)
        out = ops.attention(qkv[0], qkv[1], qkv[2], causal=False)
        return self.dense(out.transpose(1, 2).reshape(B, L, H))


class MLP(nn.Module):
    def __init__(self, vc):
        super().__init__()
        self.fc1 = nn.Linear(vc["hidden_size"], vc["intermediate_size"])
        self.fc2 = nn.Linear(vc["intermediate_size"], vc["hidden_size"])

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerLayer(nn.Module):
    def __init__(self, vc):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(vc["hidden_size"], eps=vc["layer_norm_eps"])
        self.attention = Attention(vc)
        self.mlp = MLP(vc)
        self.post_attention_layernorm = nn.LayerNorm(vc["hidden_size"], eps=vc["layer_norm_eps"])

    def forward(self, x):
        h = x + self.input_layernorm(self.attention(x))  # post-branch norm, as in EVA2-CLIP
        return h + self.post_attention_layernorm(self.mlp(h))


class Transformer(nn.Module):
    def __init__(self, vc):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(vc) for _ in range(vc["num_hidden_layers"]))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class GLU(nn.Module):
    def __init__(self, config):
        super().__init__()
        H, ffn = config.hidden_size, config.ffn_hidden_size
        self.linear_proj = nn.Linear(H, H, bias=False)
        self.norm1 = nn.LayerNorm(H)
        self.gate_proj = nn.Linear(H, ffn, bias=False)
        self.dense_h_to_4h = nn.Linear(H, ffn, bias=False)
        self.dense_4h_to_h = nn.Linear(ffn, H, bias=False)

    def forward(self, x):
        x = F.gelu(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class EVA2CLIPModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        vc = config.vision_config
        self.patch_embedding = PatchEmbedding(vc)
        self.transformer = Transformer(vc)
        self.linear_proj = GLU(config)
        self.conv = nn.Conv2d(vc["hidden_size"], config.hidden_size, kernel_size=2, stride=2)
        self.boi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.scaling_factor = vc["scaling_factor"]

    def forward(self, images):
        x = self.transformer(self.patch_embedding(images))[:, 1:]  # drop cls
        b, s, h = x.shape
        g = int(s ** 0.5)
        x = self.conv(x.contiguous().view(b, g, g, h).permute(0, 3, 1, 2))  # (B, H, g/2, g/2)
        x = self.linear_proj(x.flatten(2).transpose(1, 2))
        x = torch.cat((self.boi.expand(b, -1, -1), x, self.eoi.expand(b, -1, -1)), dim=1)
        return x / self.scaling_factor
