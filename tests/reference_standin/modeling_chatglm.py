"""Stand-in for the GLM-4V checkpoint's `modeling_chatglm.py` (test plumbing only).

What it mirrors from the real remote code, so `glm4v make-reference` is exercised the way it runs
on the real checkpoint: loaded through `auto_map` with `trust_remote_code`; the module tree
`transformer.embedding.word_embeddings`, `transformer.rotary_pos_emb` (returns the whole rotary
table, which the model then indexes with the position ids), `transformer.encoder.layers.N`
(returning `(hidden, kv_cache)`), `transformer.encoder.final_layernorm`, `transformer.output_layer`,
`transformer.vision`; the forward signature (`images=`, `position_ids`, `past_key_values` as
per-layer `(k, v)` tuples, `use_cache`, `output_hidden_states`, `return_dict`,
`return_last_logit`); the image splice (the 3 placeholder tokens replaced by the image rows, every
patch row taking the placeholder's position). Without a `vision_config` in config.json (a text-only
GLM-4, glm-4-9b-chat) it builds no `transformer.vision` and, as glm-4-9b-chat's forward has no
`images` argument, a call that passes `images=` at all is a TypeError: make-reference must leave it out.

What it does not mirror: the math is glm4v_core's own (its RMSNorm, rotary and attention ops), and
left padding is not supported. It tests the plumbing (hooks, recording, file format, the round
trip to `glm4v parity`); the numerics are tested against the fixtures made by the real code.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from glm4v_core.model import ops
from glm4v_core.model.decoder import apply_rotary

from .configuration_chatglm import ChatGLMConfig
from .visual import EVA2CLIPModel

NOT_GIVEN = object()  # `images` left out of the call (a text-only checkpoint's forward has no such argument)


def take_images(config, images):
    """The images of a call, or None; passing `images=` to a text-only model is refused as glm-4-9b-chat would."""
    if not config.vision_config:
        if images is not NOT_GIVEN:
            raise TypeError("forward() got an unexpected keyword argument 'images' (a text-only GLM-4 has no vision)")
        return None
    return None if images is NOT_GIVEN else images


class RotaryEmbedding(nn.Module):
    """forward(seq_len) -> the table (seq_len, dim/2, 2) of (cos, sin), rounded to bf16 in bf16."""

    def __init__(self, dim, rope_ratio=1, dtype=None):
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).to(dtype=dtype) / dim))
        self.register_buffer("inv_freq", inv_freq)  # saved in the checkpoint, never read for values
        self.dim, self.rope_ratio = dim, rope_ratio

    def forward(self, seq_len):
        base = 10000 * self.rope_ratio
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float, device=self.inv_freq.device) / self.dim
        theta = 1.0 / (base ** exponents)
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float, device=theta.device), theta)
        table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
        if self.inv_freq.dtype in (torch.bfloat16, torch.float16):
            table = table.to(self.inv_freq.dtype)
        return table


class RMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.eps)


class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.nh, self.nkv, self.hd = config.num_attention_heads, config.multi_query_group_num, config.kv_channels
        self.query_key_value = nn.Linear(config.hidden_size, (self.nh + 2 * self.nkv) * self.hd, bias=True)
        self.dense = nn.Linear(self.nh * self.hd, config.hidden_size, bias=False)

    def forward(self, x, rotary_pos_emb, kv_cache=None, use_cache=True):
        B, T, _ = x.shape
        q, k, v = self.query_key_value(x).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        q, k, v = (t.view(B, T, -1, self.hd).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
        cos = rotary_pos_emb[..., 0][:, None, ..., None]  # (B, 1, T, rot/2, 1)
        sin = rotary_pos_emb[..., 1]
        sin = torch.stack((-sin, sin), dim=-1)[:, None]  # (B, 1, T, rot/2, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = torch.cat((kv_cache[0], k), dim=2), torch.cat((kv_cache[1], v), dim=2)
        out = ops.attention(q, k, v, causal=True)  # causal aligned bottom-right: decode sees every key
        return self.dense(out.transpose(1, 2).reshape(B, T, -1)), ((k, v) if use_cache else None)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False)

    def forward(self, x):
        a, b = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(a) * b)


class GLMBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = SelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, hidden_states, attention_mask, rotary_pos_emb, kv_cache=None, use_cache=True):
        attn, kv_cache = self.self_attention(self.input_layernorm(hidden_states), rotary_pos_emb, kv_cache, use_cache)
        h = hidden_states + attn
        return h + self.mlp(self.post_attention_layernorm(h)), kv_cache


class GLMTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config) for _ in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)

    def forward(self, hidden_states, attention_mask, rotary_pos_emb, kv_caches=None, use_cache=True,
                output_hidden_states=False):
        kv_caches = kv_caches or [None] * len(self.layers)
        presents = () if use_cache else None
        all_hidden = () if output_hidden_states else None
        for layer, cache in zip(self.layers, kv_caches, strict=False):
            if output_hidden_states:
                all_hidden += (hidden_states,)
            hidden_states, cache = layer(hidden_states, attention_mask, rotary_pos_emb, kv_cache=cache,
                                         use_cache=use_cache)
            if use_cache:
                presents += (cache,)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        return self.final_layernorm(hidden_states), presents, all_hidden, None


class Embedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids):
        return self.word_embeddings(input_ids)


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["GLMBlock"]
    _supports_sdpa = True  # as the real class declares (config.json asks for "sdpa"; transformers 5 checks it)

    def _init_weights(self, module):
        return  # every weight comes from the checkpoint

    def get_position_ids(self, input_ids, device):
        return torch.arange(input_ids.shape[1], dtype=torch.long, device=device)[None].repeat(input_ids.shape[0], 1)


class ChatGLMModel(ChatGLMPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embedding = Embedding(config)
        self.seq_length = config.seq_length
        self.rotary_pos_emb = RotaryEmbedding(config.kv_channels // 2, rope_ratio=config.rope_ratio,
                                              dtype=config.torch_dtype)
        self.encoder = GLMTransformer(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.vision = EVA2CLIPModel(config) if config.vision_config else None  # glm-4-9b-chat: no tower
        self.post_init()  # the transformers convention (transformers 5 relies on it)

    def forward(self, input_ids=None, images=NOT_GIVEN, position_ids=None, attention_mask=None,
                full_attention_mask=None, past_key_values=None, inputs_embeds=None, use_cache=None,
                output_hidden_states=None, return_dict=None):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise NotImplementedError("the stand-in reference does not support padding")
        images = take_images(self.config, images)
        inputs_embeds = self.embedding(input_ids)
        if position_ids is None:
            position_ids = self.get_position_ids(input_ids, device=input_ids.device)
        if past_key_values is None and images is not None:
            vc = self.config.vision_config
            num_patches = (vc["image_size"] // vc["patch_size"] // 2) ** 2
            features = self.vision(images.to(dtype=inputs_embeds.dtype))
            embeds, positions = [], []
            for i, ids in enumerate(input_ids.tolist()):
                boi, eoi = ids.index(self.config.boi_token_id), ids.index(self.config.eoi_token_id)
                embeds.append(torch.cat((inputs_embeds[i, :boi], features[i], inputs_embeds[i, eoi + 1:])))
                positions.append(torch.cat((position_ids[i, :boi + 1],
                                            position_ids[i, boi + 1].repeat(num_patches),
                                            position_ids[i, eoi:])))
            inputs_embeds, position_ids = torch.stack(embeds), torch.stack(positions)
        rotary_pos_emb = self.rotary_pos_emb(self.seq_length)[position_ids]  # (B, T, rot/2, 2)
        hidden, presents, all_hidden, _ = self.encoder(
            inputs_embeds, full_attention_mask, rotary_pos_emb=rotary_pos_emb, kv_caches=past_key_values,
            use_cache=use_cache, output_hidden_states=output_hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=presents, hidden_states=all_hidden)


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.post_init()

    def forward(self, input_ids=None, images=NOT_GIVEN, position_ids=None, attention_mask=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                output_attentions=None, output_hidden_states=None, return_dict=None,
                return_last_logit: bool | None = False):
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        images = take_images(self.config, images)
        out = self.transformer(input_ids=input_ids, **({} if images is None else {"images": images}),
                               position_ids=position_ids,
                               attention_mask=attention_mask, past_key_values=past_key_values,
                               use_cache=use_cache, output_hidden_states=output_hidden_states)
        hidden = out[0][:, -1:] if return_last_logit else out[0]
        logits = self.transformer.output_layer(hidden)
        return CausalLMOutputWithPast(logits=logits, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states)
