"""The GPU code path of every Triton kernel compiles for sm_90 on a machine without a GPU, and
ptxas's output has the properties the block configs were chosen for (benchmarks/kernel_resources.py:
no register spills, shared memory within the limit, pipelined K/V loads, wgmma, 16-byte loads).

The interpreter tests run the kernels' INTERPRETED branches; this lowers the other branch all the
way to a cubin with the ptxas that ships with triton, at the configs the launchers pick."""
import os
import subprocess
import sys

import pytest
from helpers.paths import BENCHMARKS

SCRIPT = BENCHMARKS / "kernel_resources.py"


def test_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    if run.returncode and "ImportError" in run.stderr and "triton" in run.stderr:
        pytest.skip(f"this triton has no ahead-of-time compile API: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("31 kernels compiled for sm_90") and last.endswith("no problems"), run.stdout


def test_resource_checks_catch_a_spilling_config():
    """The checker itself can fail: a 64-row fp32 tile with 4 warps spills, and it says so."""
    code = ("import dataclasses, torch, kernel_resources as KR\n"
            "c = KR.prefill_case(torch.float32, 128, True, False)\n"
            "c = dataclasses.replace(c, constexprs={**c.constexprs, 'BLOCK_M': 64}, num_warps=4)\n"
            "print(KR.inspect(c, 90)['problems'])\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPT.parent), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if run.returncode and "ImportError" in run.stderr and "triton" in run.stderr:
        pytest.skip("this triton has no ahead-of-time compile API")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "register spills" in run.stdout, run.stdout
