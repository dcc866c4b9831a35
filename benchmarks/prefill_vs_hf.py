"""Prefill and decode time on CPU, ours vs the HF reference code, on the same random checkpoint, bf16 and fp32.

    python benchmarks/prefill_vs_hf.py --reference-code DIR [--repeat 10] [--new-tokens 32] [--threads 2]

DIR holds the GLM-4V-9B remote code: `modeling_chatglm.py`, `visual.py` and `configuration_chatglm.py`
from the THUDM/glm-4v-9b Hugging Face repository (they are not part of this repository: download those
three files from the model page, e.g. `huggingface-cli download THUDM/glm-4v-9b modeling_chatglm.py
visual.py configuration_chatglm.py --local-dir DIR`, or take them from a copy; the fixture check below
says whether they are the code the fixtures were recorded with). transformers must be installed (pip install
'.[test]' pulls 4.44.2). Without either, the script says so and exits 0 without writing a result.

What it does: writes a mid-size random bf16 checkpoint in HF layout (~0.36 GB: the mid-size decoder of
benchmarks/generate.py, 8 layers of width 1024, and a 4-layer ViT on 224 px images) to a temp folder,
next to a copy of DIR's code (config.json's auto_map points at it). Each dtype then loads it twice:
ours with `glm4v_core.load_model` (bf16 weights are zero-copy views of the mapped files), HF's with
`AutoModelForCausalLM.from_pretrained(trust_remote_code=True)`. Two prompts: text only (259 tokens)
and one image + 64 text tokens. One prefill = the whole prompt through the model with a KV cache and
the last row's logits: ours `model.prefill`, HF's `model(..., use_cache=True, return_last_logit=True)`
(what HF's generate runs first). Ours and HF's alternate (A B A B ...) in one process; the JSON holds
each side's median and min/max in ms, wall clock and this thread's CPU time, and the ratio ours/HF.
Two more rows of ours: "ours_aligned_copy" loads our weights as fresh 64-byte-aligned copies (it
separates the cost of reading weights through the file mapping from that of the model's own ops), and
"ours_packed" loads them with `pack_cpu=True` (oneDNN-packed bf16 linear weights; a no-op in fp32).
"hf" is HF's decoder with its cache plus its output layer on the last row, the same work as ours;
"hf_forward" is the call HF's generate makes, `model(..., return_last_logit=True)` (see hf_prefill).
"max_abs_logit_diff" compares ours with HF's last-row logits (0.0: the same bits). "fixture_check" first
runs DIR's code and ours on the test fixtures' recorded prompts (whole-sequence logits, fp32 and bf16):
ours against DIR's here, and DIR's here against the recorded reference, which tells whether DIR holds
the code the fixtures came from. "decode_text" / "decode_image": greedy decoding of --new-tokens after
the same prompts, ms per token (the prefill and the first step not counted), ours through the
library's loop (eager; eager on packed weights; compiled on packed weights, what `glm4v generate
--compile` runs in bf16) and HF's forward with its own cache, one token a step; with whether each
gives HF's tokens. "rotary_one_layer"
times one layer's rotary with the cos table broadcast over each (x[2i], x[2i+1]) pair, as it was, and
stored per pair element, as now: in bf16 the broadcast product runs a scalar loop on CPU.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402
from generate import mid_size_config, prompt  # noqa: E402
from load import write_synthetic_hf  # noqa: E402

from glm4v_core import GLM4VConfig, load_model  # noqa: E402
from glm4v_core.generation.loop import stream_tokens  # noqa: E402
from glm4v_core.model.decoder import apply_rotary, rotary_tables  # noqa: E402
from glm4v_core.parity.make_reference import import_transformers, load_reference  # noqa: E402

FIXTURES = Path(__file__).parent.parent / "tests" / "fixtures"
REFERENCE_FILES = ("modeling_chatglm.py", "visual.py", "configuration_chatglm.py")
AUTO_MAP = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}


def missing_requirements(reference_code: Path | None) -> str | None:
    """Why the comparison cannot run here, or None."""
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed (pip install '.[test]')"
    if reference_code is None:
        return "no --reference-code DIR given (the GLM-4V-9B remote code; see this script's docstring)"
    absent = [name for name in REFERENCE_FILES if not (reference_code / name).is_file()]
    if absent:
        return f"--reference-code {reference_code} lacks {', '.join(absent)} (see this script's docstring)"
    return None


def bench_config() -> dict:
    """generate.py's mid-size decoder with a 4-layer ViT of width 512 on 224 px images (256 patches)."""
    config = mid_size_config()
    vision = {**config["vision_config"], "hidden_size": 512, "num_heads": 8, "intermediate_size": 2048,
              "num_hidden_layers": 4, "image_size": 224, "num_positions": 257}
    return {**config, "vision_config": vision, "auto_map": AUTO_MAP, "torch_dtype": "bfloat16"}


def write_checkpoint(folder: Path, reference_code: Path) -> None:
    write_synthetic_hf(folder, bench_config())
    for name in REFERENCE_FILES:
        shutil.copy(reference_code / name, folder / name)


def aligned_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same model with every parameter moved to freshly allocated (64-byte aligned) memory."""
    for p in model.parameters():
        p.data = p.data.clone()
    return model


def aligned_fraction(model: torch.nn.Module) -> float:
    """Share of parameter bytes whose data starts on a 64-byte boundary (a cache line)."""
    params = list(model.parameters())
    total = sum(p.nbytes for p in params)
    return sum(p.nbytes for p in params if p.data_ptr() % 64 == 0) / total


def load_hf(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The checkpoint's remote code through `glm4v make-reference`'s loader (the one place that imports
    transformers): AutoModelForCausalLM.from_pretrained(trust_remote_code=True), eval mode."""
    return load_reference(import_transformers(), folder, dtype, "cpu")


def inputs(config, image: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    ids = torch.tensor([prompt(config, 64 if image else 256, image)])
    size = config.vision.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)) if image else None
    return ids, pixels


def ours_prefill(model, ids, pixels) -> torch.Tensor:
    checked = model.check_prompt(ids, pixels, max_new_tokens=1)
    return model.prefill(checked, checked.spliced_length + 1).logits


def hf_prefill(model, ids, pixels) -> torch.Tensor:
    """HF's decoder with its cache, then its output layer on the last row only, as ours does.

    Not `model(..., return_last_logit=True)`: that hands the output layer a (B, 1, H) slice of the
    hidden states, which torch's matmul does not fold into one product at batch 1 (the slice's strides
    are not those of a contiguous tensor); in bf16 it then copies the whole (V, H) weight every call.
    `hf_forward` times that call as HF's generate makes it."""
    kwargs = {} if pixels is None else {"images": pixels.to(model.dtype)}
    out = model.transformer(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **kwargs)
    return model.transformer.output_layer(out.last_hidden_state[:, -1])


def hf_forward(model, ids, pixels) -> torch.Tensor:
    kwargs = {} if pixels is None else {"images": pixels.to(model.dtype)}
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, return_last_logit=True,
                **kwargs)
    return out.logits[:, -1]


def summary(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3}


def compare(runners: dict, ids, pixels, repeat: int) -> dict:
    """Interleaved timing of every runner on one prompt: wall and thread CPU time per prefill."""
    wall = {name: [] for name in runners}
    cpu = {name: [] for name in runners}
    with torch.no_grad():
        for run in runners.values():
            run(ids, pixels)  # warm-up: first-touch page faults, allocator, jit
        for _ in range(repeat):
            for name, run in runners.items():
                w, c = time.perf_counter(), time.thread_time()
                run(ids, pixels)
                cpu[name].append(time.thread_time() - c)
                wall[name].append(time.perf_counter() - w)
    row = {name: {"wall": summary(wall[name]), "thread_cpu": summary(cpu[name])} for name in runners}
    for name in runners:
        if name != "hf" and name != "hf_forward":
            row[f"{name}_over_hf_wall"] = statistics.median(wall[name]) / statistics.median(wall["hf"])
    return row


def ours_decode(model, ids, pixels, new_tokens: int, compile: bool) -> tuple[float, list[int]]:
    """Seconds per greedy token through the library's loop (stream_tokens), and the tokens. Timed from
    the token after the prefill's to the last, so neither the prefill nor the first step (which
    builds, or compiles, the step) counts."""
    times, tokens = [], []
    for step in stream_tokens(model, ids, pixels, max_new_tokens=new_tokens, stop_ids=[], compile=compile):
        tokens.append(int(step.tokens[0]))
        times.append(time.perf_counter())
    return (times[-1] - times[1]) / (new_tokens - 2), tokens


def hf_decode(model, ids, pixels, new_tokens: int) -> tuple[float, list[int]]:
    """The same for HF's model: its forward with its own cache, one token a step, argmax (what its
    generate(do_sample=False) runs, minus the logits processors); positions count unspliced tokens,
    as its generation code does."""
    kwargs = {} if pixels is None else {"images": pixels.to(model.dtype)}
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, return_dict=True, **kwargs)
        tokens, times = [int(out.logits[0, -1].argmax())], [time.perf_counter()]
        for k in range(1, new_tokens):
            out = model(input_ids=torch.tensor([tokens[-1:]]), position_ids=torch.tensor([[ids.shape[1] + k - 1]]),
                        past_key_values=out.past_key_values, use_cache=True, return_dict=True)
            tokens.append(int(out.logits[0, -1].argmax()))
            times.append(time.perf_counter())
    return (times[-1] - times[1]) / (new_tokens - 2), tokens


def compare_decode(runners: dict, ids, pixels, new_tokens: int, repeat: int) -> dict:
    """Interleaved greedy decoding by every runner: ms per token (median, min, max), whether each
    runner's tokens are HF's, and ours over HF."""
    per_token = {name: [] for name in runners}
    tokens = {name: run(ids, pixels, new_tokens)[1] for name, run in runners.items()}  # warm-up (and compile)
    for _ in range(repeat):
        for name, run in runners.items():
            per_token[name].append(run(ids, pixels, new_tokens)[0])
    row = {name: summary(per_token[name]) for name in runners}
    for name in runners:
        if name != "hf":
            row[f"{name}_same_tokens_as_hf"] = tokens[name] == tokens["hf"]
            row[f"{name}_over_hf"] = statistics.median(per_token[name]) / statistics.median(per_token["hf"])
    return row


def rotary_layouts(dtype: torch.dtype, repeat: int) -> dict:
    """One decoder layer's rotary at the benchmark's prefill shape (q and k heads together, 260 tokens),
    with the cos table broadcast over each pair (its layout before the fix) and stored per pair element
    (now): microseconds per call, median and min, and whether the results are the same bits."""
    config = GLM4VConfig.from_hf(bench_config())
    heads, T = config.num_heads + config.num_kv_groups, 260
    qk = torch.randn(1, T, heads * config.head_dim).to(dtype).view(1, T, heads, config.head_dim).transpose(1, 2)
    cos, sin = rotary_tables(torch.arange(T)[None], config.rotary_dim, 10000.0 * config.rope_ratio, dtype)
    tables = {"cos_broadcast_over_pair": cos[..., :1], "cos_per_pair_element": cos}
    times = {name: [] for name in tables}
    for _ in range(repeat):
        for name, table in tables.items():
            start = time.perf_counter()
            for _ in range(20):
                apply_rotary(qk, table, sin)
            times[name].append((time.perf_counter() - start) / 20)
    same = torch.equal(*(apply_rotary(qk, table, sin) for table in tables.values()))
    return {"same_bits": same, **{name: {"median_us": statistics.median(t) * 1e6, "min_us": min(t) * 1e6}
                                  for name, t in times.items()}}


def fixture_check(reference_code: Path) -> dict:
    """Whether DIR's code is the code the test fixtures were recorded with: each fixture's cases a
    (image + text) and b (text) through DIR's model and ours, fp32 and bf16 (bf16: case a, the only
    one recorded), whole-sequence logits. Per row: max |ours - HF| here, and max |HF here - the
    recorded reference| (not 0: the recording ran on another CPU, whose kernels round differently)."""
    from safetensors.torch import load_file
    rows = {}
    for name in ("tiny", "narrow"):
        fixture = FIXTURES / name
        recorded = load_file(fixture / "reference.safetensors")
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            for f in fixture.glob("model*"):
                shutil.copy(f, folder / f.name)
            config = json.loads((fixture / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config, "auto_map": AUTO_MAP}))
            for code in REFERENCE_FILES:
                shutil.copy(reference_code / code, folder / code)
            for dtype in (torch.float32, torch.bfloat16):
                hf, ours = load_hf(folder, dtype), load_model(fixture, dtype=dtype)
                suffix = "_bf16" if dtype == torch.bfloat16 else ""
                for case in ("a", "b"):
                    if f"logits_{case}{suffix}" not in recorded:
                        continue
                    ids, pixels = recorded[f"input_ids_{case}"], recorded.get(f"pixel_values_{case}")
                    images = {} if pixels is None else {"images": pixels.to(dtype)}
                    with torch.no_grad():
                        theirs = hf(input_ids=ids, return_dict=True, **images).logits.float()
                        mine = ours(ids, None if pixels is None else pixels.to(dtype)).logits.float()
                    rows[f"{name}_{case}{suffix}"] = {
                        "max_abs_ours_vs_hf": float((mine - theirs).abs().max()),
                        "max_abs_hf_vs_recorded":
                            float((theirs - recorded[f"logits_{case}{suffix}"].float()).abs().max())}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference-code", type=Path, default=None, help="folder with the GLM-4V-9B remote code")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--repeat", type=int, default=10,
                   help="timed prefills per side and prompt (decode runs: half as many, at least 3)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per decode run")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--name", default="prefill_vs_hf_cpu", help="result file name under benchmarks/results/")
    p.add_argument("--note", default="",
                   help="free text stored in the result (e.g. where the reference code came from)")
    args = p.parse_args()
    if args.new_tokens < 3:
        p.error(f"--new-tokens must be >= 3 (the first two tokens are not timed), got {args.new_tokens}")
    why = missing_requirements(args.reference_code)
    if why:
        print(f"prefill_vs_hf: skipped: {why}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict = {"reference_code": str(args.reference_code), "note": args.note,
                     "reference_sha256": {name: hashlib.sha256((args.reference_code / name).read_bytes()).hexdigest()
                                          for name in REFERENCE_FILES},
                     "config": None, "fixture_check": fixture_check(args.reference_code), "rows": {}}
    print("fixture check:", json.dumps(results["fixture_check"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        write_checkpoint(folder, args.reference_code)
        results["config"] = {k: v for k, v in json.loads((folder / "config.json").read_text()).items()
                             if k in ("hidden_size", "num_layers", "ffn_hidden_size", "padded_vocab_size",
                                      "vision_config")}
        for dtype_name in filter(None, args.dtypes.split(",")):
            dtype = getattr(torch, dtype_name)
            ours = load_model(folder, dtype=dtype)
            ours_aligned = aligned_copy(load_model(folder, dtype=dtype))
            ours_packed = load_model(folder, dtype=dtype, pack_cpu=True)
            hf = load_hf(folder, dtype)
            # each runner is called as run(ids, pixels)
            runners = {"ours": functools.partial(ours_prefill, ours),
                       "ours_aligned_copy": functools.partial(ours_prefill, ours_aligned),
                       "ours_packed": functools.partial(ours_prefill, ours_packed),
                       "hf": functools.partial(hf_prefill, hf),
                       "hf_forward": functools.partial(hf_forward, hf)}
            rows = {"weights_64B_aligned": {"ours": aligned_fraction(ours), "ours_aligned_copy":
                                            aligned_fraction(ours_aligned), "hf": aligned_fraction(hf)}}
            for kind in ("text", "image"):
                ids, pixels = inputs(ours.config, kind == "image")
                with torch.no_grad():
                    diff = (ours_prefill(ours, ids, pixels).float() - hf_prefill(hf, ids, pixels).float()).abs().max()
                rows[kind] = {"prompt_tokens": ids.shape[1], "max_abs_logit_diff": float(diff),
                              **compare(runners, ids, pixels, args.repeat)}
                print(f"{dtype_name} {kind}: " + ", ".join(
                    f"{n} {rows[kind][n]['wall']['median_ms']:.1f} ms" for n in runners)
                    + f"; ours/hf {rows[kind]['ours_over_hf_wall']:.3f}", flush=True)
            # each decoder is called as run(ids, pixels, new_tokens)
            decoders = {"ours": functools.partial(ours_decode, ours, compile=False),
                        "ours_packed": functools.partial(ours_decode, ours_packed, compile=False),
                        "ours_packed_compiled": functools.partial(ours_decode, ours_packed, compile=True),
                        "hf": functools.partial(hf_decode, hf)}
            for kind in ("text", "image"):
                ids, pixels = inputs(ours.config, kind == "image")
                decode_repeat = max(3, args.repeat // 2)
                rows[f"decode_{kind}"] = {"new_tokens": args.new_tokens,
                                          **compare_decode(decoders, ids, pixels, args.new_tokens, decode_repeat)}
                print(f"{dtype_name} decode {kind}: " + ", ".join(
                    f"{n} {rows[f'decode_{kind}'][n]['median_ms']:.2f} ms/token" for n in decoders), flush=True)
            rows["rotary_one_layer"] = rotary_layouts(dtype, 3 * args.repeat)
            results["rows"][dtype_name] = rows
            # the runners hold the models too: drop them all before the next dtype's models load
            del ours, ours_aligned, ours_packed, hf, runners, decoders
    write_result(args.name, results)


if __name__ == "__main__":
    main()
