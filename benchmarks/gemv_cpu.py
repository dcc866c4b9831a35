"""The bare M=1 product (GEMV) on CPU against the measured memory bandwidth: the decode ceiling.

    python benchmarks/gemv_cpu.py [--threads 2] [--repeat 15] [--compile]

A batch-1 decode step reads every decoder weight once; the products y = x @ W.T with one row x are
all it must do at full size. This times them alone, with the mid-size decoder of
benchmarks/generate.py (8 layers, width 1024: qkv 1536x1024, out 1024x1024, gate_up 5632x1024,
down 1024x2816, and the 32768x1024 output layer; 124M weights, 0.25 GB in bf16). One "pass" runs
the 33 products of a decode step, each on its own weight (so nothing is served from cache), and
the pass's weight bytes / time is the achieved bandwidth. Paths, each timed in turn (A B C ...):

  bf16 F.linear        what the model runs today (ATen picks the kernel: oneDNN for bf16 here)
  bf16 torch.mv        W @ x, ATen's own GEMV
  bf16 mkldnn packed   the weight reordered once for oneDNN (torch.ops.mkldnn._reorder_linear_weight)
                       and run with torch.ops.mkldnn._linear_pointwise (what inductor emits)
  bf16 compiled        torch.compile of the pass (inductor; --compile also tries max-autotune's
                       C++ GEMM template; slow to compile on 2 cores, so off by default)
  fp32 F.linear        the same pass with fp32 weights (twice the bytes)

Last, the model itself: the mid-size random model's batch-1 bf16 decode step (model.decode_step)
with plain weights, with `glm4v_core.model.ops.pack_cpu_weights` applied, and packed and compiled, timed in
the same rounds as the bare packed products: each step's time over theirs is what the rest of the
step (norms, rotary, attention, the cache write) adds.

Every bf16 path's result is checked equal to F.linear's (same inputs, max abs difference reported).
Bandwidth references, measured in the same run: copy (bytes read + written by a 512 MiB tensor
copy per second, what benchmarks/generate.py's roofline divides by) and read (bytes per second of
a sum over a 512 MiB tensor: a GEMV only reads). The JSON gives each path's median/min/max ms per
pass (wall; and process CPU time, steadier on a shared machine), GB/s and % of both references from the
median and from the best pass, at the threads asked for (default: 1 and 2).
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import copy_bandwidth, read_bandwidth, write_result  # noqa: E402
from generate import mid_size_config, prompt, random_model  # noqa: E402

from glm4v_core.generation.step import cpu_compile_options  # noqa: E402
from glm4v_core.model.ops import pack_cpu_weights  # noqa: E402


def decode_shapes(config: dict) -> list[tuple[int, int]]:
    """(out, in) of every product of a batch-1 decode step, in order: per layer qkv, out, gate_up,
    down; then the output layer."""
    H, ffn, layers = config["hidden_size"], config["ffn_hidden_size"], config["num_layers"]
    head_dim, heads, groups = config["kv_channels"], config["num_attention_heads"], config["multi_query_group_num"]
    qkv = (heads + 2 * groups) * head_dim
    per_layer = [(qkv, H), (heads * head_dim, H), (2 * ffn, H), (H, ffn)]
    return per_layer * layers + [(config["padded_vocab_size"], H)]


class Pass(torch.nn.Module):
    """The pass as a module: its weights are parameters, which inductor's freezing may pack."""

    def __init__(self, weights: list[torch.Tensor]):
        super().__init__()
        self.weights = torch.nn.ParameterList(torch.nn.Parameter(w, requires_grad=False) for w in weights)

    def forward(self, xs: dict) -> list[torch.Tensor]:
        return [F.linear(xs[w.shape[1]], w) for w in self.weights]


def no_grad_call(fn, xs):
    with torch.no_grad():  # inductor freezes (and may pack) parameters only for inference graphs
        return fn(xs)


def make_paths(weights: list[torch.Tensor], weights32: list[torch.Tensor], compile_modes: list[str]) -> dict:
    """name -> (pass function of x, bytes read per pass)."""
    bf16_bytes = sum(w.nbytes for w in weights)
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]

    def linear_pass(xs, ws=weights):  # xs: input width -> (1, width) row
        return [F.linear(xs[w.shape[1]], w) for w in ws]

    def mv_pass(xs):
        return [torch.mv(w, xs[w.shape[1]][0])[None] for w in weights]

    def packed_pass(xs):
        return [torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")
                for w, p in zip(weights, packed, strict=True)]

    def fp32_pass(xs):
        return linear_pass({k: x.float() for k, x in xs.items()}, weights32)

    paths = {"bf16 F.linear": (linear_pass, bf16_bytes), "bf16 torch.mv": (mv_pass, bf16_bytes),
             "bf16 mkldnn packed": (packed_pass, bf16_bytes), "fp32 F.linear": (fp32_pass, 2 * bf16_bytes)}
    if compile_modes:
        import torch._inductor.config as inductor_config
        inductor_config.freezing = True  # parameters become constants inductor may re-lay out (inference)
    for mode in compile_modes:
        compiled = torch.compile(Pass(weights).eval(), mode=mode, dynamic=False)
        paths[f"bf16 compiled ({mode})"] = (functools.partial(no_grad_call, compiled), bf16_bytes)
    return paths


def time_paths(paths: dict, x: dict, repeat: int) -> tuple[dict, dict]:
    """Interleaved: every path once per round; seconds per pass, wall clock and process CPU time (on a
    shared machine the CPU time of a 1-thread run is the steadier of the two)."""
    wall = {name: [] for name in paths}
    cpu = {name: [] for name in paths}
    for run, _ in paths.values():  # warm-up (and compiles)
        run(x)
        run(x)
    for _ in range(repeat):
        for name, (run, _) in paths.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run(x)
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
    return wall, cpu


def decode_steps(repeat: int, bare_products, x: dict, steps: int = 16) -> dict:
    """The mid-size model's batch-1 bf16 decode step (model.decode_step) with plain weights, packed
    weights, and packed weights compiled (what `glm4v generate --compile` runs on CPU), interleaved
    with `bare_products` (the packed products of one step alone, on x): ms per step, the decoder
    weights' bytes per second, and each step's time over the bare products' in the same rounds."""
    device = torch.device("cpu")
    plain = random_model(mid_size_config(), device, torch.bfloat16)
    packed = random_model(mid_size_config(), device, torch.bfloat16)
    packed.load_state_dict(plain.state_dict())
    pack_cpu_weights(packed)
    compiled_step = torch.compile(packed.decode_step, fullgraph=True, dynamic=False, options=cpu_compile_options())
    steps_of = {"plain": (plain, plain.decode_step), "packed": (packed, packed.decode_step),
                "packed_compiled": (packed, compiled_step)}
    ids = torch.tensor([prompt(plain.config, 64, False)])
    weight_bytes = sum(p.nbytes for n, p in plain.text.named_parameters() if not n.startswith("embed."))
    times: dict = {name: [] for name in (*steps_of, "bare_products")}
    logits = {}
    with torch.no_grad():
        for _ in range(repeat + 1):
            for name, (model, step) in steps_of.items():
                checked = model.check_prompt(ids, max_new_tokens=steps + 1)
                state = model.prefill(checked, checked.spliced_length + steps + 1)
                token, position, slot = state.logits.argmax(-1, keepdim=True), state.positions, state.slot
                out = step(token, position, slot, state.cache)  # (compiles once)
                token, position, slot = out.argmax(-1, keepdim=True), position + 1, slot + 1
                start = time.perf_counter()
                for _ in range(steps):
                    out = step(token, position, slot, state.cache)
                    token, position, slot = out.argmax(-1, keepdim=True), position + 1, slot + 1
                times[name].append((time.perf_counter() - start) / steps)
                logits[name] = out
            start = time.perf_counter()
            for _ in range(steps):
                bare_products(x)
            times["bare_products"].append((time.perf_counter() - start) / steps)
    times = {name: t[1:] for name, t in times.items()}  # the first round warms up
    bare = statistics.median(times["bare_products"])
    return {"weight_bytes": weight_bytes, "same_logits": bool(torch.equal(logits["plain"], logits["packed"])),
            **{name: {"ms_per_step": statistics.median(t) * 1e3, "best_ms_per_step": min(t) * 1e3,
                      "weight_GB_s": weight_bytes / statistics.median(t) / 1e9,
                      "over_bare_products": statistics.median(t) / bare} for name, t in times.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--compile", action="store_true", help="also time torch.compile (default and max-autotune)")
    args = p.parse_args()
    config = mid_size_config()
    shapes = decode_shapes(config)
    gen = torch.Generator().manual_seed(0)
    weights = [(torch.randn(shape, generator=gen) * shape[1] ** -0.5).to(torch.bfloat16) for shape in shapes]
    weights32 = [w.float() for w in weights]
    x = {k: torch.randn(1, k, generator=gen).to(torch.bfloat16) for k in {k for _, k in shapes}}
    modes = ["default", "max-autotune"] if args.compile else []
    results: dict = {"shapes": shapes, "weight_bytes_bf16": sum(w.nbytes for w in weights), "by_threads": {}}
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        copy_bw, read_bw = copy_bandwidth(), read_bandwidth()
        paths = make_paths(weights, weights32, modes)
        reference = paths["bf16 F.linear"][0](x)
        row: dict = {"copy_GB_s": copy_bw / 1e9, "read_GB_s": read_bw / 1e9, "paths": {}}
        times, cpu_times = time_paths(paths, x, args.repeat)
        for name, (run, nbytes) in paths.items():
            t = statistics.median(times[name])
            achieved = nbytes / t
            entry = {"median_ms": t * 1e3, "min_ms": min(times[name]) * 1e3, "max_ms": max(times[name]) * 1e3,
                     "cpu_median_ms": statistics.median(cpu_times[name]) * 1e3,
                     "GB_s": achieved / 1e9, "best_GB_s": nbytes / min(times[name]) / 1e9,
                     "pct_of_copy_bw": 100 * achieved / copy_bw, "pct_of_read_bw": 100 * achieved / read_bw,
                     "best_pct_of_copy_bw": 100 * nbytes / min(times[name]) / copy_bw}
            if name.startswith("bf16"):
                out = run(x)
                entry["max_abs_diff_vs_F.linear"] = max(float((a.float() - b.float()).abs().max())
                                                        for a, b in zip(out, reference, strict=True))
            row["paths"][name] = entry
            print(f"threads {threads} {name:28} {t * 1e3:8.2f} ms/pass {achieved / 1e9:6.1f} GB/s "
                  f"{entry['pct_of_copy_bw']:5.1f}% of copy {entry['pct_of_read_bw']:5.1f}% of read", flush=True)
        row["model_decode_step"] = decode_steps(max(3, args.repeat // 3), paths["bf16 mkldnn packed"][0], x)
        for name in ("plain", "packed", "packed_compiled", "bare_products"):
            step = row["model_decode_step"][name]
            step["pct_of_copy_bw"] = 100 * step["weight_GB_s"] * 1e9 / copy_bw
            print(f"threads {threads} model decode step, {name:15}: {step['ms_per_step']:.2f} ms "
                  f"({step['weight_GB_s']:.1f} GB/s of weights, {step['pct_of_copy_bw']:.1f}% of copy, "
                  f"{step['over_bare_products']:.2f}x the bare products)", flush=True)
        results["by_threads"][str(threads)] = row
    write_result("gemv_cpu", results)


if __name__ == "__main__":
    main()
