"""Stand-in for the GLM-4V checkpoint's `configuration_chatglm.py` (test plumbing only).

A transformers config class found through `auto_map` in config.json, as the real checkpoint's
is. It keeps every key of config.json as an attribute (transformers does that for unknown keys).
A config.json without vision_config (a text-only GLM-4) gets an empty one: the model then builds no
vision tower (test plumbing for make-reference on a text checkpoint).
"""
from transformers import PretrainedConfig


class ChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"

    def __init__(self, num_layers=2, padded_vocab_size=1024, hidden_size=128, ffn_hidden_size=256,
                 kv_channels=32, num_attention_heads=4, multi_query_group_num=2, seq_length=2048,
                 layernorm_epsilon=1.5625e-07, rope_ratio=1, vision_config=None, boi_token_id=None,
                 eoi_token_id=None, **kwargs):
        self.num_layers = num_layers
        self.padded_vocab_size = padded_vocab_size
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.kv_channels = kv_channels
        self.num_attention_heads = num_attention_heads
        self.multi_query_group_num = multi_query_group_num
        self.seq_length = seq_length
        self.layernorm_epsilon = layernorm_epsilon
        self.rope_ratio = rope_ratio
        self.vision_config = vision_config or {}
        self.boi_token_id = boi_token_id
        self.eoi_token_id = eoi_token_id
        super().__init__(**kwargs)
