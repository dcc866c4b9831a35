"""The model: GLM-4V-9B as a torch module, and nothing else.

    glm4v.py     GLM4V: prefill / decode_step / training forward, the input checks, Prompt
    vision.py    EVA2-CLIP ViT (patch embedding, blocks) and the conv-downsample GLU projector
    decoder.py   the GLM-4 decoder: RMSNorm, rotary attention with GQA, SwiGLU MLP, the LM head
    splice.py    image blocks spliced into the token sequence, their positions
    cache.py     the preallocated KV cache
    loss.py      chunked cross-entropy that never materializes the full logits
    init.py      parameter initialization for a model built from a config
    ops.py       the one door to the kernels: Linear (with its fused parts), RMSNorm, attention

Imports only model/, glm4v_core.config, glm4v_core.errors and (through ops.py) glm4v_kernels.
"""
