"""The memory planner (glm4v_core.training.memory) against measured peaks, and its goals for the real 9B.

CPU (default): for the bundled tiny checkpoint and the mid-size random one (benchmarks/generate.py's
mid_size_config: a 1024-wide, 8-layer decoder, saved once to a temporary folder, and an int4 copy of
each made by glm4v-convert's quantize_checkpoint), LoRA / full / QLoRA fine-tuning with and without
gradient checkpointing: the real Trainer (glm4v finetune's) on a one-sample JSONL (an image + about
--text-tokens text tokens), each in a fresh process. Measured: the peak above the loaded model over two
trainer steps, after one warm-up step whose optimizer state is then dropped (so the two steps start as
a run's first; the warm-up only keeps oneDNN's primitive cache and other first-use allocations, ~3 MB,
out of the number). Two exact measurements of the same steps:
  measured_bytes         glibc's in-use heap bytes (mallinfo2: arena chunks in use + mmapped chunks),
                         sampled after every op (a TorchDispatchMode), minus the value before: what the
                         process's allocator held, tensors or not, independent of the planner's bookkeeping;
  measured_tensor_bytes  the live tensor storages (LiveBytes, the planner's tracker, on the real tensors).
Predicted: plan_training on the same checkpoint, JSONL and flags for the CPU (`run_peak_bytes`: the
peak above the model as built). Written to results/memory_plan_cpu.json.

--nine-b: the planner's numbers for the real glm-4v-9b config (tests/fixtures/real_manifest.json; no
weights), predicted only, against the goals; results/memory_plan_9b.json.

--device cuda (benchmarks/gpu_session.sh): the real 9B config with random bf16 weights on the GPU,
the same training step as the planner takes (memory_plan.training_step; the CPU rows show it allocates
what the Trainer's step does) and generation; torch.cuda.max_memory_allocated against the planned peak
without the CUDA overhead, and max_memory_reserved and the device's used memory against the whole plan.

    python benchmarks/memory_plan.py                 # CPU validation (a few minutes on 2 cores)
    python benchmarks/memory_plan.py --nine-b        # the 9B goals, predicted
    python benchmarks/memory_plan.py --device cuda   # measured on a GPU
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402
from generate import mid_size_config  # noqa: E402

from glm4v_core import BUNDLED_CHECKPOINT, GLM4V, GLM4VConfig, save_model  # noqa: E402
from glm4v_core.training.memory import LiveBytes  # noqa: E402
from glm4v_core.training.memory_plan import InferenceRequest, TrainingRequest, plan_inference, plan_training  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "tests" / "fixtures" / "real_manifest.json"
IMAGE = REPO / "tests" / "fixtures" / "images" / "gradient_rgb_97x61.png"
MODES = {"lora": {"lora_rank": 8}, "full": {"lora_rank": 0}, "qlora": {"lora_rank": 8}}
GiB = 2**30
# The 9B goals: (name, request, goal in GiB)
GOALS_9B = [
    ("LoRA, bf16 base, checkpointing + chunked loss", dict(gradient_checkpointing=True), 30),
    ("QLoRA, int4 base, checkpointing + chunked loss", dict(gradient_checkpointing=True, quantize="int4"), 12),
    ("LoRA --train vision,decoder, checkpointing", dict(gradient_checkpointing=True, train="vision,decoder"), 40),
    ("LoRA, bf16 base, no checkpointing", dict(), None),
    ("QLoRA, int4 base, no checkpointing", dict(quantize="int4"), None),
    ("full fine-tune of the decoder, checkpointing", dict(gradient_checkpointing=True, lora_rank=0), None),
]
INFERENCE_9B = [("generate, bf16, image + 256 text tokens, 1024 new tokens", dict(max_new_tokens=1024), 30),
                ("generate, int4, image + 256 text tokens, 1024 new tokens", dict(max_new_tokens=1024,
                                                                                   quantize="int4"), 10)]


# --- measuring ---------------------------------------------------------------------------------------

class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _Mallinfo2


def heap_in_use() -> int:
    """Bytes glibc's malloc has handed out and not got back: chunks in use in every arena + mmapped ones."""
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


class HeapPeak(TorchDispatchMode):
    """The most heap_in_use() after any op while active, minus its value on entry."""

    def __enter__(self):
        self.start = self.peak = heap_in_use()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, heap_in_use())
        return out

    @property
    def growth(self) -> int:
        return self.peak - self.start


def measure_trainer(checkpoint: Path, data: Path, out: Path, flags: dict) -> dict:
    """Two steps of glm4v finetune's Trainer after a warm-up step (see the module docstring)."""
    from glm4v_core.training.config import FinetuneConfig
    from glm4v_core.training.trainer import Trainer
    trainer = Trainer(FinetuneConfig(data=data, out=out, checkpoint=checkpoint, max_steps=3, progress=False,
                                     **flags))
    out.mkdir(parents=True, exist_ok=True)
    trainer.train_step()
    trainer.optimizer.state.clear()  # AdamW makes it again at the next step, as in a fresh run
    gc.collect()
    tensors = LiveBytes()
    tensors.ignore([*trainer.model.parameters(), *trainer.model.buffers()])
    with tensors, HeapPeak() as heap:
        for _ in range(2):
            trainer.train_step()
    return {"measured_bytes": heap.growth, "measured_tensor_bytes": tensors.peak}


def worker(spec: dict) -> dict:
    """One row, in its own process: measure, then plan the same run."""
    flags = {**MODES[spec["mode"]], "gradient_checkpointing": spec["checkpointing"]}
    measured = measure_trainer(Path(spec["checkpoint"]), Path(spec["data"]), Path(spec["out"]), flags)
    plan = plan_training(TrainingRequest(checkpoint=Path(spec["checkpoint"]), data=Path(spec["data"]), device="cpu",
                                         **flags))
    row = {"config": spec["config"], "mode": spec["mode"], "flags": finetune_flags(flags), "device": "cpu",
           "predicted_bytes": plan.run_peak_bytes, **measured, "sample_rows": plan.sample_rows,
           "predicted_peak_region": max(plan.phases, key=plan.phases.get)}
    row["error_pct"] = round(100 * (row["predicted_bytes"] / row["measured_bytes"] - 1), 2)
    row["tensor_error_pct"] = round(100 * (row["predicted_bytes"] / row["measured_tensor_bytes"] - 1), 2)
    return row


def finetune_flags(flags: dict) -> str:
    words = [f"--lora-rank {flags['lora_rank']}"]
    return " ".join(words + (["--gradient-checkpointing"] if flags["gradient_checkpointing"] else []))


def make_checkpoints(root: Path, configs: list[str], text_tokens: int) -> tuple[dict[str, dict[str, Path]], Path]:
    """{config: {"float": folder, "int4": folder}} and the one-sample JSONL."""
    from glm4v_conversion.quantize import quantize_checkpoint
    folders = {}
    for name in configs:
        if name == "tiny":
            src = BUNDLED_CHECKPOINT
        else:
            src = root / name
            model = GLM4V.from_config(GLM4VConfig.from_hf(mid_size_config()), seed=0)
            save_model(model, src, layout="hf", dtype=torch.bfloat16)
            del model
        quantize_checkpoint(src, root / f"{name}-int4", "int4", 128)
        folders[name] = {"float": src, "int4": root / f"{name}-int4"}
    data = root / "one.jsonl"
    answer = " ".join(["a smooth red to blue gradient"] * max(1, text_tokens // 6))
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "What is in the picture?",
                                              "image": str(IMAGE)},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return folders, data


def run_cpu(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders, data = make_checkpoints(root, args.configs.split(","), args.text_tokens)
        for config in args.configs.split(","):
            for mode in args.modes.split(","):
                for checkpointing in (False, True):
                    folder = folders[config]["int4" if mode == "qlora" else "float"]
                    spec = {"config": config, "mode": mode, "checkpointing": checkpointing, "checkpoint": str(folder),
                            "data": str(data), "out": str(root / f"out-{config}-{mode}-{int(checkpointing)}")}
                    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], check=True,
                                          capture_output=True, text=True)
                    rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                    r = rows[-1]
                    mib = {k: r[k] / 2**20 for k in ("predicted_bytes", "measured_bytes", "measured_tensor_bytes")}
                    print(f"{config:5} {mode:5} {r['flags']:40} predicted {mib['predicted_bytes']:9.2f} MiB  measured "
                          f"{mib['measured_bytes']:9.2f} MiB (tensors {mib['measured_tensor_bytes']:9.2f})  "
                          f"{r['error_pct']:+.2f}%", flush=True)
    write_result("memory_plan_cpu", {"what": "training peak above the loaded model over two trainer steps, CPU, "
                                             "float32 compute; predicted by glm4v_core.training.memory",
                                     "text_tokens": args.text_tokens, "rows": rows}, args.out)


# --- the 9B goals, predicted -------------------------------------------------------------------------

def real_config_file(root: Path) -> Path:
    path = root / "config.json"
    path.write_text(json.dumps(json.loads(MANIFEST.read_text())["config"]))
    return path


def run_nine_b(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        config = real_config_file(Path(tmp))
        for name, flags, goal in GOALS_9B:
            rows.append(goal_row(name, plan_training(TrainingRequest(checkpoint=config, **flags)), goal, flags))
        for name, flags, goal in INFERENCE_9B:
            rows.append(goal_row(name, plan_inference(InferenceRequest(checkpoint=config, **flags)), goal, flags))
    write_result("memory_plan_9b", {"what": "PREDICTED (no measurement) peak memory of the real glm-4v-9b config on "
                                            "CUDA, CUDA context and allocator included: one 1120 px image + 256 text "
                                            "tokens, batch 1, frozen ViT unless said", "rows": rows}, args.out)


def goal_row(name: str, plan, goal: float | None, flags: dict) -> dict:
    row = {"config": "glm-4v-9b (real config.json, no weights)", "what": name, "kind": plan.kind, "flags": flags,
           "predicted_bytes": plan.peak_bytes, "predicted_GiB": round(plan.peak_bytes / GiB, 2),
           "goal_GiB": goal, "meets_goal": None if goal is None else plan.peak_bytes <= goal * GiB,
           "components": plan.components, "phases": plan.phases, "plan_seconds": round(plan.seconds, 1),
           "description": plan.description, "label": "predicted"}
    print(f"{name:60} {plan.peak_bytes / GiB:6.2f} GiB" + (f"  (goal <= {goal} GiB)" if goal else ""), flush=True)
    return row


# --- measured on a GPU -------------------------------------------------------------------------------

def run_cuda(args) -> None:
    """The 9B's real shapes with random bf16 weights: each training row and generation, measured."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        config_file = real_config_file(Path(tmp))
        for name, flags, _ in [*GOALS_9B[:3], *INFERENCE_9B]:
            rows.append(cuda_row(config_file, name, flags))
            print(json.dumps(rows[-1]), flush=True)
            gc.collect()
            torch.cuda.empty_cache()
    write_result(f"memory_plan_{torch.cuda.get_device_name().replace(' ', '-')}", {"rows": rows}, args.out)


def cuda_row(config_file: Path, name: str, flags: dict) -> dict:
    """Plan, then build the model with random weights on the GPU and run what was planned."""
    from glm4v_core.training import memory_plan as mp
    from glm4v_core.training.trainer import make_trainable
    from glm4v_core.transforms.quant import quantize_model
    training = "max_new_tokens" not in flags
    request = (TrainingRequest if training else InferenceRequest)(checkpoint=config_file, **flags)
    plan = plan_training(request) if training else plan_inference(request)
    config = GLM4VConfig.from_json(config_file)
    model = GLM4V.from_config(config, seed=0, dtype=torch.bfloat16, device="cuda").requires_grad_(False)
    if flags.get("quantize"):
        quantize_model(model, flags["quantize"], mp.INT4_GROUP_SIZE)
    sample = mp.synthetic_sample(config, 1, 256, None)
    sample = mp.Sample(**{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in vars(sample).items()})
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()  # the weights stay counted: they are allocated
    if training:
        model = make_trainable(model, request).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=request.lr)  # foreach on CUDA, as the trainer's
        for _ in range(2):  # the second step with AdamW's state in place, as planned
            mp.training_step(model, optimizer, params, sample, request, LiveBytes())
    else:
        generate_like_the_plan(model.eval(), sample, flags["max_new_tokens"])
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    overhead = plan.components["cuda_overhead"]
    row = {"config": "glm-4v-9b shapes, random weights", "what": name, "flags": flags, "device": "cuda",
           "predicted_allocated_bytes": plan.peak_bytes - overhead, "predicted_bytes": plan.peak_bytes,
           "max_memory_allocated": torch.cuda.max_memory_allocated(),
           "max_memory_reserved": torch.cuda.max_memory_reserved(), "device_used_after": total - free}
    row["allocated_error_pct"] = round(100 * (row["predicted_allocated_bytes"] / row["max_memory_allocated"] - 1), 2)
    return row


@torch.no_grad()
def generate_like_the_plan(model: GLM4V, sample, new_tokens: int) -> None:
    """What plan_inference runs: prefill into a cache of prompt + new tokens slots, then decode steps."""
    prompt = model.check_prompt(sample.input_ids, sample.pixel_values, max_new_tokens=new_tokens)
    state = model.prefill(prompt, prompt.spliced_length + new_tokens)
    tokens, positions, slot = state.logits.argmax(-1, keepdim=True), state.positions, state.slot
    for _ in range(2):
        logits = model.decode_step(tokens, positions, slot, state.cache)
        tokens, positions, slot = logits.float().argmax(-1, keepdim=True), positions + 1, slot + 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--nine-b", action="store_true", help="the 9B goals, predicted only")
    p.add_argument("--configs", default="tiny,mid", help="CPU: tiny, mid")
    p.add_argument("--modes", default="lora,full,qlora")
    p.add_argument("--text-tokens", type=int, default=256)
    p.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
    elif args.nine_b:
        run_nine_b(args)
    elif args.device == "cuda":
        run_cuda(args)
    else:
        run_cpu(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
