"""Where the Triton kernels can run in this test session: CUDA, or the CPU interpreter."""
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels need CUDA, or TRITON_INTERPRET=1 (set before pytest starts) on CPU")
