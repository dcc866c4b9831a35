"""Chunked prefill on CPU: wall time and peak RSS per (prompt length, GLM4V.prefill_chunk), to choose
the default chunk and to record the memory of 8K / 32K / 128K-token prompts.

    python benchmarks/prefill_chunk.py [--threads 2] [--repeat 2] [--skip-128k]
    python benchmarks/prefill_chunk.py --grid 8192:None,2048 --no-write   # a quick look

The model is the mid-size random checkpoint of benchmarks/generate.py (mid_size_config, random_model)
in bf16, text only: the vision keys are dropped from its config (no ViT is built) and seq_length is
131072 so that the context check admits a 128K prompt. Every (length, chunk) runs in a fresh
subprocess, so its peak RSS (getrusage(RUSAGE_SELF).ru_maxrss) belongs to that run alone: it builds
the model, makes a prompt of random ordinary ids (below the special ids), calls
`model.check_prompt(ids, max_new_tokens=1)`, reads its RSS (/proc/self/status VmRSS), then times
`model.prefill(prompt, cache_len=T + 1)` under torch.inference_mode() (`repeat` times where asked;
the peak is the one of the first prefill). The KV cache the prefill must allocate is
layers x 2 x kv_groups x cache_len x head_dim x 2 bytes; `peak_growth - kv_cache` is the rest of the
prefill's working set (activations of a chunk, the attention's expanded keys and mask).

Correctness: the last-slot logits of each chunked 8K bf16 run against the one-pass run's (saved by the
children), and an fp32 2K check in one more child (one pass vs several chunks), max |diff|.

128K (131071 prompt tokens + 1 new = the 131072 context): attention is O(T^2). The 32K time of
the default chunk x 16 estimates the full model at 128K; when that is over --budget-128k seconds,
128K runs on the same model with --layers-128k decoder layers (1 by default), and its peak is
compared with that model's KV cache.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_result  # noqa: E402
from generate import mid_size_config, random_model  # noqa: E402

from glm4v_core.model import glm4v as glm4v_module  # noqa: E402

SEQ_LENGTH = 131072
# The judgement of the recorded numbers (results/prefill_chunk_cpu.json); revise it with new numbers.
CONCLUSION = (
    "Keep PREFILL_CHUNK = 2048. Speed: at 8K every chunk is within the noise of the others (best runs "
    "13.4-14.6 s, the parallel test suite made single runs vary 13-41 s); at 32K chunks 1024 and 2048 tie"
    " (151 / 155 s, one run each), 4096 is 1.26x slower (195 s) and one pass is 0.9x (136 s) but needs "
    "+1248 MiB against +807. Memory: 2048 bounds the MLP activations; 1024 saves another 124 MiB at 32K "
    "at no measured speed cost, so it is the alternative on a memory-tight CPU, but on CPU the time is "
    "the same and fewer passes cost less on a GPU (not measured here). Logits: chunked = one pass bit for"
    " bit in bf16 at 8K, <= 3.6e-6 in fp32 at 2K. Caveat: the working set is not bounded by the chunk "
    "alone: the CPU attention path (attention_ref) expands K/V to every query head over all keys and "
    "builds a (chunk, keys) mask per layer, so peak minus KV cache grows with T: +205 MiB at 8K, +551 at "
    "32K (8 layers), +1886 MiB at 128K on a 1-layer model (KV cache 128 MiB; the full model at 128K was "
    "estimated at 2473 s, too slow here). A 128K prompt on the 8-layer model would need the 1 GiB KV "
    "cache plus about that ~1.9 GiB transient."
)
LONG = SEQ_LENGTH - 1  # "128K": the prompt plus its one new token fill the 131072-position context
MIB = 2 ** 20


def text_config(layers: int | None = None) -> dict:
    """mid_size_config without the vision keys (a text-only GLM-4: no ViT built), context 128K."""
    hf = {k: v for k, v in mid_size_config().items() if k not in ("vision_config", "boi_token_id", "eoi_token_id")}
    hf["seq_length"] = SEQ_LENGTH
    if layers is not None:
        hf["num_layers"] = layers
    return hf


def rss_now() -> int:
    """This process's resident set, bytes (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss() -> int:
    """This process's peak resident set so far, bytes (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def kv_cache_bytes(config, cache_len: int, elem: int) -> int:
    return config.num_layers * 2 * config.num_kv_groups * cache_len * config.head_dim * elem


def child(args) -> None:
    """One (length, chunk) in this fresh process: one JSON line on stdout."""
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)  # the same weights in every child: their logits are compared
    model = random_model(text_config(args.layers), torch.device("cpu"), dtype)
    model.prefill_chunk = None if args.chunk == "None" else int(args.chunk)
    c = model.config
    T = args.tokens
    ids = torch.randint(0, c.pad_token_id, (1, T), generator=torch.Generator().manual_seed(0))
    prompt = model.check_prompt(ids, max_new_tokens=1)
    rss_before, peak_before = rss_now(), peak_rss()
    times, peak_first = [], None
    with torch.inference_mode():
        for _ in range(args.repeat):
            start = time.perf_counter()
            state = model.prefill(prompt, cache_len=T + 1)
            times.append(time.perf_counter() - start)
            peak_first = peak_first or peak_rss()
            logits = state.logits.float().clone()
            del state
    if args.save_logits:
        torch.save(logits, args.save_logits)
    kv = kv_cache_bytes(c, T + 1, torch.empty((), dtype=dtype).element_size())
    print(json.dumps({"tokens": T, "chunk": model.prefill_chunk, "layers": c.num_layers, "dtype": args.dtype,
                      "prefill_s": statistics.median(times), "prefill_s_runs": times,
                      "rss_before_prefill_MiB": rss_before / MIB, "peak_rss_before_prefill_MiB": peak_before / MIB,
                      "peak_rss_MiB": peak_first / MIB, "peak_growth_MiB": (peak_first - rss_before) / MIB,
                      "kv_cache_MiB": kv / MIB, "peak_growth_minus_kv_MiB": (peak_first - rss_before - kv) / MIB,
                      "tokens_per_s": T / statistics.median(times)}))


def check_fp32(args) -> None:
    """fp32, `tokens` tokens: the last-slot logits of one pass vs chunks of each size, max |diff|."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = random_model(text_config(), torch.device("cpu"), torch.float32)
    T = args.tokens
    ids = torch.randint(0, model.config.pad_token_id, (1, T), generator=torch.Generator().manual_seed(0))
    prompt = model.check_prompt(ids, max_new_tokens=1)
    out = {}
    with torch.inference_mode():
        for chunk in (None, 256, 512, 1000):
            model.prefill_chunk = chunk
            out[chunk] = model.prefill(prompt, cache_len=T + 1).logits
    print(json.dumps({"tokens": T, "dtype": "float32",
                      "max_abs_diff_vs_one_pass": {str(k): float((v - out[None]).abs().max())
                                                   for k, v in out.items() if k is not None}}))


def spawn(argv: list[str], timeout: float) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  {' '.join(argv)}: over {timeout:.0f} s, skipped", flush=True)
        return {"skipped": f"over the {timeout:.0f} s limit"}
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return {"failed": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"rc {done.returncode}"}
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["subprocess_wall_s"] = time.perf_counter() - start
    return row


def run(tokens: int, chunk, args, repeat: int = 1, layers: int | None = None, save: str | None = None,
        timeout: float | None = None) -> dict:
    argv = ["--child", "--tokens", str(tokens), "--chunk", str(chunk), "--repeat", str(repeat),
            "--threads", str(args.threads)]
    if layers is not None:
        argv += ["--layers", str(layers)]
    if save:
        argv += ["--save-logits", save]
    row = spawn(argv, timeout or args.timeout)
    row.setdefault("tokens", tokens)
    row.setdefault("chunk", None if chunk == "None" else chunk)
    if "prefill_s" in row:
        print(f"  T={tokens:>6} chunk={row['chunk']!s:>5} layers={row['layers']}: prefill {row['prefill_s']:7.2f} s "
              f"({row['tokens_per_s']:6.0f} tok/s), RSS before {row['rss_before_prefill_MiB']:6.0f} MiB, peak "
              f"{row['peak_rss_MiB']:6.0f} (+{row['peak_growth_MiB']:.0f}; KV {row['kv_cache_MiB']:.0f}, rest "
              f"{row['peak_growth_minus_kv_MiB']:.0f})", flush=True)
    return row


def parse_grid(text: str) -> dict[int, list]:
    grid = {}
    for part in text.split(";"):
        tokens, chunks = part.split(":")
        grid[int(tokens)] = [c if c == "None" else int(c) for c in chunks.split(",")]
    return grid


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2, help="prefills per child at 8K (medians); 1 elsewhere")
    p.add_argument("--grid", default="8192:None,512,1024,2048,4096;32768:1024,2048,4096",
                   help="'T:chunk,chunk;T:...' (None: one pass)")
    p.add_argument("--one-pass-32k", action="store_true", help="also 32K with chunk None (slow)")
    p.add_argument("--one-pass-timeout", type=float, default=300.0, help="seconds: the 32K one pass, else skipped")
    p.add_argument("--skip-128k", action="store_true")
    p.add_argument("--chunk-128k", type=int, default=2048)
    p.add_argument("--budget-128k", type=float, default=480.0, help="seconds: above this estimate, fewer layers")
    p.add_argument("--layers-128k", type=int, default=1)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per child")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--only-128k", action="store_true", help="keep the results file's grid, rerun only 128K")
    # child modes
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--check-fp32", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, default=2048, help=argparse.SUPPRESS)
    p.add_argument("--chunk", default="None", help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    p.add_argument("--save-logits", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.check_fp32:
        return check_fp32(args)
    torch.set_num_threads(args.threads)
    grid = parse_grid(args.grid)
    if args.one_pass_32k and 32768 in grid:
        grid[32768].append("None")
    rows, logits_check = [], {}
    if args.only_128k:  # keep the grid of the results file, (re)measure 128K
        old = json.loads((RESULTS / "prefill_chunk_cpu.json").read_text())
        rows, logits_check, grid = old["rows"], old["logits_max_abs_diff_vs_one_pass"], {}
    with tempfile.TemporaryDirectory() as tmp:
        for tokens, chunks in grid.items():
            print(f"T = {tokens}", flush=True)
            cheap = tokens <= 8192
            for chunk in chunks:
                save = f"{tmp}/{tokens}_{chunk}.pt" if cheap else None
                slow = chunk == "None" and not cheap  # one pass of a long prompt: skipped if slow
                rows.append(run(tokens, chunk, args, repeat=args.repeat if cheap else 1, save=save,
                                timeout=args.one_pass_timeout if slow else None))
            if cheap and "None" in chunks and Path(f"{tmp}/{tokens}_None.pt").exists():
                ref = torch.load(f"{tmp}/{tokens}_None.pt")
                logits_check[f"{tokens}_bfloat16"] = {
                    str(c): float((torch.load(f"{tmp}/{tokens}_{c}.pt") - ref).abs().max())
                    for c in chunks if c != "None" and Path(f"{tmp}/{tokens}_{c}.pt").exists()}
    if not args.only_128k:
        fp32 = spawn(["--check-fp32", "--tokens", "2048", "--threads", str(args.threads)], args.timeout)
        logits_check["2048_float32"] = fp32.get("max_abs_diff_vs_one_pass", fp32)
    print(f"last-slot logits, max |chunked - one pass|: {logits_check}", flush=True)

    long_rows, long_note = [], None
    if not args.skip_128k:
        ref32 = next((r for r in rows if r["tokens"] == 32768 and r["chunk"] == args.chunk_128k and "prefill_s" in r),
                     None)
        estimate = 16 * ref32["prefill_s"] if ref32 else None
        layers = None if estimate is not None and estimate <= args.budget_128k else args.layers_128k
        long_note = {"estimate_full_model_s": estimate,
                     "estimate_rule": f"16 x the 32K prefill at chunk {args.chunk_128k} (attention is O(T^2))",
                     "budget_s": args.budget_128k,
                     "layers": layers or mid_size_config()["num_layers"],
                     "shallower_model": layers is not None}
        print(f"T = {LONG}: full-model estimate {estimate and round(estimate)} s -> "
              f"{f'{layers} layer(s)' if layers else 'full model'}", flush=True)
        long_rows.append(run(LONG, args.chunk_128k, args, layers=layers))
    result = {"model": "mid-size random (benchmarks/generate.py:mid_size_config), text only (vision keys dropped), "
                       f"seq_length {SEQ_LENGTH}, bf16, unpacked weights",
              "module_default_chunk": glm4v_module.PREFILL_CHUNK,
              "cache_len": "T + 1", "rows": rows, "logits_max_abs_diff_vs_one_pass": logits_check,
              "long_prompt_128k": {**(long_note or {}), "rows": long_rows}}
    result["summary"] = conclusion(rows, long_rows)
    result["conclusion"] = CONCLUSION
    print(result["summary"])
    if not args.no_write:
        write_result("prefill_chunk_cpu", result)


def conclusion(rows: list[dict], long_rows: list[dict]) -> str:
    """A first reading of the numbers (the README states the judgement)."""
    ok = [r for r in rows if "prefill_s" in r]
    lines = []
    for tokens in sorted({r["tokens"] for r in ok}):
        here = [r for r in ok if r["tokens"] == tokens]
        fastest = min(here, key=lambda r: r["prefill_s"])
        lines.append(f"{tokens}: " + ", ".join(
            f"chunk {r['chunk']} {r['prefill_s']:.1f} s ({r['prefill_s'] / fastest['prefill_s']:.2f}x) "
            f"+{r['peak_growth_MiB']:.0f} MiB" for r in here))
    for r in long_rows:
        if "prefill_s" in r:
            lines.append(f"{LONG} ({r['layers']} layers): chunk {r['chunk']} {r['prefill_s']:.1f} s, "
                         f"+{r['peak_growth_MiB']:.0f} MiB (KV cache {r['kv_cache_MiB']:.0f} MiB)")
    return "; ".join(lines)


if __name__ == "__main__":
    main()
