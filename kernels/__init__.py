"""The folder kernels/ is imported as `glm4v_kernels` (pyproject.toml maps it).

glm4v_kernels: Triton kernels (fused RMSNorm, flash attention forward and backward, weight-only
quantized matmul) and their torch references.

Depends on torch and triton only. Every kernel has a `*_ref` beside it: the spec and the fallback.
The kernels run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (set before import).
The public functions are torch custom ops (namespace glm4v_kernels) with autograd: torch.compile
traces them without a graph break, and a CUDA graph can capture them.
"""
from .quant_matmul import (
    dequantize_int4_ref,
    dequantize_int8_ref,
    int4_matmul,
    int4_matmul_ref,
    int8_matmul,
    int8_matmul_ref,
)
from .reference import add_rms_norm_ref, attention_ref, rms_norm_ref
from .torch_ops import add_rms_norm, attention, rms_norm

__all__ = ["rms_norm_ref", "add_rms_norm_ref", "attention_ref", "rms_norm", "add_rms_norm", "attention",
           "int8_matmul", "int8_matmul_ref", "int4_matmul", "int4_matmul_ref", "dequantize_int8_ref",
           "dequantize_int4_ref"]
