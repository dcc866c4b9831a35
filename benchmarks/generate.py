"""End-to-end generation speed: time to first token, decode ms/token eager vs compiled, % of bandwidth.

    python benchmarks/generate.py                  # CPU: tiny + narrow fixtures (fp32) and a mid-size
                                                   # random model (~0.5 GB fp32) in fp32 and bf16
    python benchmarks/generate.py --real           # + real-size GLM-4V-9B, random bf16 weights (CUDA)
    python benchmarks/generate.py --real --real-layers 1 --device cpu   # smoke test of the real path
    python benchmarks/generate.py --threads 1 --cpu-time   # a busy machine: this thread's CPU time

Every row is timed eager and with `compile=True` (torch.compile of the whole-token decode step,
replayed from a CUDA graph on CUDA) in one process, interleaved (eager, compiled, eager, ...), so
that a busy machine slows both alike; medians, min/max, and the median of the per-pair ratios. The
one-time compile and warm-up are reported apart (GenerationStats.compile_s) and the decode rates
count only the warm steps after them (GenerationStats.warm_s). Everything goes through
glm4v_core.generation.loop.stream_tokens, the loop the library uses; each step ends with a host sync (the
loop reads how many rows are done), so wall time per step is honest. `step_ms` times the step
function alone (same inputs, no loop) at batch 1: the rest of decode_ms_per_step is the loop.

Decode roofline (batch B, step at cache length T): a step reads every decoder weight once
(embedding excluded: only B rows are gathered) plus the whole KV cache,
    bytes = decoder_params * elem + layers * 2 * B * kv_groups * T * head_dim * elem
and cannot be faster than bytes / peak bandwidth; % of roofline = (bytes / step time) / peak. On
CUDA the peak is the datasheet's; on CPU it is this machine's copy bandwidth, measured in the same
run (bytes read + written by a large tensor copy, per second), again after every run: a shared
machine's bandwidth drifts (on the VM this was written on it jumps between two levels, ~45 and
~75 GB/s), and each row's roofline is the best bandwidth seen up to its end. On CPU each mode also
gets `pct_of_copy_bandwidth_around_each_run`: every run's achieved bandwidth over the larger of the
two copy measurements that bracket it (median, min, max), what the run could have had at the time.
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
from common import copy_bandwidth, datasheet_peaks, write_result  # noqa: E402

from glm4v_core import GLM4VConfig, load_model  # noqa: E402
from glm4v_core.checkpoint import build_meta_model  # noqa: E402
from glm4v_core.generation.loop import GenerationStats, stream_tokens
from glm4v_core.generation.sampling import Sampling, TokenRule
from glm4v_core.generation.step import COMPILE_CACHE_MULTIPLE, decode_step_runner
from glm4v_core.model.ops import pack_cpu_weights  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


CPU_COPY_MEASURED: list[float] = []


def cpu_copy_bandwidth(remeasure: bool = False) -> float:
    """The best copy bandwidth measured so far in this run; remeasure=True takes one more measurement.
    A shared VM's memory bandwidth drifts by tens of % within minutes: the roofline is the best seen."""
    if remeasure or not CPU_COPY_MEASURED:
        copy_bandwidth_now()
    return max(CPU_COPY_MEASURED)


def copy_bandwidth_now() -> float:
    """One more copy measurement (kept among the run's), returned: not the best so far."""
    CPU_COPY_MEASURED.append(copy_bandwidth())
    return CPU_COPY_MEASURED[-1]


def peak_bandwidth(device: torch.device) -> float | None:
    """Bytes/s: the datasheet's HBM bandwidth on CUDA (common.DATASHEET_PEAKS), the measured copy
    bandwidth on CPU; None for an unknown CUDA device."""
    if device.type == "cpu":
        return cpu_copy_bandwidth()
    match = datasheet_peaks(torch.cuda.get_device_name(device))
    return match[2] * 1e9 if match else None


def prompt(config: GLM4VConfig, n_text: int, image: bool, seed: int = 0) -> list[int]:
    """[gMASK] <sop> <|user|> [boi pad eoi] n_text ordinary ids <|assistant|> (the chat template's shape)."""
    special0 = config.pad_token_id  # special ids follow the BPE ranks: <|endoftext|> is the first
    gmask, sop, user, assistant = special0 + 2, special0 + 4, special0 + 7, special0 + 8
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, special0, (n_text,), generator=g).tolist()
    placeholder = [config.boi_token_id, config.pad_token_id, config.eoi_token_id] if image else []
    return [gmask, sop, user, *placeholder, *text, assistant]


# Wall time by default; --cpu-time (with --threads 1) reads this thread's CPU time instead, which
# other processes on a busy machine disturb far less (they still share its caches).
clock = time.perf_counter


def run_once(model, ids, pixels, new_tokens, compile: bool) -> tuple[float, float, float]:
    """(time to first token, mean seconds per warm decode step, compile + warm-up seconds) of one
    generation, as GenerationStats counts them: the warm steps come after the first compiled step
    and after any step during which dynamo recompiled, so no compile sits inside the rate."""
    stats = GenerationStats(clock=clock)
    for step in stream_tokens(model, ids, pixels, max_new_tokens=new_tokens, stop_ids=[], compile=compile,
                              stats=stats):
        step.tokens.cpu()  # the token is on the host: what a user would see
    return stats.time_to_first_token_s, stats.warm_s / max(stats.warm_tokens, 1), stats.compile_s


def step_only(model, ids, pixels, compile: bool, calls: int = 20, repeat: int = 5) -> float:
    """Median seconds of one call of the decode step function itself (decode_and_choose, compiled or
    not), with the same inputs every call: what the step costs without the loop around it."""
    prompt = model.check_prompt(ids, pixels, max_new_tokens=2)
    cache_len = -(-(prompt.spliced_length + 2) // COMPILE_CACHE_MULTIPLE) * COMPILE_CACHE_MULTIPLE  # as compile=True
    rule = TokenRule(Sampling(), torch.tensor(model.config.eos_token_ids, device=model.device),
                     model.config.pad_token_id, None)
    with torch.inference_mode():
        state = model.prefill(prompt, cache_len)
        tokens = state.logits.argmax(-1)
        finished = torch.zeros_like(tokens, dtype=torch.bool)
        inputs = (tokens, state.positions, state.slot, finished, None, None)
        step = decode_step_runner(model, rule, state.cache, inputs, compile)
        times = []
        for _ in range(repeat):
            start = clock()
            for _ in range(calls):
                counts = step(*inputs)[4]
            counts.tolist()  # wait for the device
            times.append((clock() - start) / calls)
    return statistics.median(times)


def measure(model, n_text: int, batch: int, image: bool, new_tokens: int, repeat: int) -> dict:
    """One prompt shape, eager and compiled, interleaved over `repeat` pairs of runs."""
    c = model.config
    device = model.text.embed.weight.device
    ids = torch.tensor([prompt(c, n_text, image)] * batch, device=device)
    pixels = None
    if image:
        size = c.vision.image_size
        pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    slots = ids.shape[1] + (c.vision.num_image_tokens - 1 if image else 0)
    row = {"prompt_tokens": ids.shape[1], "cache_slots": slots, "image": image, "batch": batch,
           "new_tokens": new_tokens}
    modes = {"eager": False, "compiled": True}
    compile_s = run_once(model, ids, pixels, 3, compile=True)[2]  # this shape's compile + warm-up step
    run_once(model, ids, pixels, 3, compile=False)
    runs = {mode: [] for mode in modes}
    # CPU: the copy bandwidth is measured before the first run and after every run; a run's own
    # reference is the larger of the two that bracket it (the roofline of each row stays the best seen)
    around = {mode: [] for mode in modes}
    before = copy_bandwidth_now() if device.type == "cpu" else None
    for _ in range(repeat):
        for mode, compile in modes.items():
            runs[mode].append(run_once(model, ids, pixels, new_tokens, compile))
            if device.type == "cpu":
                after = copy_bandwidth_now()
                around[mode].append(max(before, after))
                before = after
    for mode, compile in modes.items():
        steps = [r[1] for r in runs[mode]]
        step_s = statistics.median(steps)
        row[mode] = {"ttft_ms": statistics.median(r[0] for r in runs[mode]) * 1e3,
                     "decode_ms_per_step": step_s * 1e3,
                     "decode_ms_spread": [min(steps) * 1e3, max(steps) * 1e3],
                     "decode_tok_s_per_row": 1 / step_s, "decode_tok_s_total": batch / step_s,
                     **roofline(model, batch, slots + new_tokens // 2, step_s)}
        if around[mode]:
            pct = [100 * row[mode]["bytes_per_step"] / r[1] / bw
                   for r, bw in zip(runs[mode], around[mode], strict=True)]
            row[mode]["pct_of_copy_bandwidth_around_each_run"] = {"median": statistics.median(pct),
                                                                  "min": min(pct), "max": max(pct)}
        if batch == 1:
            row[mode]["step_ms"] = step_only(model, ids, pixels, compile) * 1e3
    row["compiled"]["first_compile_s"] = compile_s
    pairs = [e[1] / c[1] for e, c in zip(runs["eager"], runs["compiled"], strict=True)]
    row["compiled_speedup"] = row["eager"]["decode_ms_per_step"] / row["compiled"]["decode_ms_per_step"]
    row["compiled_speedup_pairs"] = {"median": statistics.median(pairs), "min": min(pairs), "max": max(pairs)}
    return row


def roofline(model, batch: int, mean_cache_len: int, step_s: float) -> dict:
    c = model.config
    elem = model.text.embed.weight.element_size()
    decoder_params = sum(p.numel() for n, p in model.text.named_parameters() if not n.startswith("embed."))
    kv_bytes = c.num_layers * 2 * batch * c.num_kv_groups * mean_cache_len * c.head_dim * elem
    step_bytes = decoder_params * elem + kv_bytes
    peak = peak_bandwidth(model.text.embed.weight.device)
    achieved = step_bytes / step_s
    return {"bytes_per_step": step_bytes, "achieved_GB_s": achieved / 1e9,
            "peak_GB_s": peak / 1e9 if peak else None,
            "pct_of_bandwidth_roofline": 100 * achieved / peak if peak else None}


def mid_size_config() -> dict:
    """A decoder of ~124M parameters read per step (~0.5 GB in fp32, ~0.25 GB in bf16): big enough to be
    bandwidth-bound on a CPU, small enough to build in seconds. The tiny fixture's ViT; special ids at
    the top of the vocabulary as in the real model."""
    hf = json.loads((FIXTURES / "tiny" / "config.json").read_text())
    vocab, shift = 32768, 32768 - hf["padded_vocab_size"]
    return {**hf, "hidden_size": 1024, "num_layers": 8, "num_attention_heads": 8, "kv_channels": 128,
            "multi_query_group_num": 2, "ffn_hidden_size": 2816, "padded_vocab_size": vocab,
            "eos_token_id": [i + shift for i in hf["eos_token_id"]], "pad_token_id": hf["pad_token_id"] + shift,
            "boi_token_id": hf["boi_token_id"] + shift, "eoi_token_id": hf["eoi_token_id"] + shift}


def random_model(hf: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A model of this HF config with random weights made on the device (no checkpoint, no host copy)."""
    model = build_meta_model(GLM4VConfig.from_hf(hf)).to(dtype).to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                torch.nn.init.normal_(p, std=p[0].numel() ** -0.5)  # 1/sqrt(fan_in): logits of order 1
            elif "norm" in name and name.endswith(".weight"):
                torch.nn.init.ones_(p)
            else:
                torch.nn.init.normal_(p, std=0.02)
    return model.eval().requires_grad_(False)


def real_config(layers: int | None) -> dict:
    """GLM-4V-9B's real config; `layers` shrinks both depths for smoke tests (widths stay real)."""
    hf = json.loads((FIXTURES / "real_manifest.json").read_text())["config"]
    if layers is not None:
        hf = {**hf, "num_layers": layers, "vision_config": {**hf["vision_config"], "num_hidden_layers": layers}}
    return hf


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'prompt':>6} {'slots':>6} {'img':>4} {'B':>3} {'TTFT ms':>8} | "
          f"{'eager ms/tok':>12} {'step':>6} {'% peak':>6} | "
          f"{'compiled ms/tok':>15} {'step':>6} {'% peak':>6} {'compile s':>9} | "
          f"{'speedup':>7} {'pairs':>15}")
    for r in rows:
        e, c, p = r["eager"], r["compiled"], r["compiled_speedup_pairs"]
        pct = lambda m: f"{m['pct_of_bandwidth_roofline']:.1f}" if m["pct_of_bandwidth_roofline"] else "-"  # noqa: E731
        step = lambda m: f"{m['step_ms']:.3f}" if "step_ms" in m else "-"  # noqa: E731
        print(f"{r['prompt_tokens']:>6} {r['cache_slots']:>6} {'yes' if r['image'] else 'no':>4} {r['batch']:>3} "
              f"{e['ttft_ms']:>8.2f} | {e['decode_ms_per_step']:>12.3f} {step(e):>6} {pct(e):>6} | "
              f"{c['decode_ms_per_step']:>15.3f} {step(c):>6} {pct(c):>6} {c['first_compile_s']:>9.1f} | "
              f"{r['compiled_speedup']:>6.2f}x {p['min']:>4.2f}-{p['median']:.2f}-{p['max']:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixtures", default="tiny,narrow", help="fixture checkpoints to time, fp32 ('' for none)")
    p.add_argument("--prompt-lengths", default="128", help="text tokens per prompt (fixtures), e.g. 16,512")
    p.add_argument("--batches", default="1", help="batch sizes (fixtures), e.g. 1,8")
    p.add_argument("--mid", default="float32,bfloat16", help="dtypes of the mid-size random model ('' for none)")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeat", type=int, default=15,
                   help="interleaved eager/compiled pairs of runs per point (a third of it for the mid-size model)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--real", action="store_true", default=torch.cuda.is_available(),
                   help="also time the real-size model with random weights (default on CUDA)")
    p.add_argument("--real-layers", type=int, default=None, help="shrink the real model's depth (smoke tests)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--cpu-time", action="store_true", help="time with this thread's CPU time (needs --threads 1)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.cpu_time:
        if device.type != "cpu" or torch.get_num_threads() != 1:
            p.error("--cpu-time measures one CPU thread: use it with --threads 1 on the CPU")
        global clock
        clock = time.thread_time
    results: dict = {"new_tokens": args.new_tokens, "repeat": args.repeat,
                     "clock": "thread CPU time" if args.cpu_time else "wall", "fixtures": {}, "mid": {}, "real": None}
    if device.type == "cpu":
        results["cpu_copy_GB_s"] = cpu_copy_bandwidth() / 1e9
        print(f"CPU copy bandwidth (read + write): {results['cpu_copy_GB_s']:.1f} GB/s")

    for name in filter(None, args.fixtures.split(",")):
        model = load_model(FIXTURES / name, dtype=torch.float32, device=device)
        rows = [measure(model, n, b, False, args.new_tokens, args.repeat)
                for n in map(int, args.prompt_lengths.split(",")) for b in map(int, args.batches.split(","))]
        rows += [measure(model, 100, b, True, args.new_tokens, args.repeat) for b in map(int, args.batches.split(","))]
        results["fixtures"][name] = rows
        print_table(f"{name} fixture, fp32, {device}", rows)

    for dtype_name in filter(None, args.mid.split(",")):
        model = random_model(mid_size_config(), device, getattr(torch, dtype_name))
        rows = [measure(model, 64, 1, False, args.new_tokens, max(3, args.repeat // 3))]
        if pack_cpu_weights(model):  # bf16 on CPU: oneDNN-packed weights, eager and compiled
            rows.append({**measure(model, 64, 1, False, args.new_tokens, max(3, args.repeat // 3)),
                         "packed_weights": True})
        results["mid"][dtype_name] = {"decoder_params": sum(p.numel() for p in model.text.parameters()), "rows": rows}
        print_table(f"mid-size random model, {dtype_name}, {device}", rows)
        del model

    if args.real:
        dtype = torch.bfloat16
        model = random_model(real_config(args.real_layers), device, dtype)
        rows = [measure(model, 100, b, True, args.new_tokens, args.repeat) for b in (1, 8)]
        results["real"] = {"dtype": str(dtype), "layers": model.config.num_layers, "rows": rows,
                           "note": "random weights; TTFT = ViT on one 1120x1120 image per row + 100-token prefill"}
        print_table(f"GLM-4V-9B real size ({model.config.num_layers} decoder layers), random bf16 weights, {device}",
                    rows)
        del model

    if device.type == "cpu":
        results["cpu_copy_GB_s"] = cpu_copy_bandwidth(remeasure=True) / 1e9
        results["cpu_copy_GB_s_measured"] = [b / 1e9 for b in CPU_COPY_MEASURED]
        spread = min(CPU_COPY_MEASURED) / 1e9, max(CPU_COPY_MEASURED) / 1e9
        print(f"CPU copy bandwidth measured {len(CPU_COPY_MEASURED)} times in this run: {spread[0]:.1f} to "
              f"{spread[1]:.1f} GB/s (each row's roofline: the best seen up to the end of its runs)")
    slug = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).lower().replace(" ", "-")
    write_result(f"generate_{slug}", results)


if __name__ == "__main__":
    main()
