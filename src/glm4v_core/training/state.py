"""What a fine-tuning run keeps on disk and reads back: checkpoints and the loss log (no pickle).

OUT/checkpoints/step-00000N/, each folder published atomically (written into a hidden sibling,
renamed when complete; a Ctrl-C during the write waits until it is done):
    trainable.safetensors   the trained tensors: LoRA adapters (glm4v_core.transforms.lora's adapter file) or,
                            for a full fine-tune, every trained parameter under its model name
    optimizer.safetensors   AdamW state as `<parameter name>.<exp_avg | exp_avg_sq | step>`
    rng.safetensors         torch RNG states `cpu` (and `cuda`): dropout continues where it stopped
    trainer.json            step, total steps, the run's arguments, the optimizer's param groups
OUT/loss.jsonl: one JSON line per step and per evaluation; OUT/loss.png: its plot.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from glm4v_conversion.atomic import staged_file, staging
from glm4v_core.errors import GLM4VError
from glm4v_core.transforms.dtensor import whole
from glm4v_core.transforms.lora import atomic_save_file

CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer.json")
# Arguments that must not change on --resume: they shape the model, the data or the curve.
RESUME_FIXED = ("lora_rank", "lora_alpha", "lora_dropout", "lora_shared_fused", "train", "lr", "weight_decay",
                "warmup_steps", "schedule", "epochs", "max_steps", "batch_size", "grad_accum", "max_grad_norm",
                "dtype", "seed", "train_on", "max_length", "shuffle")


class ResumeError(GLM4VError):
    """A checkpoint that cannot be resumed by this run; the message says which file or argument."""


def write_checkpoint(dst: Path, write_trained: Callable[[Path], None], optimizer: tuple[dict, list[dict]],
                     rng: dict[str, torch.Tensor], state: dict) -> Path:
    """Write one checkpoint folder atomically; `optimizer` is what optimizer_tensors returns."""
    with deferred_interrupt(), staging(dst) as tmp:
        write_trained(tmp / "trainable.safetensors")
        tensors, groups = optimizer
        atomic_save_file(tensors, tmp / "optimizer.safetensors", {"format": "glm4v-finetune"})
        atomic_save_file(rng, tmp / "rng.safetensors", {"format": "glm4v-finetune"})
        (tmp / "trainer.json").write_text(json.dumps({**state, "param_groups": groups}, indent=1) + "\n")
    return dst


Place = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (whole stored tensor, the tensor it fills) -> its value


def on_device(stored: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return stored.to(like.device)


def read_checkpoint(folder: Path, trained: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    names: list[str], place: Place = on_device) -> tuple[dict, dict[str, torch.Tensor]]:
    """Fill `trained` (name -> tensor, in place) and the optimizer from a checkpoint folder;
    returns (trainer.json's contents, the RNG states). `place` turns a stored (whole) tensor into
    the layout of the tensor it fills: moved to its device, or this rank's shard of it (FSDP)."""
    state = json.loads((folder / "trainer.json").read_text())
    with safe_open(str(folder / "trainable.safetensors"), framework="pt") as f:
        stored = set(f.keys())
        if stored != set(trained):
            mismatched = sorted(stored ^ set(trained))
            raise ResumeError(f"{folder}: trained tensors do not fit this run (e.g. {mismatched[:3]})")
        with torch.no_grad():
            for name, t in trained.items():
                t.copy_(place(f.get_tensor(name), t))
    with safe_open(str(folder / "optimizer.safetensors"), framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    load_optimizer(optimizer, names, tensors, state["param_groups"], place)
    with safe_open(str(folder / "rng.safetensors"), framework="pt") as f:
        rng = {n: f.get_tensor(n) for n in f.keys()}
    return state, rng


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict, list[dict]]:
    """AdamW state as {<param name>.<key>: whole tensor} plus the JSON-able param groups (no pickle)."""
    sd = optimizer.state_dict()
    tensors = {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"{names[index]}.{key}"] = whole(torch.as_tensor(value)).detach().cpu().contiguous()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer(optimizer: torch.optim.Optimizer, names: list[str], tensors: dict, groups: list[dict],
                   place: Place = on_device) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"]]  # in `names` order
    state = {}
    for index, name in enumerate(names):
        keys = {k[len(name) + 1:] for k in tensors if k.startswith(name + ".") and "." not in k[len(name) + 1:]}
        if keys:
            state[index] = {k: tensors[f"{name}.{k}"] if k == "step" else place(tensors[f"{name}.{k}"], params[index])
                            for k in keys}
    param_groups = [{**{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()},
                     "params": list(range(len(names)))} for g in groups]
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


class deferred_interrupt:
    """Hold a Ctrl-C that arrives inside the block and raise it when the block ends."""

    def __enter__(self):
        self.pending = False
        try:
            self.previous = signal.signal(signal.SIGINT, lambda *_: setattr(self, "pending", True))
        except ValueError:  # not the main thread: signals cannot be caught here anyway
            self.previous = None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        if self.pending and exc[0] is None:
            raise KeyboardInterrupt
        return False


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
    return found[-1] if found else None


def find_resume(path: Path) -> Path:
    """An output folder (its latest checkpoint) or a checkpoint folder itself."""
    folder = path if (path / "trainer.json").is_file() else latest_checkpoint(path)
    if folder is None:
        raise ResumeError(f"--resume {path}: no checkpoint there (expected {path}/checkpoints/step-N "
                            "or a folder holding trainer.json)")
    missing = [f for f in CHECKPOINT_FILES if not (folder / f).is_file()]
    if missing:
        raise ResumeError(f"--resume: checkpoint {folder} is incomplete, missing {missing}")
    return folder


def check_resume_args(folder: Path, args: argparse.Namespace) -> None:
    saved = json.loads((folder / "trainer.json").read_text())["args"]
    changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {getattr(args, k)!r}" for k in RESUME_FIXED
               if saved.get(k) != getattr(args, k)]
    if changed:
        raise ResumeError(f"--resume {folder}: these arguments differ from the interrupted run, so the "
                            f"curve could not continue: {', '.join(changed)}")


def keep_log_until(source: Path, dst: Path, step: int) -> None:
    """dst's log = source's lines up to `step` (a resumed run drops what came after its checkpoint;
    resumed into a new folder, it starts from the old folder's lines)."""
    lines = []
    if step > 0 and source.exists():
        lines = [line for line in source.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    with staged_file(dst) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))


def read_log(path: Path) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of a loss.jsonl."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]


def plot_loss(log: Path, png: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed, so no {png.name}; the curve is in {log}", file=sys.stderr)
        return None
    train, evals = read_log(log)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over counted tokens)")
    ax.legend()
    with staged_file(png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")  # the temporary's name says nothing of the format
        plt.close(fig)
    return png
