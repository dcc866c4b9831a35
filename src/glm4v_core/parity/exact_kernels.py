"""The exact-kernel switch: parity and make-reference run with TF32 off and without reduced-precision
reductions, so both sides compute the same products.
"""
from __future__ import annotations

import contextlib
import warnings

import torch


@contextlib.contextmanager
def reference_kernels(dtype: torch.dtype):
    """Use kernels as exact as the ones the fixtures were made with.

    fp32: no TF32 anywhere. On CUDA, cuDNN convolutions (the ViT patch embedding, the projector)
    default to TF32: rounding their inputs to TF32 (emulated on CPU) puts the patch embedding about
    1.4x over its fp32 tolerance. Matmuls may have been switched to TF32 by the caller. Both are
    turned off for the run, and restored after it.
    bf16: oneDNN's bf16 GEMMs (taken on AVX512-BF16/AMX CPUs) round differently from ATen's own
    bf16 kernels, which produced the fixtures; with oneDNN off our bf16 prompt logits equal the
    reference's bit for bit. The fixtures' decode steps also used ATen's AVX2 kernels: only with
    ATEN_CPU_CAPABILITY=avx2 (set before torch starts) do the narrow fixture's bf16 greedy tokens
    follow the reference through a 0.0046-margin near-tie (see greedy_stage)."""
    if dtype == torch.bfloat16:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about TF32 on Intel GPUs when flags change
            with torch.backends.mkldnn.flags(enabled=False):
                yield
        return
    settings = tf32_settings()
    saved = [getattr(owner, name) for owner, name, _ in settings]
    try:
        for owner, name, exact in settings:
            setattr(owner, name, exact)
        yield
    finally:
        for (owner, name, _), value in zip(settings, saved, strict=True):
            setattr(owner, name, value)


def tf32_settings() -> list[tuple[object, str, object]]:
    """(owner, attribute, exact value) of the TF32 switches of cuDNN convolutions and CUDA matmuls.

    The per-op `fp32_precision` API where torch has it (2.9+): once a caller uses it, reading the
    legacy `allow_tf32` flags raises."""
    if hasattr(torch.backends.cudnn, "conv"):
        return [(torch.backends.cudnn.conv, "fp32_precision", "ieee"),
                (torch.backends.cuda.matmul, "fp32_precision", "ieee")]
    return [(torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False)]


