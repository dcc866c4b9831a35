"""Weight-only quantization: decode tok/s and prefill time for fp32, bf16, int8, int4 side by side.

    python benchmarks/quant.py                 # CPU: mid-size random model (~0.5 GB fp32), every scheme
    python benchmarks/quant.py --real          # CUDA: real GLM-4V-9B shapes, random weights, bf16 compute
    python benchmarks/quant.py --kernels       # CUDA: the Triton quantized matmuls alone (GB/s, % of peak)
    python benchmarks/quant.py --accuracy      # logits error vs the HF fp32 reference, both fixtures, every scheme

Every run also prints the real 9B checkpoint's size under each scheme (tests/fixtures/real_manifest.json).
int8/int4 rows quantize the same random weights with glm4v_core.transforms.quant.quantize_model; activations
run in the row's compute dtype. Decode: median seconds per step of a greedy eager loop (the
library's stream_tokens, one host sync per step), text-only prompt. Prefill: time to first token.
Decode roofline: a step reads every decoder weight byte once (embedding excluded), so
    % of bandwidth = (decoder weight bytes / step time) / peak bytes/s,
with the CPU's peak measured in the same run (copy bandwidth) and the GPU's from the datasheet.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import datasheet_peaks, write_result  # noqa: E402
from generate import mid_size_config, peak_bandwidth, prompt, random_model, real_config  # noqa: E402

from glm4v_conversion.names import hf_to_native  # noqa: E402
from glm4v_conversion.quantize import is_linear_weight, layer_scheme, stored_layout  # noqa: E402
from glm4v_conversion.safetensors_io import tensor_nbytes  # noqa: E402
from glm4v_core.generation.loop import stream_tokens  # noqa: E402
from glm4v_core.transforms.quant import quantize_model  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
# (label, weights, compute dtype, group size)
ROWS = [("fp32", None, torch.float32, None), ("bf16", None, torch.bfloat16, None),
        ("int8 (bf16 compute)", "int8", torch.bfloat16, None),
        ("int4 g128 (bf16 compute)", "int4", torch.bfloat16, 128),
        ("int8 (fp32 compute)", "int8", torch.float32, None), ("int4 g128 (fp32 compute)", "int4", torch.float32, 128)]


def real_sizes() -> dict:
    """Bytes of the real checkpoint's tensors stored as bf16, int8 and int4 g32/64/128 (headers excluded)."""
    manifest = json.loads((FIXTURES / "real_manifest.json").read_text())
    shapes = {hf_to_native(n): tuple(s) for n, (s, _) in manifest["parameters"].items() if hf_to_native(n)}
    sizes = {"bf16": sum(tensor_nbytes(s, torch.bfloat16) for s in shapes.values())}
    for scheme, group in [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)]:
        layers = {n: layer_scheme(s[1], scheme, group) for n, s in shapes.items() if is_linear_weight(n)}
        layout = stored_layout(shapes, torch.bfloat16, layers, group)
        sizes[scheme + (f" g{group}" if group else "")] = sum(tensor_nbytes(s, d) for d, s in layout.values())
    return sizes


def decoder_weight_bytes(model) -> int:
    """Bytes a decode step reads: every decoder parameter and buffer but the embedding table."""
    tensors = [*model.text.named_parameters(), *model.text.named_buffers()]
    return sum(t.numel() * t.element_size() for n, t in tensors if not n.startswith("embed."))


def time_generation(model, n_text: int, new_tokens: int, repeat: int, compile: bool) -> dict:
    device = model.text.embed.weight.device
    ids = torch.tensor([prompt(model.config, n_text, False)], device=device)
    ttfts, steps = [], []
    for i in range(repeat + 1):  # the first run warms up (and compiles)
        start = time.perf_counter()
        times = []
        for step in stream_tokens(model, ids, None, max_new_tokens=new_tokens, stop_ids=[], compile=compile):
            step.tokens.cpu()
            times.append(time.perf_counter() - start)
        if i:
            ttfts.append(times[0])
            steps.append((times[-1] - times[1]) / (len(times) - 2))
    step_s = statistics.median(steps)
    weights = decoder_weight_bytes(model)
    peak = peak_bandwidth(device)
    return {"prefill_tokens": ids.shape[1], "prefill_ms": statistics.median(ttfts) * 1e3,
            "decode_ms_per_step": step_s * 1e3, "decode_ms_spread": [min(steps) * 1e3, max(steps) * 1e3],
            "decode_tok_s": 1 / step_s, "decoder_weight_bytes": weights, "weight_GB_s": weights / step_s / 1e9,
            "pct_of_bandwidth": 100 * weights / step_s / peak if peak else None}


def run_models(config: dict, device: torch.device, rows, n_text: int, new_tokens: int, repeat: int,
               compile: bool) -> dict:
    out = {}
    for label, scheme, dtype, group in rows:
        model = random_model(config, device, dtype)
        if scheme:
            quantize_model(model, scheme, group)
        try:
            out[label] = time_generation(model, n_text, new_tokens, repeat, compile)
        except Exception as e:  # noqa: BLE001 -- a row that cannot run is recorded, the others still run
            out[label] = {"error": f"{type(e).__name__}: {e}"}
        print(f"  {label:<26} " + (f"prefill {out[label]['prefill_ms']:8.1f} ms   "
                                    f"decode {out[label]['decode_tok_s']:7.1f} tok/s   "
                                    f"{out[label]['weight_GB_s']:6.1f} GB/s of weights"
                                    if "error" not in out[label] else out[label]["error"]), flush=True)
        del model
    base = out.get("bf16", {}).get("decode_tok_s")
    for r in out.values():
        if base and "decode_tok_s" in r:
            r["decode_speedup_vs_bf16"] = r["decode_tok_s"] / base
    return out


def kernel_rows(device: torch.device) -> list[dict]:
    """Triton int8/int4 GEMV and GEMM vs a bf16 torch matmul at the real decoder's Linear shapes.

    weight bytes = codes + scales (+ zeros); GB/s = weight bytes / time; % = that over the peak.
    On CPU (TRITON_INTERPRET=1) a smoke pass: small shapes, wall-clock timing, no peak."""
    import triton.testing

    import glm4v_kernels as K
    from glm4v_conversion.quantize import quantize_int4, quantize_int8
    cfg = real_config(None)
    H, F, V = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["padded_vocab_size"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["multi_query_group_num"]) * cfg["kv_channels"]
    if device.type == "cpu":
        shapes, Ms, peak = [("smoke", 96, 256)], (1, 17), None
        def bench(fn):  # noqa: E306
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
    else:
        shapes, Ms = [("qkv", qkv, H), ("gate_up", 2 * F, H), ("down", H, F), ("lm_head", V, H)], (1, 8, 1602)
        match = datasheet_peaks(torch.cuda.get_device_name(device))
        peak = match[2] * 1e9 if match else None
        def bench(fn):  # noqa: E306
            ms = triton.testing.do_bench(fn, quantiles=[0.5])
            return ms[0] if isinstance(ms, (list, tuple)) else ms
    rows = []
    for name, N, Kd in shapes:
        w = torch.randn(N, Kd, device=device) / Kd ** 0.5
        q8, s8 = quantize_int8(w)
        p4, s4, z4 = quantize_int4(w, 128)
        wb = w.bfloat16()
        for M in Ms:
            x = torch.randn(M, Kd, device=device, dtype=torch.bfloat16)
            # (run, weight bytes, what it must equal: the same weights dequantized, multiplied in fp32)
            # the runs bind this iteration's tensors as defaults (they are called with no arguments)
            providers = {"torch bf16": (lambda x=x, wb=wb: x @ wb.T, wb.numel() * 2, wb.float()),
                         "triton int8": (lambda x=x, q8=q8, s8=s8: K.int8_matmul(x, q8, s8),
                                         q8.numel() + s8.numel() * 4,
                                         K.dequantize_int8_ref(q8, s8, torch.float32)),
                         "triton int4": (lambda x=x, p4=p4, s4=s4, z4=z4: K.int4_matmul(x, p4, s4, z4, 128),
                                         p4.numel() + (s4.numel() + z4.numel()) * 2,
                                         K.dequantize_int4_ref(p4, s4, z4, 128, torch.float32))}
            for provider, (fn, nbytes, weight) in providers.items():
                want = x.float() @ weight.T
                err = (fn().float() - want).abs().max().item()  # every row is checked, not only timed
                assert err < 0.02 * want.abs().max().item() + 0.02, f"{provider} {name} M={M}: max error {err}"
                ms = bench(fn)
                rows.append({"layer": name, "M": M, "N": N, "K": Kd, "provider": provider, "ms": ms,
                             "weight_GB_s": nbytes / ms / 1e6, "tflop_s": 2 * M * N * Kd / ms / 1e9,
                             "pct_of_bandwidth": 100 * nbytes / (ms / 1e3) / peak if peak else None})
                r = rows[-1]
                print(f"  {name:>8} M={M:<5} {provider:<12} {ms:8.4f} ms {r['weight_GB_s']:8.1f} GB/s "
                      f"{r['pct_of_bandwidth'] or 0:5.1f}% {r['tflop_s']:7.1f} TFLOP/s", flush=True)
    return rows


def accuracy_rows() -> dict:
    """Per fixture and scheme: logits max-abs and RMS vs the fp32 reference over the real rows of
    every case, argmax agreement, and the Linear weights' relative reconstruction error."""
    from safetensors.torch import load_file

    from glm4v_conversion.quantize import quantize_int4, quantize_int8, unpack_int4
    from glm4v_core.checkpoint import load_model
    from glm4v_core.parity.quantized import _case_logits
    from glm4v_core.parity.reference import reference_cases
    out = {}
    for fixture in ("tiny", "narrow"):
        folder = FIXTURES / fixture
        ref = load_file(str(folder / "reference.safetensors"))
        meta = json.loads((folder / "reference.json").read_text())
        bf16 = meta["tolerances_observed"]["bf16_vs_fp32_logits_a_maxabs"]
        rows = {"bf16_vs_fp32_logits_a_maxabs (reference)": bf16, "int8 budget (3x)": 3 * bf16}
        schemes = [("int8", None, "rtn")] + [("int4", g, m) for g in (32, 64, 128) for m in ("rtn", "mse")]
        for scheme, group, method in schemes:
            model = quantize_model(load_model(folder), scheme, group, method)
            diffs, same, total = [], 0, 0
            with torch.no_grad():
                for case in reference_cases(ref):
                    logits, rows_mask = _case_logits(model, ref, case)
                    want = ref[f"logits_{case}"]
                    a, b = (logits[rows_mask], want[rows_mask]) if rows_mask is not None else (logits, want)
                    diffs.append((a - b).flatten(0, -2))
                    same += (a.argmax(-1) == b.argmax(-1)).sum().item()
                    total += a.shape[:-1].numel()
            d = torch.cat(diffs)
            w_err = w_norm = 0.0
            for name, w in load_model(folder).state_dict().items():
                if not is_linear_weight(name):
                    continue
                if layer_scheme(w.shape[1], scheme, group) == "int8":
                    q, sc = quantize_int8(w)
                    deq = q.float() * sc[:, None]
                else:
                    p, sc, z = quantize_int4(w, group, method)
                    deq = (unpack_int4(p).float() * sc.float().repeat_interleave(group, 1)
                           + z.float().repeat_interleave(group, 1))
                w_err += (deq - w.float()).square().sum().item()
                w_norm += w.float().square().sum().item()
            label = scheme + (f" g{group} {method}" if group else "")
            rows[label] = {"logits_max_abs": d.abs().max().item(), "logits_rms": d.square().mean().sqrt().item(),
                           "argmax_agreement": same / total, "weight_rel_error": (w_err / w_norm) ** 0.5}
            r = rows[label]
            print(f"  {fixture:<7} {label:<16} logits max-abs {r['logits_max_abs']:.4f}  rms {r['logits_rms']:.4f}  "
                  f"argmax {r['argmax_agreement']:.3f}  weight rel. error {r['weight_rel_error']:.4f}", flush=True)
        out[fixture] = rows
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--real", action="store_true", help="real GLM-4V-9B shapes, random weights (CUDA)")
    p.add_argument("--real-layers", type=int, default=None, help="shrink the real model's depth (smoke tests)")
    p.add_argument("--kernels", action="store_true", help="microbenchmark the Triton kernels (CUDA)")
    p.add_argument("--accuracy", action="store_true", help="logits error on the HF fixtures (CPU, fp32 compute)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="time compile=True decode steps instead of eager")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="folder for the JSON (default benchmarks/results)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results: dict = {"real_checkpoint_bytes": real_sizes(), "compile": args.compile}
    print("real GLM-4V-9B checkpoint, tensor bytes by scheme:")
    for k, v in results["real_checkpoint_bytes"].items():
        print(f"  {k:<10} {v / 1e9:7.2f} GB")
    peak = peak_bandwidth(device)
    results["peak_GB_s"] = peak / 1e9 if peak else None
    if args.accuracy:
        results["accuracy"] = accuracy_rows()
    elif args.kernels:
        results["kernels"] = kernel_rows(device)
    elif args.real:
        config = real_config(args.real_layers)
        print(f"real shapes ({config['num_layers']} decoder layers), random weights, {device}:")
        rows = [r for r in ROWS if r[2] == torch.bfloat16]
        results["real"] = run_models(config, device, rows, args.prompt_tokens, args.new_tokens, args.repeat,
                                     args.compile)
    else:
        print(f"mid-size random model, {device} (peak {results['peak_GB_s']:.1f} GB/s):")
        results["mid"] = run_models(mid_size_config(), device, ROWS, args.prompt_tokens, args.new_tokens,
                                    args.repeat, args.compile)
    slug = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).lower().replace(" ", "-")
    mode = "accuracy" if args.accuracy else "kernels" if args.kernels else "real" if args.real else "mid"
    write_result(f"quant_{mode}_{slug}", results, args.out)


if __name__ == "__main__":
    main()
