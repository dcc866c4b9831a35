"""`glm4v finetune`: LoRA or full fine-tuning on a JSONL of image conversations, resumable.

    glm4v finetune --data train.jsonl --out runs/cat [--checkpoint DIR] [--lora-rank 8]
                   [--train decoder,projector] [--max-steps 100] [--resume runs/cat] [--fsdp N]
    glm4v finetune --plan [the same flags; --data, --out optional] [--quantize int4] [--device-memory 24GiB]
                   (the run's predicted peak memory per component, no weight read: training/memory_cli.py)

Each optimizer step runs --grad-accum micro-batches of --batch-size samples; each micro-batch's
loss is weighted by its share of the step's counted tokens, so the step's loss is the mean over
every counted token of the step, whatever the split. The learning rate warms up linearly over
--warmup-steps, then follows --schedule (cosine to 10% of --lr, linear to 0, or constant).

The output folder OUT:
    loss.jsonl                  one JSON line per step (step, epoch, loss, lr, tokens, tokens_per_s)
                                and per evaluation (step, eval_loss)
    loss.png                    the loss curve (needs matplotlib; skipped with a note otherwise)
    checkpoints/step-00000N/    every --save-every steps, at the end, on Ctrl-C / SIGTERM / SIGHUP, when
                                a step's loss is not finite and on another error during training:
                                trained tensors, AdamW state, RNG states, step (glm4v_core.training.state);
                                --keep-last N keeps the N newest (the older ones go once a newer is complete)
    adapter.safetensors         the final adapters (LoRA runs), or with --adapter-format peft:
    adapter/                    a PEFT LoRA folder (adapter_config.json, adapter_model.safetensors)
    merged/ or model/           with --save-merged (LoRA: adapters merged; over a quantized base, into
                                its dequantized weights) or after a full fine-tune: a checkpoint folder
                                written by save_model (HF layout)

Before anything is written, OUT is checked (glm4v_core.training.output.check_out: a folder holding a
previous run's files is refused unless --resume continues that run) and every number (finite, in
range; a --lora-rank no larger than the smallest layer it wraps, once the model is built), and the
bytes the run will write against the free space of OUT's file system. The run holds OUT's lock (the
converter's destination lock) from its first write to its end; under it, it removes (and reports
in one line) what a killed run's unfinished writes left in OUT, only our own hidden staging names. A step whose
loss or gradient norm is not finite is not applied: the run saves the state before it and stops
with a FinetuneError naming the step and that checkpoint. Any other error during training (out of
memory, a named error; in a step, the evaluation or the final files) saves the last completed step
when the state in memory is one (not mid-update, not under --fsdp) and is a FinetuneError naming
that checkpoint. Under `glm4v finetune`, SIGTERM and SIGHUP stop the run as Ctrl-C does (a
checkpoint, then exit 143 / 129 instead of 130). stderr: a start line (what is trained, on what,
into OUT), held-out losses (through the progress bar), a closing line naming the files written.

--resume OUT (or a checkpoint folder) reloads the latest checkpoint and continues: the data order
is a function of (seed, epoch) and every other state is restored, so the loss curve is the one an
uninterrupted run gives, bit for bit on CPU (same thread count; on CUDA up to the nondeterminism
of its attention backward kernels). No pickle anywhere.

--fsdp N trains on N ranks (N GPUs with NCCL; N CPU processes with gloo without CUDA), spawned
here or started by `torchrun --nproc-per-node N` (with --fsdp N): the model is sharded with FSDP2
(glm4v_core.transforms.distributed.fsdp; LoRA adapters and frozen base weights share the units). --batch-size
stays the *global* micro-batch: rank r takes samples r, r+N, ... of each one and the step's loss
is still the mean over every counted token of the step, so the curve, the checkpoints and the
adapters are the one-process run's (within float rounding), N may change on --resume, and the
files are the one-process format. Rank 0 alone logs and writes (the tensors gathered whole first).
A rank whose share of a micro-batch is empty, or has no image when others have one, runs one
sample of the batch with no counted token: every rank must run the same blocks (FSDP gathers a
block's weights with a collective when it runs). Ctrl-C under --fsdp stops without saving: the
ranks are not at one step; resume from the last --save-every checkpoint. With dropout, a resumed
sharded run restores rank 0's random state on every rank (the curve then differs slightly).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from glm4v_conversion import __version__
from glm4v_core.training.memory_cli import add_plan_target_arguments

if TYPE_CHECKING:
    from glm4v_core.training.config import FinetuneConfig

# torch and the trainer are imported in `main`, after the parse: --help, --version and a usage error answer
# at once. The choices are the library's (glm4v_core.training.config / .data; tests/test_cli.py checks).
SCHEDULES = ("cosine", "linear", "constant")
DTYPE_CHOICES = ("auto", "float32", "bfloat16")
TRAIN_ON = ("assistant", "all")
ON_BAD_RECORD = ("skip", "error")
ADAPTER_FORMATS = ("glm4v", "peft")  # glm4v_core.transforms.adapter_files.ADAPTER_FORMATS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glm4v finetune", description="LoRA / full fine-tuning of GLM-4V on a "
                                "JSONL of conversations (see glm4v_core.training.data for the format).",
                                epilog="exit status: 0 done; 1 a refused input, a non-finite step or another "
                                       "error during training (a checkpoint saved if a step completed); 2 a usage "
                                       "error; 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP (a checkpoint saved when "
                                       "training had started).")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--checkpoint", type=Path, default=None, help="base checkpoint: DIR or ORG/NAME[@REVISION] from "
                   "the local Hugging Face cache (glm4v download) (default: the bundled tiny fixture)")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.model (default: as glm4v generate)")
    p.add_argument("--data", type=Path, default=None, help="training JSONL; with --plan, the file's longest batch "
                   "is planned (required)")
    p.add_argument("--eval-data", type=Path, default=None, help="held-out JSONL: its loss is reported "
                   "(default: none)")
    p.add_argument("--out", type=Path, default=None, help="output folder (log, curve, checkpoints); not needed "
                   "with --plan (required)")
    p.add_argument("--resume", type=Path, default=None, help="an output folder (its latest checkpoint) or one "
                   "checkpoints/step-N folder to continue from (default: none, a fresh run)")
    p.add_argument("--lora-rank", type=int, default=8, help="adapter rank; 0 = full fine-tune "
                   "(default: %(default)s)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="adapter update scale is alpha / rank "
                   "(default: %(default)s)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter inputs, in [0, 1) "
                   "(default: %(default)s)")
    p.add_argument("--lora-shared-fused", action="store_true", help="one adapter over each fused qkv / gate_up "
                   "layer instead of one per part (q, k, v / gate, up) (default: off)")
    p.add_argument("--train", default="decoder", help="comma-separated parts to train: vision, projector, "
                   "decoder (LoRA: where adapters go; full: which weights train) (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of AdamW (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=0, help="steps of linear warm-up to --lr "
                   "(default: %(default)s)")
    p.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="learning rate after the warm-up: "
                   "cosine to 10%% of --lr, linear to 0, or constant (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=1, help="passes over --data (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: --epochs worth)")
    p.add_argument("--batch-size", type=int, default=1, help="samples per micro-batch (default: %(default)s)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step "
                   "(default: %(default)s)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (0 = off) "
                   "(default: %(default)s)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="base model dtype (adapters stay float32); auto = bfloat16 on CUDA, float32 on CPU "
                        "(default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--fsdp", type=int, default=1, metavar="N", help="train on N ranks sharded with FSDP2: N GPUs "
                   "(NCCL), or N CPU processes (gloo) without CUDA; spawned here or the ranks of torchrun. "
                   "N must divide --batch-size (the global micro-batch) (default: %(default)s, one process)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in backward "
                   "(default: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order, the adapters' initialisation "
                   "and dropout (default: %(default)s)")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="keep the file order "
                   "(default: shuffled each epoch)")
    p.add_argument("--train-on", choices=TRAIN_ON, default="assistant", help="which tokens carry labels "
                   "(default: %(default)s)")
    p.add_argument("--max-length", type=int, default=None, help="refuse longer samples (decoder rows after "
                   "the image splice) (default: the config's seq_length)")
    p.add_argument("--on-bad-record", choices=ON_BAD_RECORD, default="skip", help="a record that cannot be "
                   "used: skip it (counted, and named in a warning) or stop with an error (default: %(default)s)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: %(default)s, "
                   "only at the end)")
    p.add_argument("--keep-last", type=at_least_one, default=None, metavar="N", help="after each checkpoint is "
                   "complete, delete this run's older checkpoints/step-* beyond the N newest (N >= 1) (default: "
                   "keep all)")
    p.add_argument("--eval-every", type=int, default=0, help="held-out loss every N steps (default: "
                   "%(default)s, only at the end)")
    p.add_argument("--save-merged", action="store_true", help="LoRA: also write OUT/merged, a full checkpoint "
                   "(default: off)")
    p.add_argument("--adapter", type=Path, default=None, metavar="DIR|FILE", help="continue training these LoRA "
                   "adapters (a PEFT folder, a glm4v finetune --out folder or its adapter.safetensors) instead of "
                   "fresh ones: their layers, rank, alpha and fused layout come from the file, so --lora-rank, "
                   "--lora-alpha, --lora-shared-fused and --train are left out (default: none)")
    p.add_argument("--adapter-format", choices=ADAPTER_FORMATS, default="glm4v", help="the final adapters: glm4v "
                   "(OUT/adapter.safetensors) or peft (OUT/adapter/, a folder peft and vLLM load) "
                   "(default: %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar "
                   "(default: a progress bar)")
    p.add_argument("--plan", action="store_true", help="print this run's predicted peak memory per component "
                   "instead of running it, for CUDA unless --device cpu (glm4v_core.training.memory: no weight is "
                   "read) (default: off)")
    p.add_argument("--plan-text-tokens", type=int, default=None, metavar="N", help="--plan without --data: plan "
                   "one image at the config's image size + N text tokens, all learned (default: 256)")
    add_plan_target_arguments(p)
    return p


PLAN_ONLY = ("plan", "plan_text_tokens", "quantize", "device_memory", "json")  # flags FinetuneConfig does not take


def check_plan_usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A run needs --data and --out; --plan's own flags only plan (usage errors, exit 2)."""
    if args.plan:
        if args.fsdp != 1:
            parser.error("--plan plans one process: leave out --fsdp")
        args.plan_text_tokens = 256 if args.plan_text_tokens is None else args.plan_text_tokens
        return
    missing = [flag for flag, value in (("--data", args.data), ("--out", args.out)) if value is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)} (only --plan runs without them)")
    for flag, name in (("--quantize", "quantize"), ("--device-memory", "device_memory"), ("--json", "json"),
                       ("--plan-text-tokens", "plan_text_tokens")):
        if getattr(args, name) not in (None, False):
            hint = (": to train on a quantized base, convert it once (glm4v-convert BASE OUT --quantize int4) and "
                    "pass --checkpoint OUT") if flag == "--quantize" else ""
            parser.error(f"{flag} goes with --plan{hint}")


def at_least_one(text: str) -> int:
    """argparse type of --keep-last: an integer >= 1 (else a usage error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= 1 (the newest checkpoints kept)")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done; 1 a refused input, a non-finite step or an error during training (one
    line); 2 a usage error;
    130 Ctrl-C, 143 SIGTERM, 129 SIGHUP (a checkpoint saved when the run had started training)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_plan_usage(parser, args)
    if args.plan:
        from glm4v_core.training import memory_cli
        return memory_cli.plan_finetune(args)
    import torch  # lazy, as the library: not for --help, --version or a usage error

    from glm4v_core.errors import REFUSED
    from glm4v_core.training.config import FinetuneConfig
    from glm4v_core.training.state import Stopped, latest_checkpoint, stop_signals
    from glm4v_core.training.trainer import Trainer
    try:
        with stop_signals():  # SIGTERM / SIGHUP raise Stopped, which the loop takes as it takes Ctrl-C
            run = {k: v for k, v in vars(args).items() if k not in PLAN_ONLY}
            options = FinetuneConfig(**run)  # the library takes the dataclass, never the Namespace
            if options.fsdp > 1:
                from glm4v_core.transforms import distributed  # lazy: see glm4v_core.transforms
                device_type = torch.device(options.device).type if options.device else None  # None: cuda if any
                return distributed.run_ranks(train_on_rank, options.fsdp, options, device_type=device_type)
            return Trainer(options).run()
    except REFUSED as e:  # every refused input is a GLM4VError / ConversionError with a one-line text
        print(f"glm4v finetune: error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Stopped) as e:  # outside the training loop (loading, the final files)
        how = "interrupted" if isinstance(e, KeyboardInterrupt) else f"stopped by {e.name}"
        latest = latest_checkpoint(args.out) if args.out.is_dir() else None
        where = "no checkpoint was written"
        if latest is not None:
            where = f"the latest checkpoint is {latest}; continue with --resume {args.out}"
        print(f"glm4v finetune: {how}; {where}", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 128 + e.signum


def train_on_rank(options: FinetuneConfig) -> int:
    """One rank of `glm4v finetune --fsdp N`."""
    from glm4v_core.training.trainer import Trainer
    return Trainer(options).run()


