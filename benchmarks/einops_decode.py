"""Decode speed with the decoder's einops head split / merge against the view chains they
replaced, side by side in one process on the mid-size random model (benchmarks/generate.py).

    python benchmarks/einops_decode.py [--pairs 9] [--new-tokens 48] [--threads 2] [--compiled]

The "views" variant runs the attention forward as it was before the patterns (kept verbatim below
as the baseline) on a copy of the same model; every pair runs einops then views on the same
prompt, so a busy machine slows both alike. --compiled times the compiled decode step
(`compile=True`) of both instead, after one warm-up run each that compiles it. Reported: decode
ms/token (after the first token) per variant, median and spread, and the median of the per-pair
ratios einops / views.
"""
from __future__ import annotations

import argparse
import copy as copy_module
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from generate import mid_size_config, random_model  # noqa: E402

from glm4v_core import stream_tokens  # noqa: E402
from glm4v_core.model.decoder import apply_rotary  # noqa: E402
from glm4v_core.model.ops import attention  # noqa: E402


def views_forward(self, x, rope, keys, cache=None, slots=None):
    """decoder.Attention.forward before the einops patterns (the baseline)."""
    B, T, _ = x.shape
    qk, v = self.qkv(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
    qk = qk.view(B, T, self.num_heads + self.num_kv, self.head_dim).transpose(1, 2)
    q, k = apply_rotary(qk, *rope).split([self.num_heads, self.num_kv], dim=1)
    v = v.view(B, T, self.num_kv, self.head_dim).transpose(1, 2)
    if cache is not None:
        k_all, v_all = cache.write(self.layer_idx, slots, k, v)
        if keys.end is not None:
            k, v = k_all, v_all
    out = attention(q, k, v, causal=True, key_start=keys.start, key_end=keys.end)
    return self.out(out.transpose(1, 2).reshape(B, T, self.q_size))


def with_views(model):
    """A copy of the model whose decoder attention runs the view chains (per instance: each copy
    keeps its own compiled step)."""
    copy = copy_module.deepcopy(model)
    for layer in copy.text.layers:
        layer.attn.forward = types.MethodType(views_forward, layer.attn)
    return copy


def decode_ms(model, ids: torch.Tensor, new_tokens: int, compile: bool = False) -> tuple[float, torch.Tensor]:
    """ms per token after the first (the loop syncs on the host every step, so wall time is honest)."""
    steps, first = [], None
    for step in stream_tokens(model, ids, max_new_tokens=new_tokens, stop_ids=[], compile=compile):
        steps.append(step)
        first = first or time.perf_counter()
    return 1000 * (time.perf_counter() - first) / (len(steps) - 1), torch.stack([s.tokens for s in steps], 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=9)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--compiled", action="store_true", help="time the compiled decode step instead of eager")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for dtype_name in args.dtypes.split(","):
        model = random_model(mid_size_config(), torch.device("cpu"), getattr(torch, dtype_name))
        seed = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.pad_token_id, (1, args.prompt_tokens), generator=seed)
        variants = {"einops": model, "views": with_views(model)}
        times = {name: [] for name in variants}
        tokens = {}
        for variant in variants.values():  # warm-up (and, with --compiled, the one-time compile)
            decode_ms(variant, ids, args.new_tokens, args.compiled)
        for _ in range(args.pairs):
            for name, variant in variants.items():
                ms, tokens[name] = decode_ms(variant, ids, args.new_tokens, args.compiled)
                times[name].append(ms)
        ratios = [e / v for e, v in zip(times["einops"], times["views"], strict=True)]
        results[dtype_name] = {
            "decode_ms_per_token": {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}
                                    for k, v in times.items()},
            "ratio_einops_over_views": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
            "same_tokens": bool(torch.equal(tokens["einops"], tokens["views"])),
        }
        ms, ratio = results[dtype_name]["decode_ms_per_token"], results[dtype_name]["ratio_einops_over_views"]
        print(f"{dtype_name}: einops {ms['einops']['median']:.3f} ms/token, views {ms['views']['median']:.3f}; "
              f"ratio median {ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f}), "
              f"same tokens: {results[dtype_name]['same_tokens']}")
    name = "einops_decode_compiled_cpu" if args.compiled else "einops_decode_cpu"
    write_result(name, {"model": "mid-size random (benchmarks/generate.py:mid_size_config)", "compiled": args.compiled,
                        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "pairs": args.pairs,
                        "results": results})


if __name__ == "__main__":
    main()
