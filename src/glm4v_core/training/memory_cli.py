"""`glm4v memory` (generation) and `glm4v finetune --plan` (training): the predicted peak memory of a
run at the real shapes of a config, per component, without reading a weight (glm4v_core.training.memory).

    glm4v memory [--checkpoint DIR|config.json] [--quantize int4] [--max-new-tokens 1024] [--device-memory 24GiB]
    glm4v finetune --plan [the run's flags] [--quantize int4] [--plan-text-tokens 256] [--device-memory 24GiB]

The plan is for CUDA unless --device cpu; stdout gets the table, or with --json one object: peak_bytes
(everything, the CUDA context and allocator included), components {name: bytes}, and with
--device-memory fits, and when it does not fit needs_bytes and the cheapest switches that fit
(suggestion). torch is imported only once the arguments are parsed.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from glm4v_conversion import __version__

SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
              "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}
SIZE_HELP = "a size like 24GiB or 24G (2**30 bytes a G), 24GB (10**9 bytes a GB), or a number of bytes"
QUANTIZE = ("int8", "int4")  # glm4v_conversion.quantize.SCHEMES (tests/training/test_memory_plan.py checks)
PLAN_DTYPES = ("auto", "float32", "bfloat16", "float16")


def parse_size(text: str) -> int:
    """'24GiB' / '24G' -> 24 * 2**30, '24GB' -> 24 * 10**9, '1.5TiB', '8000000000'; ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = SIZE_UNITS.get(match[2].lower()) if match else None
    if unit is None or float(match[1]) <= 0:
        raise ValueError(f"{text!r}: expected {SIZE_HELP}, greater than 0")
    return int(float(match[1]) * unit)


def size_argument(text: str) -> int:
    """argparse type of --device-memory: a bad size is a usage error (exit 2) naming what is accepted."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def gib(n: float) -> str:
    """Bytes for people: GiB with 2 decimals, MiB or KiB below 1 GiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def add_plan_target_arguments(p: argparse.ArgumentParser) -> None:
    """--quantize, --device-memory and --json: shared by both commands."""
    p.add_argument("--quantize", choices=QUANTIZE, default=None, help="plan the base quantized to int8 / int4 "
                   "(weight-only, as glm4v-convert --quantize makes it) from a float config (default: as it is)")
    p.add_argument("--device-memory", type=size_argument, default=None, metavar="SIZE", help="the device's memory, "
                   "e.g. 24GiB, 24G, 24GB: say whether the run fits and, if not, the cheapest switches that make "
                   "it fit (default: no check)")
    p.add_argument("--json", action="store_true", help="print one JSON object (default: a table)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glm4v memory", description="The predicted peak memory of generating with a "
                                "checkpoint: one prompt of an image + text per row, then --max-new-tokens tokens "
                                "with the static KV cache. Reads only config.json, never a weight.",
                                epilog="exit status: 0 planned (also when it does not fit); 1 a refused input; "
                                       "2 a usage error.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--checkpoint", type=Path, default=None, metavar="DIR|config.json",
                   help="a checkpoint folder or a bare config.json (default: the bundled demo checkpoint)")
    p.add_argument("--dtype", choices=PLAN_DTYPES, default="auto", help="compute dtype; auto = bfloat16 on "
                   "CUDA, float32 on the CPU (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts at once (default: %(default)s)")
    p.add_argument("--text-tokens", type=int, default=256, help="text tokens of each prompt beside its image "
                   "(default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens generated (default: %(default)s)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="the device planned for "
                   "(default: %(default)s)")
    add_plan_target_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from glm4v_core.errors import REFUSED
    from glm4v_core.training.memory_plan import InferenceRequest
    try:
        request = InferenceRequest(args.checkpoint, args.quantize, args.dtype, args.batch_size, args.text_tokens,
                                   args.max_new_tokens, args.device)
        return report(request, args.device_memory, args.json)
    except REFUSED as e:
        print(f"glm4v memory: error: {e}", file=sys.stderr)
        return 1


def plan_finetune(args: argparse.Namespace) -> int:
    """`glm4v finetune --plan`: the flags of the run, planned instead of run."""
    from glm4v_core.errors import REFUSED
    from glm4v_core.training.memory_plan import TrainingRequest
    try:
        request = TrainingRequest(
            checkpoint=args.checkpoint, data=args.data, tokenizer=args.tokenizer, text_tokens=args.plan_text_tokens,
            quantize=args.quantize, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout, lora_shared_fused=args.lora_shared_fused, train=args.train,
            batch_size=args.batch_size, grad_accum=args.grad_accum, max_grad_norm=args.max_grad_norm,
            dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing, max_length=args.max_length,
            train_on=args.train_on, seed=args.seed, device=plan_device(args.device), lr=args.lr,
            weight_decay=args.weight_decay)
        return report(request, args.device_memory, args.json)
    except REFUSED as e:
        print(f"glm4v finetune: error: {e}", file=sys.stderr)
        return 1


def plan_device(device: str | None) -> str:
    """finetune's --device as a planned device: cuda (the default, and cuda:N) or cpu."""
    from glm4v_core.training.memory_plan import MemoryPlanError
    kind = (device or "cuda").split(":")[0]
    if kind not in ("cuda", "cpu"):
        raise MemoryPlanError(f"--device {device}: --plan plans for cuda or cpu")
    return kind


def report(request, memory: int | None, as_json: bool) -> int:
    """Plan, search when a device memory is given, print; 0 whether or not it fits."""
    from glm4v_core.training import memory_search
    from glm4v_core.training.memory_plan import TrainingRequest, plan_inference, plan_training
    training = isinstance(request, TrainingRequest)
    plan = plan_training(request) if training else plan_inference(request)
    fit = None
    if memory is not None:
        fit = (memory_search.fit_training if training else memory_search.fit_inference)(memory, request, plan)
    print(json.dumps(as_object(plan, fit)) if as_json else "\n".join(table(plan, fit)), flush=True)
    return 0


def as_object(plan, fit) -> dict:
    out = {"kind": plan.kind, "device": plan.device, "description": plan.description, "peak_bytes": plan.peak_bytes,
           "components": plan.components, "run_peak_bytes": plan.run_peak_bytes, "phases": plan.phases,
           "seconds": round(plan.seconds, 2)}
    if fit is not None:
        out.update(device_memory_bytes=fit.memory, fits=fit.fits)
        if not fit.fits:
            out["needs_bytes"] = plan.peak_bytes
            out["suggestion"] = {"fits": fit.fits_with_switches, "flags": fit.flags, "switches": fit.switches,
                                 "peak_bytes": fit.best.peak_bytes, "plans_made": fit.plans_made}
    return out


def table(plan, fit) -> list[str]:
    from glm4v_core.training.memory import INFERENCE_COMPONENTS, TRAINING_COMPONENTS
    labels = TRAINING_COMPONENTS if plan.kind == "training" else INFERENCE_COMPONENTS
    lines = [f"{plan.description}", f"predicted peak: {gib(plan.peak_bytes)} (planned in {plan.seconds:.1f} s, "
                                     "no weight read)"]
    lines += [f"  {labels[k]:<64} {gib(v):>11}" for k, v in plan.components.items() if v]
    phases = ", ".join(f"{name} {gib(n)}" for name, n in plan.phases.items())
    lines.append(f"  most held during each part, before the CUDA overhead: {phases}")
    if fit is None:
        return lines
    if fit.fits:
        return [*lines, f"fits {gib(fit.memory)} ({gib(fit.memory - plan.peak_bytes)} to spare)"]
    if fit.fits_with_switches:
        return [*lines, f"does not fit {gib(fit.memory)}: needs {gib(plan.peak_bytes)}; fits "
                        f"({gib(fit.best.peak_bytes)}) with: {' '.join(fit.flags)}  [{'; '.join(fit.switches)}]"]
    every = f" ({' '.join(fit.flags)})" if fit.flags else ""
    return [*lines, f"does not fit {gib(fit.memory)}: needs {gib(plan.peak_bytes)}, and still "
                    f"{gib(fit.best.peak_bytes)} with every switch{every}"]
