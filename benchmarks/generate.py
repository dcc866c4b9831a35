"""End-to-end generation speed: prefill time, time to first token, decode tokens/s, % of bandwidth.

    python benchmarks/generate.py                  # CPU: the tiny and narrow fixtures (fp32)
    python benchmarks/generate.py --real           # + real-size GLM-4V-9B, random bf16 weights (CUDA)
    python benchmarks/generate.py --real --real-layers 1 --device cpu   # smoke test of the real path

Everything goes through glm4v_core.generate.stream_tokens, the loop the library uses; each step
ends with a device sync (the loop reads `finished.all()`), so wall time per step is honest.

Decode roofline (batch B, step at cache length T): a step reads every decoder weight once
(embedding excluded: only B rows are gathered) plus the whole KV cache,
    bytes = decoder_params * elem + layers * 2 * B * kv_groups * T * head_dim * elem
and cannot be faster than bytes / peak HBM bandwidth; % of roofline = (bytes / step time) / peak.
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

from glm4v_core import GLM4VConfig, load_model  # noqa: E402
from glm4v_core.generate import stream_tokens  # noqa: E402
from glm4v_core.weights import build_meta_model  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


def peak_bandwidth(device: torch.device) -> float | None:
    """Datasheet memory bandwidth in bytes/s (common.DATASHEET_PEAKS), None off CUDA or if unknown."""
    match = datasheet_peaks(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return match[2] * 1e9 if match else None


def prompt(config: GLM4VConfig, n_text: int, image: bool, seed: int = 0) -> list[int]:
    """[gMASK] <sop> <|user|> [boi pad eoi] n_text ordinary ids <|assistant|> (the chat template's shape)."""
    special0 = config.pad_token_id  # special ids follow the BPE ranks: <|endoftext|> is the first
    gmask, sop, user, assistant = special0 + 2, special0 + 4, special0 + 7, special0 + 8
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, special0, (n_text,), generator=g).tolist()
    placeholder = [config.boi_token_id, config.pad_token_id, config.eoi_token_id] if image else []
    return [gmask, sop, user, *placeholder, *text, assistant]


def run_once(model, ids, pixels, new_tokens) -> tuple[float, list[float]]:
    """(time to first token, times of every step) in seconds, from the call."""
    start = time.perf_counter()
    times = []
    for step in stream_tokens(model, ids, pixels, max_new_tokens=new_tokens, stop_ids=[]):
        step.tokens.cpu()  # the token is on the host: what a user would see
        times.append(time.perf_counter() - start)
    return times[0], times


def measure(model, n_text: int, batch: int, image: bool, new_tokens: int, repeat: int) -> dict:
    c = model.config
    device = model.text.embed.weight.device
    ids = torch.tensor([prompt(c, n_text, image)] * batch, device=device)
    pixels = None
    if image:
        size = c.vision.image_size
        pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    run_once(model, ids, pixels, 2)  # warm-up: allocator, kernels
    ttfts, decode_steps = [], []
    for _ in range(repeat):
        ttft, times = run_once(model, ids, pixels, new_tokens)
        ttfts.append(ttft)
        decode_steps.append((times[-1] - times[0]) / (len(times) - 1))
    ttft, step_s = statistics.median(ttfts), statistics.median(decode_steps)
    slots = ids.shape[1] + (c.vision.num_image_tokens - 1 if image else 0)
    row = {"prompt_tokens": ids.shape[1], "cache_slots": slots, "image": image, "batch": batch,
           "new_tokens": new_tokens, "ttft_ms": ttft * 1e3, "decode_ms_per_step": step_s * 1e3,
           "decode_tok_s_per_row": 1 / step_s, "decode_tok_s_total": batch / step_s}
    row.update(roofline(model, batch, slots + new_tokens // 2, step_s))
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


def random_real_model(device: torch.device, dtype: torch.dtype, layers: int | None) -> torch.nn.Module:
    """GLM-4V-9B's real config with random weights made on the device (no download, no host copy)."""
    hf = json.loads((FIXTURES / "real_manifest.json").read_text())["config"]
    if layers is not None:  # a shallower model for smoke tests; widths stay real
        hf = {**hf, "num_layers": layers, "vision_config": {**hf["vision_config"], "num_hidden_layers": layers}}
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


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'prompt':>6} {'slots':>6} {'img':>4} {'B':>3} {'TTFT ms':>9} {'ms/step':>8} {'tok/s/row':>10} "
          f"{'tok/s':>8} {'GB/s':>8} {'% peak':>7}")
    for r in rows:
        pct = f"{r['pct_of_bandwidth_roofline']:.1f}" if r["pct_of_bandwidth_roofline"] is not None else "-"
        print(f"{r['prompt_tokens']:>6} {r['cache_slots']:>6} {'yes' if r['image'] else 'no':>4} {r['batch']:>3} "
              f"{r['ttft_ms']:>9.2f} {r['decode_ms_per_step']:>8.2f} {r['decode_tok_s_per_row']:>10.1f} "
              f"{r['decode_tok_s_total']:>8.1f} {r['achieved_GB_s']:>8.2f} {pct:>7}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixtures", default="tiny,narrow", help="fixture checkpoints to time ('' for none)")
    p.add_argument("--prompt-lengths", default="16,128,512,2048", help="text tokens per prompt (fixtures)")
    p.add_argument("--batches", default="1,8", help="batch sizes (fixtures)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3, help="runs per point; the median is reported")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--real", action="store_true", default=torch.cuda.is_available(),
                   help="also time the real-size model with random weights (default on CUDA)")
    p.add_argument("--real-layers", type=int, default=None, help="shrink the real model's depth (smoke tests)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results: dict = {"new_tokens": args.new_tokens, "fixtures": {}, "real": None}

    for name in filter(None, args.fixtures.split(",")):
        model = load_model(FIXTURES / name, dtype=torch.float32, device=device)
        rows = [measure(model, n, b, False, args.new_tokens, args.repeat)
                for n in map(int, args.prompt_lengths.split(",")) for b in map(int, args.batches.split(","))]
        rows += [measure(model, 100, b, True, args.new_tokens, args.repeat) for b in map(int, args.batches.split(","))]
        results["fixtures"][name] = rows
        print_table(f"{name} fixture, fp32, {device}", rows)

    if args.real:
        dtype = torch.bfloat16
        model = random_real_model(device, dtype, args.real_layers)
        rows = [measure(model, 100, b, True, args.new_tokens, args.repeat) for b in (1, 8)]
        results["real"] = {"dtype": str(dtype), "layers": model.config.num_layers, "rows": rows,
                           "note": "random weights; TTFT = ViT on one 1120x1120 image per row + 100-token prefill"}
        print_table(f"GLM-4V-9B real size ({model.config.num_layers} decoder layers), random bf16 weights, {device}",
                    rows)
        del model

    slug = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).lower().replace(" ", "-")
    write_result(f"generate_{slug}", results)


if __name__ == "__main__":
    main()
