"""glm4v_kernels: Triton kernels (fused RMSNorm, flash attention) and their torch references.

Depends on torch and triton only. Every kernel has a `*_ref` beside it: the spec and the fallback.
"""
from .reference import add_rms_norm_ref, attention_ref, rms_norm_ref

__all__ = ["rms_norm_ref", "add_rms_norm_ref", "attention_ref"]
