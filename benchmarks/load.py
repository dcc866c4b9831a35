"""Checkpoint loading and conversion on CPU: our mmap loader vs the naive path, and glm4v-convert.

    python benchmarks/load.py [--size-gb 1.5] [--out benchmarks/results/load_cpu.json]

Builds a synthetic bf16 checkpoint of about --size-gb (at least ~0.7 GB: one decoder layer) in a
temp folder: random weights, HF layout and the real tensor names, for a config derived from the
real one (real head_dim, GQA groups and image size; narrower widths, a 32768-row vocabulary, 8 ViT
layers, as many decoder layers as fill the size). Then it measures, each step in a fresh
subprocess so memory peaks do not mix:

  ours     load_model(folder, dtype=bfloat16): meta build, checks, mmap views (zero-copy)
  +touch   the same, then one read of every weight (p.max()): the pages a first forward maps
  naive    GLM4V(config) built in bf16, safetensors.torch.load_file on every shard,
           model.load_state_dict(state) (the usual path without meta device or assign=True)
  convert  glm4v_conversion.convert HF -> native and native -> HF (incl. sha256 hashing, fsync)

peak RSS increase = peak RSS after the step - peak RSS after the imports (the high-water mark is
reset after the imports and read as VmHWM; ru_maxrss where /proc is missing). RSS counts the file
pages a process has mapped and touched, so the zero-copy loader's RSS grows with what is read.
Load rows report the best of --repeats runs. The files were just written, so reads come from the page
cache (warm) except in the rows marked cold, whose files are evicted first (posix_fadvise DONTNEED).
Conversion rows include sha256 hashing and fsync, so they are bounded by the disk's write speed.
The table is printed, the last line is JSON, and a copy goes to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from glm4v_conversion.convert import rotary_inv_freq
from glm4v_conversion.names import HF_IGNORED_BUFFERS, native_to_hf
from glm4v_conversion.safetensors_io import INDEX_FILE, index_json, shard_names, write_file
from glm4v_conversion.shapes import expected_shapes

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_name, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "tests" / "fixtures" / "real_manifest.json"


def mid_size_config(size_gb: float) -> dict:
    """The real config narrowed (text 4096 -> 2048, vision 1792 -> 1024, vocab 151552 -> 32768) with
    as many decoder layers as fill `size_gb` of bf16; special token ids moved below the new vocab."""
    real = json.loads(MANIFEST.read_text())["config"]
    vocab, shift = 32768, real["padded_vocab_size"] - 32768
    config = {**real, "hidden_size": 2048, "ffn_hidden_size": 6848, "num_attention_heads": 16,
              "padded_vocab_size": vocab, "num_layers": 1,
              "eos_token_id": [t - shift for t in real["eos_token_id"]], "pad_token_id": real["pad_token_id"] - shift,
              "boi_token_id": real["boi_token_id"] - shift, "eoi_token_id": real["eoi_token_id"] - shift,
              "vision_config": {**real["vision_config"], "hidden_size": 1024, "num_heads": 8,
                                "intermediate_size": 4096, "num_hidden_layers": 8}}
    one = _nbytes(config)
    per_layer = _nbytes({**config, "num_layers": 2}) - one
    config["num_layers"] = max(1, round((size_gb * 1e9 - one) / per_layer) + 1)
    return config


def _nbytes(config: dict) -> int:
    return sum(2 * torch.Size(s).numel() for s in expected_shapes(config).values())


def write_synthetic_hf(folder: Path, config: dict, n_shards: int = 4) -> int:
    """Random bf16 weights under the real HF names, sharded like save_pretrained; returns bytes."""
    folder.mkdir(parents=True)
    shapes = {native_to_hf(n): s for n, s in expected_shapes(config).items()}
    names = list(shapes)
    budget = sum(2 * torch.Size(s).numel() for s in shapes.values()) / n_shards
    groups, size = [[HF_IGNORED_BUFFERS[0]]], 0
    for name in names:
        nbytes = 2 * torch.Size(shapes[name]).numel()
        if groups[-1] and size + nbytes > budget * 1.01 and len(groups) < n_shards:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for file, group in zip(shard_names(len(groups)), groups, strict=True):
        tensors = {n: rotary_inv_freq(config, torch.bfloat16) if n in HF_IGNORED_BUFFERS
                   else torch.randn(shapes[n], generator=gen, dtype=torch.bfloat16) * 0.02 for n in group}
        write_file(folder / file, tensors, {"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({n: file for n in group})
        del tensors
    (folder / INDEX_FILE).write_text(index_json(weight_map, total))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return total


# --- workers: each runs in a fresh interpreter ---------------------------------------------------

def _peak_rss() -> int:
    """Peak RSS of this process in bytes: VmHWM where Linux has it, else ru_maxrss.

    ru_maxrss alone misleads in a subprocess: it also keeps the RSS the forking parent had at
    exec time, and the reset below does not clear that part; VmHWM is this process's own peak."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) * 1024
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets the high-water mark to the current RSS, so the
    import-time peak does not hide part of the increase we measure."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def evict(folder: Path) -> None:
    """Drop the folder's (clean, fsynced) pages from the page cache: the next read comes from disk."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def worker(mode: str, path: Path, extra: Path | None) -> dict:
    from safetensors.torch import load_file

    from glm4v_conversion.convert import convert
    from glm4v_core.checkpoint import load_model
    from glm4v_core.config import GLM4VConfig
    from glm4v_core.model.glm4v import GLM4V
    reset = _reset_peak_rss()
    base = _peak_rss()
    start = time.perf_counter()
    if mode in ("ours", "ours+touch"):
        model = load_model(path, dtype=torch.bfloat16)
        if mode == "ours+touch":
            for p in model.parameters():
                p.max()  # reads every page of every weight once
    elif mode == "naive":
        torch.set_default_dtype(torch.bfloat16)
        model = GLM4V(GLM4VConfig.from_json(path / "config.json")).to_empty(device="cpu")  # allocate, then copy in
        state = {}
        for shard in sorted(path.glob("model-*.safetensors")):
            state.update(load_file(shard))
        model.load_state_dict(state, strict=True)
    elif mode in ("convert", "convert-back"):
        result = convert(path, extra, to="native" if mode == "convert" else "hf")
        return {"seconds": time.perf_counter() - start, "rss": _peak_rss() - base, "hwm_reset": reset,
                "verified": result.verified}
    return {"seconds": time.perf_counter() - start, "rss": _peak_rss() - base, "hwm_reset": reset}


def run_worker(mode: str, path: Path, extra: Path | None = None, cold: bool = False, repeats: int = 1) -> dict:
    """Best time of `repeats` fresh-process runs, with the largest peak RSS increase seen."""
    runs = []
    for _ in range(repeats):
        if cold:
            evict(path)
        cmd = [sys.executable, __file__, "--worker", mode, "--path", str(path)]
        cmd += ["--extra", str(extra)] if extra else []
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["seconds"])
    return {**best, "rss": max(r["rss"] for r in runs), "repeats": repeats}


# --- report ------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.5, help="synthetic checkpoint size (default 1.5)")
    ap.add_argument("--repeats", type=int, default=2, help="fresh-process runs per load row; best time kept")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "load_cpu.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--extra", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.path, args.extra)))
        return

    with tempfile.TemporaryDirectory(prefix="glm4v-load-bench-") as tmp:
        hf, native, back = Path(tmp) / "hf", Path(tmp) / "native", Path(tmp) / "hf-back"
        config = mid_size_config(args.size_gb)
        t = time.perf_counter()
        size = write_synthetic_hf(hf, config)
        print(f"synthetic checkpoint: {size / 1e9:.2f} GB bf16, {config['num_layers']} decoder layers "
              f"(hidden {config['hidden_size']}), {config['vision_config']['num_hidden_layers']} ViT layers, "
              f"written in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        rows = {"convert hf->native": run_worker("convert", hf, native),
                "convert native->hf": run_worker("convert-back", native, back)}
        for mode in ("ours", "ours+touch", "naive"):
            rows[f"load {mode} (native)"] = run_worker(mode, native, repeats=args.repeats)
        rows["load ours+touch (hf)"] = run_worker("ours+touch", hf, repeats=args.repeats)
        for mode in ("ours+touch", "naive"):
            rows[f"load {mode} (native, cold)"] = run_worker(mode, native, cold=True, repeats=args.repeats)
    naive = rows["load naive (native)"]

    print(f"device: cpu ({cpu_name()}, {torch.get_num_threads()} threads), checkpoint {size / 1e9:.2f} GB bf16; "
          "page cache warm unless 'cold'")
    print(f"{'step':<32} | {'seconds':>8} | {'GB/s':>6} | {'peak RSS +GB':>12} | {'x ckpt':>6} | {'vs naive':>8}")
    for name, r in rows.items():
        speed = f"{size / 1e9 / r['seconds']:.2f}"
        base = rows["load naive (native, cold)"] if "cold" in name else naive
        vs = f"{base['seconds'] / r['seconds']:.1f}x" if name.startswith("load") else ""
        print(f"{name:<32} | {r['seconds']:8.2f} | {speed:>6} | {r['rss'] / 1e9:12.2f} | "
              f"{r['rss'] / size:6.2f} | {vs:>8}")
    result = {
        "benchmark": "load", "checkpoint_bytes": size,
        "config": {k: config[k] for k in ("hidden_size", "num_layers", "ffn_hidden_size", "padded_vocab_size")},
        "page_cache": "warm, except rows marked cold (evicted with posix_fadvise DONTNEED first)",
        "peak_rss_method": "peak RSS after the step minus peak RSS after the imports, in a fresh process; the "
                           "high-water mark is reset after the imports (/proc/self/clear_refs = 5) and read as "
                           "VmHWM (ru_maxrss of a subprocess also holds its parent's RSS at fork/exec)",
        "results": {name: {"seconds": round(r["seconds"], 4), "peak_rss_increase_bytes": r["rss"],
                           "rss_over_checkpoint": round(r["rss"] / size, 4),
                           "gb_per_s": round(size / 1e9 / r["seconds"], 3),
                           "hwm_reset": r["hwm_reset"], "repeats": r.get("repeats", 1),
                           **({"verified": r["verified"]} if "verified" in r else {})} for name, r in rows.items()},
        "speedup_vs_naive": {name: round((rows["load naive (native, cold)"] if "cold" in name else naive)["seconds"]
                                         / r["seconds"], 2) for name, r in rows.items()
                             if name.startswith("load") and "naive" not in name},
    }
    write_result(args.out.stem, result, args.out.parent)


if __name__ == "__main__":
    main()
