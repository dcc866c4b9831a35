"""FinetuneConfig: every option of a fine-tuning run, documented and checked in one place.
"""
from __future__ import annotations

import fnmatch
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from glm4v_core.checkpoint import build_meta_model, check_device
from glm4v_core.config import GLM4VConfig
from glm4v_core.errors import GLM4VError
from glm4v_core.training.data import ON_BAD_RECORD, TRAIN_ON
from glm4v_core.transforms import adapter_files, lora
from glm4v_core.transforms.adapter_files import ADAPTER_FORMATS

PARTS = {"vision": "vision", "projector": "projector", "decoder": "text"}  # --train name -> module


SCHEDULES = ("cosine", "linear", "constant")
DTYPE_CHOICES = ("auto", "float32", "bfloat16")


class FinetuneError(GLM4VError):
    """A fine-tuning request that cannot run; the message says which argument or file and why."""


@dataclass(frozen=True)
class FinetuneConfig:
    """The options of one fine-tuning run (the flags of `glm4v finetune`, dashes for underscores).
    Checked when made: a bad value raises FinetuneError naming the flag and what it accepts."""

    data: Path                              # training JSONL (format: glm4v_core.training.data)
    out: Path                               # output folder: loss.jsonl, loss.png, checkpoints/, adapters
                                            # (what it may hold: glm4v_core.training.output.check_out)
    checkpoint: Path | None = None          # base checkpoint folder; None: the bundled demo checkpoint
    tokenizer: Path | None = None           # tokenizer.model; None: as `glm4v generate` resolves it
    eval_data: Path | None = None           # held-out JSONL: its loss is logged
    resume: Path | None = None              # an output folder (its latest checkpoint) or one step-N folder
    lora_rank: int = 8                      # adapter rank; 0 = full fine-tune
    lora_alpha: float = 16.0                # the adapter update is scaled by alpha / rank
    lora_dropout: float = 0.0
    lora_shared_fused: bool = False         # one adapter over each fused qkv / gate_up layer, not one per part
    train: str = "decoder"                  # comma-separated parts: vision, projector, decoder
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"                # one of SCHEDULES (cosine to 10% of lr, linear to 0, constant)
    epochs: int = 1
    max_steps: int | None = None            # optimizer steps; None: epochs worth
    batch_size: int = 1                     # samples per micro-batch (global under FSDP)
    grad_accum: int = 1                     # micro-batches per optimizer step
    max_grad_norm: float = 1.0              # gradient-norm clip; 0 = off
    dtype: str = "auto"                     # base weights: float32, bfloat16, or auto (bf16 on CUDA, fp32 on CPU)
    device: str | None = None               # None: cuda if there is one, else cpu
    fsdp: int = 1                           # ranks sharded with FSDP2 (must divide batch_size)
    gradient_checkpointing: bool = False    # recompute blocks in backward
    seed: int = 0
    shuffle: bool = True                    # False: keep the file order
    train_on: str = "assistant"             # which tokens carry labels (glm4v_core.training.data.TRAIN_ON)
    max_length: int | None = None           # refuse longer samples; None: the config's seq_length
    on_bad_record: str = "skip"             # glm4v_core.training.data.ON_BAD_RECORD
    save_every: int = 0                     # checkpoint every N steps; 0: only at the end
    keep_last: int | None = None            # keep the N newest checkpoints (>= 1); None: keep all
    eval_every: int = 0                     # held-out loss every N steps; 0: only at the end
    save_merged: bool = False               # LoRA: also write OUT/merged, a full checkpoint
    adapter: Path | None = None             # start from these adapters (glm4v file / finetune OUT / PEFT folder):
                                            # their layers, ranks, scales and fused layout; lora_rank, lora_alpha,
                                            # lora_shared_fused and train stay at their defaults
    adapter_format: str = "glm4v"           # the final adapters: glm4v (OUT/adapter.safetensors) or peft (OUT/adapter/)
    progress: bool = True                   # a progress bar on rank 0

    def __post_init__(self) -> None:
        paths = ("data", "out", "checkpoint", "tokenizer", "eval_data", "resume", "adapter")
        for name in paths:  # str from Python callers
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        self.check()

    def check(self) -> None:
        """Every check that needs no file read beyond existence; the messages name the command's flags."""
        parts = self.train.split(",")
        bad = [p for p in parts if p not in PARTS]
        if bad or not parts:
            raise FinetuneError(f"--train {self.train!r}: unknown part(s) {bad}; choose from {list(PARTS)}")
        positive = {"--batch-size": self.batch_size, "--grad-accum": self.grad_accum, "--epochs": self.epochs}
        if self.max_steps is not None:
            positive["--max-steps"] = self.max_steps
        for flag, value in positive.items():
            if value < 1:
                raise FinetuneError(f"{flag} must be >= 1, got {value}")
        for flag, value in {"--lora-rank": self.lora_rank, "--warmup-steps": self.warmup_steps,
                            "--save-every": self.save_every, "--eval-every": self.eval_every}.items():
            if value < 0:
                raise FinetuneError(f"{flag} must be >= 0, got {value}")
        for flag, value, accepted in (("--schedule", self.schedule, SCHEDULES), ("--dtype", self.dtype, DTYPE_CHOICES),
                                      ("--train-on", self.train_on, TRAIN_ON),
                                      ("--on-bad-record", self.on_bad_record, ON_BAD_RECORD)):
            if value not in accepted:
                raise FinetuneError(f"{flag} {value!r}: choose from {list(accepted)}")
        check_numbers(self)
        check_adapter_options(self)
        if self.keep_last is not None and not (type(self.keep_last) is int and self.keep_last >= 1):
            raise FinetuneError(f"--keep-last {self.keep_last!r}: must be an integer >= 1 (the newest checkpoints "
                                "kept), or left out to keep all")
        if self.save_merged and self.lora_rank == 0:
            raise FinetuneError("--save-merged is for LoRA runs; a full fine-tune always writes OUT/model")
        if not self.data.is_file():
            raise FinetuneError(f"--data {self.data} is not a file")
        if self.eval_data is not None and not self.eval_data.is_file():
            raise FinetuneError(f"--eval-data {self.eval_data} is not a file")
        check_fsdp(self)


def check_numbers(a: FinetuneConfig) -> None:
    """The training numbers: finite, and in the range where they mean something (argparse's float
    takes "nan" and "inf"; a NaN compares false with everything, so each test is written to fail
    on it). A LoRA rank above the layers it wraps is checked once the model is built (trainer.py)."""
    def finite(flag: str, value: float, low: float, low_ok: bool, accepted: str) -> None:
        if not (math.isfinite(value) and (value >= low if low_ok else value > low)):
            raise FinetuneError(f"{flag} {value}: must be {accepted}")

    finite("--lr", a.lr, 0.0, False, "a finite number > 0")
    finite("--lora-alpha", a.lora_alpha, 0.0, False, "a finite number > 0 (the adapter update is scaled by "
           "alpha / rank)")
    finite("--weight-decay", a.weight_decay, 0.0, True, "a finite number >= 0")
    finite("--max-grad-norm", a.max_grad_norm, 0.0, True, "a finite number >= 0 (0 turns clipping off)")
    if not 0.0 <= a.lora_dropout < 1.0:
        raise FinetuneError(f"--lora-dropout {a.lora_dropout}: must be in [0, 1) (the share of adapter inputs "
                            "zeroed in training)")
    if a.max_length is not None and a.max_length < 1:
        raise FinetuneError(f"--max-length {a.max_length}: must be >= 1 (decoder rows per sample), or left out "
                            "for the config's seq_length")


def check_adapter_options(a: FinetuneConfig) -> None:
    """--adapter-format, and --adapter without the flags whose values it brings (left at their defaults, they
    are taken from the file; any other value is refused: the file and the flag would disagree)."""
    if a.adapter_format not in ADAPTER_FORMATS:
        raise FinetuneError(f"--adapter-format {a.adapter_format!r}: choose from {list(ADAPTER_FORMATS)}")
    if a.adapter is None:
        return
    if not a.adapter.exists():
        raise FinetuneError(f"--adapter {a.adapter} does not exist; give a PEFT adapter folder, a glm4v finetune --out "
                            "folder or its adapter.safetensors")
    defaults = {f.name: f.default for f in fields(a)}
    given = [f"--{k.replace('_', '-')}" for k in ("lora_rank", "lora_alpha", "lora_shared_fused", "train")
             if getattr(a, k) != defaults[k]]
    if given:
        raise FinetuneError(f"--adapter {a.adapter}: {', '.join(given)} cannot be combined with it: the adapters' "
                            "layers, rank, alpha and fused layout come from the file (leave those flags out)")


def check_start_adapter(a: FinetuneConfig, config: GLM4VConfig) -> None:
    """--adapter fits the base (checked on a meta-device model: no weight is read) and --adapter-format can hold it."""
    if a.adapter is None:
        return
    try:
        adapters = adapter_files.check_adapters(build_meta_model(config), adapter_files.resolve_adapter(a.adapter))
    except lora.LoRAError as e:
        raise FinetuneError(f"--adapter {a.adapter}: {e}") from None
    if adapters.config is None and a.adapter_format == "glm4v":
        raise FinetuneError(f"--adapter {a.adapter}: {adapter_files.PER_LAYER}; add --adapter-format peft")


def check_fsdp(a: FinetuneConfig) -> None:
    """--fsdp N: at least 1, at most one rank per GPU (CUDA) or per CPU core, and a divisor of the
    global micro-batch --batch-size (each rank takes batch-size / N samples of it)."""
    if a.fsdp < 1:
        raise FinetuneError(f"--fsdp must be >= 1 (the number of ranks), got {a.fsdp}")
    if a.fsdp == 1:
        return
    device = check_device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and a.fsdp > torch.cuda.device_count():
        raise FinetuneError(f"--fsdp {a.fsdp} needs {a.fsdp} GPUs (one per rank), this machine has "
                            f"{torch.cuda.device_count()}")
    cores = len(os.sched_getaffinity(0))
    if device.type == "cpu" and a.fsdp > cores:
        raise FinetuneError(f"--fsdp {a.fsdp} on the CPU runs {a.fsdp} processes of at least one core each; "
                            f"this machine gives {cores} core(s)")
    if device.type not in ("cpu", "cuda"):
        raise FinetuneError(f"--fsdp runs on CUDA (NCCL) or the CPU (gloo), not on --device {a.device}")
    if a.batch_size % a.fsdp:
        raise FinetuneError(f"--fsdp {a.fsdp} must divide --batch-size {a.batch_size} (the global micro-batch: "
                            f"each rank takes batch-size / N of its samples)")


def check_lora_rank(model: nn.Module, config: lora.LoRAConfig) -> None:
    """A rank above min(in, out) of a wrapped layer (of each part of a fused one, split) adds
    nothing but cost: refuse it, naming the smallest targeted layer. Before add_lora allocates."""
    smallest = None
    for name, m in model.named_modules():
        if not (lora.is_linear(m) and any(fnmatch.fnmatchcase(name, p) for p in config.targets)):
            continue
        parts = (getattr(m, "parts", None) if config.split_fused else None) or (m.out_features,)
        for k, out in enumerate(parts):
            if smallest is None or min(m.in_features, out) < smallest[0]:
                where = f"{name} (part {k + 1} of {len(parts)} of its fused output)" if len(parts) > 1 else name
                smallest = (min(m.in_features, out), where, m.in_features, out)
    if smallest is not None and config.rank > smallest[0]:
        size, where, n_in, n_out = smallest
        raise FinetuneError(f"--lora-rank {config.rank} is larger than a layer it would wrap: {where} has {n_in} "
                            f"inputs and {n_out} outputs, so a rank above {size} adds nothing; choose --lora-rank "
                            f"<= {size} (the smallest layer --train targets)")


def learning_rate(step: int, args: FinetuneConfig, total: int) -> float:
    """LR of optimizer step `step` (0-based): linear warmup, then the schedule over the rest."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
    if args.schedule == "cosine":
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    if args.schedule == "linear":
        return args.lr * (1 - progress)
    return args.lr


