"""Kernel microbenchmarks: the Triton RMSNorm and flash attention vs torch, at GLM-4V-9B shapes.

    python benchmarks/kernels.py              # on a GPU: real shapes, timed by triton.testing.do_bench
    python benchmarks/kernels.py --smoke      # tiny shapes; forced without CUDA (Triton interpreter)
    python benchmarks/kernels.py --out DIR    # where the JSON copy goes (default benchmarks/results)
    python benchmarks/kernels.py --only attention   # or rmsnorm: one family (a shorter GPU run)

Work per call (elt = bytes per element; all inputs bf16 on a GPU):
    attention FLOPs = 4 * B * Hq * Lq * Lk * D       (QK^T and PV: 2 FLOPs per multiply-add),
                      halved when causal with Lq == Lk (half the score matrix is skipped)
    backward FLOPs  = 2.5 x the forward's             (QK^T recomputed, dV = P^T dO, dP = dO V^T,
                      dQ = dS K, dK = dS^T Q: 5 matmuls to the forward's 2)
    attention bytes = 2 * B * Hkv * Lk * D * elt     (K and V read once, shared by a KV group)
                    + 2 * B * Hq * Lq * D * elt      (q read, out written)
    rmsnorm bytes   = 2 * rows * N * elt + N * elt   (x read, y written, weight read);
                      fused add + norm: 4 * rows * N * elt + N * elt (x, residual read; y, s written)
Each row reports TFLOP/s (prefill, ViT) or GB/s (decode, RMSNorm) and its % of that peak, and the
roofline floor max(FLOPs / peak FLOP/s, bytes / peak bandwidth) with its % (floor / time: 100% is
as fast as the device's datasheet peaks allow). Decode at batch 1 moves only a few MB (8.4 MB at
Lk 8k: 2.5 us at 3.35 TB/s), so kernel launch latency, not bandwidth, bounds it there.
Backward rows ("... bwd") time the gradients of q, k, v given dO, the forward run once outside
the timing (torch.autograd.grad with retain_graph), against SDPA flash's backward; their error column
is the max difference of dq from SDPA flash's dq. A "decode static" row reads a 8k-key cache buffer
filled to key_end = 1k: it should cost what the same 1k keys cost as a view (its GB/s count those).
On the ViT and the longest prefill shape, the prefill kernel is also timed at other block configs
(provider "triton BM,BN,warps,stages"), and the decode kernel at forced split counts ("triton
splits=N"), so that one GPU run shows whether the configs the launchers pick are the best ones.
Baselines: torch SDPA with the flash and math backends (k/v expanded to Hq heads outside the timed
region: the favourable case for torch), the eager reference, F.rms_norm, torch.compile of the
reference, and a plain copy (x.clone(): the bandwidth an RMSNorm can hope for).
Prints a device line with peaks, a fixed-width table (each row as soon as it is measured), and the
JSON record as the last line; a copy goes to <out>/kernels_<device>_<date>.json.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # CPU: run the kernels in the interpreter; must precede `import triton`

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import glm4v_kernels as K  # noqa: E402
from glm4v_kernels.flash_attention import attention_forward  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import datasheet_peaks, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NOMINAL_PEAKS = (100.0, 1000.0)  # a GPU (or its FLOP/s) not in common.DATASHEET_PEAKS; the interpreter gets (1, 50)
GLM_EPS = 1.5625e-07
# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried beside the default (none spills on sm_90)
PREFILL_CONFIGS = [(128, 128, 8, 2), (128, 128, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)]
DECODE_SPLITS = [8, 32, 64]


def device_info() -> dict:
    if not torch.cuda.is_available():
        return {"name": "cpu", "tflops": 1.0, "gbps": 50.0, "peaks": "nominal (CPU, Triton interpreter)"}
    name = torch.cuda.get_device_name()
    match = datasheet_peaks(name)
    if match is None:
        return {"name": name, "tflops": NOMINAL_PEAKS[0], "gbps": NOMINAL_PEAKS[1], "peaks": "nominal (unknown GPU)"}
    fragment, tflops, gbps = match
    return {"name": name, "tflops": tflops or NOMINAL_PEAKS[0], "gbps": gbps,
            "peaks": f"datasheet ({fragment})" + ("" if tflops else ", nominal TFLOP/s")}


def bench(fn) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds per call."""
    if torch.cuda.is_available():
        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    fn()  # warm-up (the interpreter has no compile step, torch may)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=5, method="inclusive")
    return statistics.median(times), q[0], q[3]


def attention_cases(smoke: bool) -> list[dict]:
    """B, Hq, Hkv, Lq, Lk, D, causal; decode cases read k/v as views of a static cache."""
    if smoke:
        return [dict(name="vit", B=1, Hq=2, Hkv=2, Lq=40, Lk=40, D=112, causal=False),
                dict(name="prefill", B=1, Hq=4, Hkv=2, Lq=40, Lk=40, D=64, causal=True, sweep=True),
                dict(name="decode", B=2, Hq=4, Hkv=1, Lq=1, Lk=100, D=64, causal=True, sweep=True),
                dict(name="decode static", B=2, Hq=4, Hkv=1, Lq=1, Lk=40, D=64, causal=True, buffer=100)]
    cases = [dict(name="vit", B=1, Hq=16, Hkv=16, Lq=6401, Lk=6401, D=112, causal=False, sweep=True)]
    cases += [dict(name="prefill", B=1, Hq=32, Hkv=2, Lq=L, Lk=L, D=128, causal=True, sweep=L == 8192)
              for L in (1024, 2048, 8192)]
    cases += [dict(name="decode", B=B, Hq=32, Hkv=2, Lq=1, Lk=L, D=128, causal=True, sweep=L == 8192)
              for B in (1, 16) for L in (2048, 8192)]
    cases += [dict(name="decode static", B=B, Hq=32, Hkv=2, Lq=1, Lk=1024, D=128, causal=True, buffer=8192)
              for B in (1, 16)]
    return cases


def rms_norm_cases(smoke: bool) -> list[tuple[int, int]]:
    if smoke:
        return [(5, 97), (3, 256)]
    return [(rows, N) for N in (4096, 1792) for rows in (1, 2048, 16384)]


def attention_rows(case: dict, dtype: torch.dtype, device: str) -> list[dict]:
    B, Hq, Hkv, Lq, Lk, D, causal = (case[k] for k in ("B", "Hq", "Hkv", "Lq", "Lk", "D", "causal"))
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, Hq, Lq, D, device=device, dtype=dtype, generator=g)
    key_end = None
    if case["name"].startswith("decode"):  # the model's layout: views of a (B, Hkv, Lmax, D) cache
        buffer = case.get("buffer", Lk + 256)
        cache = torch.randn(2, B, Hkv, buffer, D, device=device, dtype=dtype, generator=g)
        k, v = cache[0, :, :, :Lk], cache[1, :, :, :Lk]
        if "buffer" in case:  # the whole buffer, filled to key_end; SDPA and the check get the view
            key_end = torch.full((B,), Lk, device=device, dtype=torch.int32)
        unit = "GB/s"
    else:
        k, v = (torch.randn(B, Hkv, Lk, D, device=device, dtype=dtype, generator=g) for _ in range(2))
        unit = "TFLOP/s"
    flops = 4 * B * Hq * Lq * Lk * D // (2 if causal and Lq == Lk else 1)
    nbytes = (2 * B * Hkv * Lk * D + 2 * B * Hq * Lq * D) * q.element_size()
    k_rep, v_rep = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (k, v))  # for SDPA, outside the timing
    sdpa_causal = causal and Lq == Lk  # Lq = 1 causal sees every key: plain SDPA is the same thing

    def sdpa(backend):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=sdpa_causal)
        return run

    forced = lambda **kw: attention_forward(q, k, v, causal, **kw)[0]  # noqa: E731
    if key_end is not None:
        k_buf, v_buf = cache[0], cache[1]
        providers = {"triton key_end": lambda: K.attention(q, k_buf, v_buf, causal=causal, key_end=key_end),
                     "triton": lambda: K.attention(q, k, v, causal=causal)}
    else:
        providers = {"triton": lambda: K.attention(q, k, v, causal=causal)}
    if case.get("sweep") and case["name"] == "decode":
        providers |= {f"triton splits={n}": lambda n=n: forced(n_splits=n) for n in DECODE_SPLITS}
    elif case.get("sweep"):
        providers |= {"triton " + ",".join(map(str, c)): lambda c=c: forced(config=c) for c in PREFILL_CONFIGS}
    providers |= {"sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa_math": sdpa(SDPBackend.MATH)}
    check = lambda out: (out.float() - K.attention_ref(q, k, v, causal=causal).float()).abs().max().item()  # noqa: E731
    shape = f"{case['name']} B{B} Hq{Hq}/Hkv{Hkv} Lq{Lq} Lk{Lk} D{D}{' causal' if causal else ''}"
    rows = [measure(shape, p, fn, flops, nbytes, unit, check if p.startswith("triton") else None)
            for p, fn in providers.items()]
    if unit == "TFLOP/s":  # training shapes: the backward too
        rows += backward_rows(shape, q, k, v, k_rep, v_rep, causal, sdpa_causal, flops)
    return rows


def backward_rows(shape, q, k, v, k_rep, v_rep, causal, sdpa_causal, fwd_flops) -> list[dict]:
    """dq, dk, dv given dO, the forward run once outside the timing; 2.5x the forward's FLOPs.
    Bytes: q, k, v, o, dO read, dq, dk, dv written."""
    q, k, v, k_rep, v_rep = (t.detach().requires_grad_() for t in (q, k, v, k_rep, v_rep))
    do = torch.randn_like(q)
    nbytes = 4 * q.numel() * q.element_size() + 4 * k.numel() * k.element_size()

    def grads(out, inputs):
        return lambda: torch.autograd.grad(out, inputs, do, retain_graph=True)

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash = grads(F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=sdpa_causal), (q, k_rep, v_rep))
        dq_flash = flash()[0].float()
    providers = {"triton bwd": grads(K.attention(q, k, v, causal=causal), (q, k, v)), "sdpa_flash bwd": flash}
    check = lambda out: (out[0].float() - dq_flash).abs().max().item()  # noqa: E731
    return [measure(shape, p, fn, int(2.5 * fwd_flops), nbytes, "TFLOP/s", check if p.startswith("triton") else None)
            for p, fn in providers.items()]


def rms_norm_rows(rows: int, N: int, dtype: torch.dtype, device: str, smoke: bool) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(0)
    x, residual = (torch.randn(rows, N, device=device, dtype=dtype, generator=g) for _ in range(2))
    w = torch.rand(N, device=device, dtype=dtype, generator=g) + 0.5
    elt = x.element_size()
    # (bytes, flops): x read, y written, weight read; 4 flops an element (square, sum, 2 products)
    norm, add_norm = (2 * rows * N * elt + N * elt, 4 * rows * N), (4 * rows * N * elt + N * elt, 5 * rows * N)
    providers = {"triton": (lambda: K.rms_norm(x, w, GLM_EPS), norm),
                 "torch_eager_ref": (lambda: K.rms_norm_ref(x, w, GLM_EPS), norm),
                 "F.rms_norm": (lambda: F.rms_norm(x, (N,), w, GLM_EPS), norm),
                 "copy": (lambda: x.clone(), (2 * rows * N * elt, 0)),
                 "triton_add_norm": (lambda: K.add_rms_norm(x, residual, w, GLM_EPS), add_norm)}
    if not smoke:  # torch.compile on CPU needs a C++ toolchain and minutes; the smoke run skips it
        # dynamic=False: a kernel specialized to this shape, torch.compile's best case (6 shapes,
        # under dynamo's limit of 8 recompiles per function)
        compiled, compiled_add = (torch.compile(f, dynamic=False) for f in (K.rms_norm_ref, K.add_rms_norm_ref))
        providers["compiled_ref"] = (lambda: compiled(x, w, GLM_EPS), norm)
        providers["compiled_add_norm_ref"] = (lambda: compiled_add(x, residual, w, GLM_EPS), add_norm)
    ref = K.rms_norm_ref(x, w, GLM_EPS).float()
    check = lambda out: (out.float() - ref).abs().max().item()  # noqa: E731
    shape = f"rmsnorm rows{rows} N{N}"
    return [measure(shape, p, fn, flops, nbytes, "GB/s", check if p == "triton" else None)
            for p, (fn, (nbytes, flops)) in providers.items()]


def measure(shape: str, provider: str, fn, flops: int, nbytes: int, unit: str, check=None) -> dict:
    """Times fn; value = flops or bytes (by unit) per second. flops/bytes: the op's own work, the
    same for every provider (each input read once, each output written once)."""
    row = {"shape": shape, "provider": provider, "unit": unit, "flops": flops, "bytes": nbytes}
    work = flops if unit == "TFLOP/s" else nbytes
    try:
        out = fn()
        if check is not None:
            row["max_abs_err_vs_ref"] = check(out)
        row["ms"], row["ms_p20"], row["ms_p80"] = bench(fn)
        row["value"] = work / (row["ms"] * 1e-3) / (1e12 if unit == "TFLOP/s" else 1e9)
    except Exception as e:  # a backend torch cannot run here (shape, dtype, memory) is reported, not fatal
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def print_header(device: dict) -> None:
    print(f"device: {device['name']} | peaks {device['tflops']:.0f} TFLOP/s bf16 dense, "
          f"{device['gbps']:.0f} GB/s HBM [{device['peaks']}] | torch {torch.__version__}, triton {triton.__version__}")
    header = (f"{'shape':<46} | {'provider':<22} | {'ms':>9} | {'TFLOP/s or GB/s':>16} | {'% of peak':>9} | "
              f"{'% roofline':>10}")
    print(header)
    print("-" * len(header), flush=True)


def add_peaks(r: dict, device: dict) -> None:
    """% of the device's peak, and of the roofline floor max(FLOPs / peak FLOP/s, bytes / peak GB/s)."""
    if "value" in r:
        r["pct_of_peak"] = 100 * r["value"] / (device["tflops"] if r["unit"] == "TFLOP/s" else device["gbps"])
        r["roofline_ms"] = 1e3 * max(r["flops"] / (device["tflops"] * 1e12), r["bytes"] / (device["gbps"] * 1e9))
        r["pct_of_roofline"] = 100 * r["roofline_ms"] / r["ms"]


def print_row(r: dict) -> None:
    if "error" in r:
        print(f"{r['shape']:<46} | {r['provider']:<22} | {'error':>9} | {r['error'][:40]}", flush=True)
        return
    print(f"{r['shape']:<46} | {r['provider']:<22} | {r['ms']:>9.4f} | "
          f"{r['value']:>8.1f} {r['unit']:<7} | {r['pct_of_peak']:>8.1f}% | {r['pct_of_roofline']:>9.1f}%", flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (always on without CUDA)")
    parser.add_argument("--only", choices=("attention", "rmsnorm"), help="one kernel family (default: both)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="JSON folder")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    smoke = args.smoke or not on_gpu
    device_str, dtype = "cuda" if on_gpu else "cpu", torch.bfloat16
    device = device_info()

    jobs = []  # each row is printed as soon as it is measured: a run cut short still shows them
    if args.only in (None, "attention"):
        jobs += [lambda case=case: attention_rows(case, dtype, device_str) for case in attention_cases(smoke)]
    if args.only in (None, "rmsnorm"):
        jobs += [lambda n=n, N=N: rms_norm_rows(n, N, dtype, device_str, smoke) for n, N in rms_norm_cases(smoke)]
    print_header(device)
    rows = []
    for job in jobs:
        for r in job():
            add_peaks(r, device)
            print_row(r)
            rows.append(r)

    slug = re.sub(r"[^a-z0-9]+", "-", device["name"].lower()).strip("-")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    return write_result(f"kernels_{slug}_{stamp}", {"device": device, "smoke": smoke, "triton": triton.__version__,
                                                     "dtype": str(dtype), "results": rows}, args.out)


if __name__ == "__main__":
    main()
