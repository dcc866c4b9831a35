"""Triton weight-only quantized matmul (GEMV for decode rows, tiled GEMM for prefill) vs the torch references.

On CPU these run under TRITON_INTERPRET=1 on small, awkward shapes (N not a multiple of the block,
M on both sides of the GEMV/GEMM switch); real shapes are behind @pytest.mark.gpu.
Tolerance: 2x the error of the torch reference run in the same dtype vs an fp32 reference, + atol.
"""
from __future__ import annotations

import pytest
import torch
from helpers.paths import BENCHMARKS
from helpers.triton_env import DEVICE, needs_triton

import glm4v_kernels as K
from glm4v_conversion.quantize import quantize_int4, quantize_int8

pytestmark = needs_triton
ATOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _weights(N, K_, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K_, generator=g) / K_ ** 0.5


def _x(M, K_, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K_, generator=g).to(device=DEVICE, dtype=dtype)


def _check(out, x, ref_fn):
    ref32 = ref_fn(x.float())
    ref_lp = ref_fn(x)
    err = (out.float() - ref32).abs().max().item()
    budget = 2 * (ref_lp.float() - ref32).abs().max().item() + ATOL[x.dtype]
    assert out.shape == ref32.shape and out.dtype == x.dtype
    assert err <= budget, f"max diff {err:.3e} > budget {budget:.3e}"


@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("N,K_", [(97, 128), (64, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_matmul_matches_reference(M, N, K_, dtype):
    q, scale = (t.to(DEVICE) for t in quantize_int8(_weights(N, K_)))
    x = _x(M, K_, dtype)
    _check(K.int8_matmul(x, q, scale), x, lambda x: K.int8_matmul_ref(x, q, scale))


@pytest.mark.parametrize("M", [1, 5, 33])
@pytest.mark.parametrize("N,K_,G", [(97, 128, 32), (48, 192, 64), (32, 256, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_matmul_matches_reference(M, N, K_, G, dtype):
    packed, scale, zero = (t.to(DEVICE) for t in quantize_int4(_weights(N, K_), G))
    x = _x(M, K_, dtype)
    _check(K.int4_matmul(x, packed, scale, zero, G), x, lambda x: K.int4_matmul_ref(x, packed, scale, zero, G))


def test_int4_reference_dequantizes_the_documented_nibble_order():
    """byte = code[2i] | code[2i+1] << 4; W = code * scale + zero per group."""
    packed = torch.tensor([[0x21, 0xF0]], dtype=torch.uint8)  # codes 1, 2, 0, 15
    scale = torch.tensor([[2.0]], dtype=torch.bfloat16)
    zero = torch.tensor([[-1.0]], dtype=torch.bfloat16)
    w = K.dequantize_int4_ref(packed, scale, zero, 4, torch.float32)
    assert w.tolist() == [[1.0, 3.0, -1.0, 29.0]]


def test_bad_shapes_are_named():
    q, scale = quantize_int8(_weights(16, 32))
    with pytest.raises(ValueError, match="int8_matmul"):
        K.int8_matmul(torch.randn(2, 31, device=DEVICE), q.to(DEVICE), scale.to(DEVICE))
    packed, s, z = quantize_int4(_weights(16, 64), 32)
    with pytest.raises(ValueError, match="int4_matmul"):
        K.int4_matmul(torch.randn(2, 64, device=DEVICE), packed.to(DEVICE), s.to(DEVICE), z.to(DEVICE), 64)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4, 1602])
@pytest.mark.parametrize("N,K_", [(4608, 4096), (4096, 13696), (27392, 4096)])
def test_real_shapes_on_gpu(M, N, K_):
    if DEVICE != "cuda":
        pytest.skip("real shapes need a GPU")
    w = _weights(N, K_).cuda()  # quantized on the GPU: seconds, not minutes
    x = _x(M, K_, torch.bfloat16)
    q, scale = quantize_int8(w)
    _check(K.int8_matmul(x, q, scale), x, lambda x: K.int8_matmul_ref(x, q, scale))
    packed, s, z = quantize_int4(w, 128)
    _check(K.int4_matmul(x, packed, s, z, 128), x, lambda x: K.int4_matmul_ref(x, packed, s, z, 128))


AOT_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import kernel_resources as KR
from glm4v_kernels import quant_matmul as Q
bad = []
for dtype, dt in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
    for int4 in (False, True):
        for gemv, fn in ((True, Q._gemv_kernel), (False, Q._gemm_kernel)):
            blocks, warps, stages = Q.launch_config(gemv, dtype, int4)
            types = {"x_ptr": f"*{dt}", "w_ptr": "*u8" if int4 else "*i8", "y_ptr": f"*{dt}",
                     "scale_ptr": "*bf16" if int4 else "*fp32", "zero_ptr": "*bf16" if int4 else "*fp32"}
            expect = {"tensor_cores"} if not gemv and dtype == torch.bfloat16 else set()
            case = KR.Case(f"{'gemv' if gemv else 'gemm'} {dt} {'int4' if int4 else 'int8'}", fn, types,
                           dict(GROUP=128 if int4 else 1, IS_INT4=int4, **blocks), warps, stages, expect)
            row = KR.inspect(case, 90)
            print(row["kernel"], row["registers"], row["problems"])
            bad += row["problems"]
print("problems:", bad)
"""


def test_gpu_configs_compile_for_sm90_without_spills():
    """The launchers' configs lowered to sm_90 cubins with the ptxas triton ships: no register spills,
    wgmma for the bf16 GEMM (runs on a machine without a GPU)."""
    import os
    import subprocess
    import sys
    bench = BENCHMARKS
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", AOT_SCRIPT, str(bench)], capture_output=True, text=True, env=env,
                         timeout=600)
    if run.returncode and "ImportError" in run.stderr and "triton" in run.stderr:
        pytest.skip("this triton has no ahead-of-time compile API")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("problems: []"), run.stdout
