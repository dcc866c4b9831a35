"""benchmarks/kernels.py --smoke runs end to end (on CPU through the Triton interpreter) and
writes the JSON it prints as its last line."""
from __future__ import annotations

import json
import subprocess
import sys

from helpers.paths import BENCHMARKS

SCRIPT = BENCHMARKS / "kernels.py"


def test_kernel_benchmark_smoke_run(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    record = json.loads(lines[-1])
    assert lines[0].startswith("device: ") and "| provider" in lines[1]

    written = list(tmp_path.glob("kernels_*_*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text()) == record
    assert record["smoke"] is True and record["commit"] and record["date"] and "--smoke" in record["command"]
    assert {"name", "tflops", "gbps"} <= set(record["device"])

    ours = [r for r in record["results"] if r["provider"] in ("triton", "triton_add_norm", "triton bwd",
                                                              "triton key_end")]
    kinds = {(r["shape"].split(" B")[0], r["provider"]) for r in ours}
    assert kinds == {("vit", "triton"), ("prefill", "triton"), ("decode", "triton"), ("vit", "triton bwd"),
                     ("prefill", "triton bwd"), ("decode static", "triton"), ("decode static", "triton key_end"),
                     ("rmsnorm rows5 N97", "triton"), ("rmsnorm rows3 N256", "triton"),
                     ("rmsnorm rows5 N97", "triton_add_norm"), ("rmsnorm rows3 N256", "triton_add_norm")}, kinds
    for r in ours:  # backward: 2.5x the forward's FLOPs
        if r["provider"] == "triton bwd":
            fwd = next(f for f in ours if f["shape"] == r["shape"] and f["provider"] == "triton")
            assert r["flops"] == int(2.5 * fwd["flops"]), (r, fwd)
    for r in ours:
        assert "error" not in r, r
        assert r["ms"] > 0 and r["value"] > 0 and r["pct_of_peak"] > 0, r
        assert r["bytes"] > 0 and r["roofline_ms"] * 1e-3 >= r["bytes"] / (record["device"]["gbps"] * 1e9), r
        assert abs(r["pct_of_roofline"] - 100 * r["roofline_ms"] / r["ms"]) < 1e-6, r
    swept = [r for r in record["results"] if r["provider"].startswith("triton ")
             and r["provider"] not in ("triton bwd", "triton key_end")]
    assert {r["provider"] for r in swept} == {"triton 128,128,8,2", "triton 128,128,8,3", "triton 128,32,8,3",
                                             "triton 64,64,4,3", "triton splits=8", "triton splits=32",
                                             "triton splits=64"}, swept
    for r in swept:
        assert "error" not in r and r["max_abs_err_vs_ref"] < 0.05, r
    for r in ours:
        if "max_abs_err_vs_ref" in r:  # bf16 outputs: within a couple of bf16 ulps of the reference
            assert r["max_abs_err_vs_ref"] < 0.05, r
