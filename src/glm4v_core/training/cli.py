"""The `glm4v finetune` command: its flags, turned into a FinetuneConfig, and the ranks it starts.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from glm4v_core.errors import REFUSED
from glm4v_core.training.config import SCHEDULES, FinetuneConfig
from glm4v_core.training.data import ON_BAD_RECORD, TRAIN_ON
from glm4v_core.training.trainer import Trainer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glm4v finetune", description="LoRA / full fine-tuning of GLM-4V on a "
                                "JSONL of conversations (see glm4v_core.training.data for the format).")
    p.add_argument("--checkpoint", type=Path, default=None, help="base checkpoint folder (default: the bundled "
                   "tiny fixture)")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.model (default: as glm4v generate)")
    p.add_argument("--data", type=Path, required=True, help="training JSONL")
    p.add_argument("--eval-data", type=Path, default=None, help="held-out JSONL: its loss is reported")
    p.add_argument("--out", type=Path, required=True, help="output folder (log, curve, checkpoints)")
    p.add_argument("--resume", type=Path, default=None, help="an output folder (its latest checkpoint) or one "
                   "checkpoints/step-N folder to continue from")
    p.add_argument("--lora-rank", type=int, default=8, help="adapter rank; 0 = full fine-tune")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="adapter update scale is alpha / rank")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-shared-fused", action="store_true", help="one adapter over each fused qkv / gate_up "
                   "layer instead of one per part (q, k, v / gate, up)")
    p.add_argument("--train", default="decoder", help="comma-separated parts to train: vision, projector, "
                   "decoder (LoRA: where adapters go; full: which weights train)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: --epochs worth)")
    p.add_argument("--batch-size", type=int, default=1, help="samples per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (0 = off)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="base model dtype (adapters stay float32); auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None)
    p.add_argument("--fsdp", type=int, default=1, metavar="N", help="train on N ranks sharded with FSDP2: N GPUs "
                   "(NCCL), or N CPU processes (gloo) without CUDA; spawned here or the ranks of torchrun. "
                   "N must divide --batch-size (the global micro-batch)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in backward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="keep the file order")
    p.add_argument("--train-on", choices=TRAIN_ON, default="assistant", help="which tokens carry labels")
    p.add_argument("--max-length", type=int, default=None, help="refuse longer samples (decoder rows after "
                   "the image splice; default: the config's seq_length)")
    p.add_argument("--on-bad-record", choices=ON_BAD_RECORD, default="skip")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--eval-every", type=int, default=0, help="held-out loss every N steps (0: only at the end)")
    p.add_argument("--save-merged", action="store_true", help="LoRA: also write OUT/merged, a full checkpoint")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = FinetuneConfig(**vars(args))  # the library takes the dataclass, never the Namespace
        if options.fsdp > 1:
            from glm4v_core.transforms import distributed  # lazy: see glm4v_core.transforms
            device_type = torch.device(options.device).type if options.device else None  # None: cuda if there is one
            return distributed.run_ranks(train_on_rank, options.fsdp, options, device_type=device_type)
        return Trainer(options).run()
    except REFUSED as e:  # every refused input is a GLM4VError / ConversionError with a one-line text
        print(f"glm4v finetune: error: {e}", file=sys.stderr)
        return 1


def train_on_rank(options: FinetuneConfig) -> int:
    """One rank of `glm4v finetune --fsdp N`."""
    return Trainer(options).run()


