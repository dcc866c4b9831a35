"""The fine-tuning loop: model, data, optimizer, the token-weighted step, evaluation, checkpoints
and resume (what `glm4v finetune` runs; the options are training/config.py:FinetuneConfig)."""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from glm4v_core.checkpoint import DTYPES, check_device, load_model
from glm4v_core.config import GLM4VConfig
from glm4v_core.model.glm4v import GLM4V
from glm4v_core.model.loss import IGNORE_INDEX
from glm4v_core.processing.tokenizer import Tokenizer
from glm4v_core.training import config as run_config
from glm4v_core.training import console, export
from glm4v_core.training.config import PARTS, FinetuneConfig, FinetuneError, check_lora_rank, learning_rate
from glm4v_core.training.data import Sample, collate, micro_batches, read_samples
from glm4v_core.training.output import check_free_space, check_out, holding_out
from glm4v_core.training.resume import check_sources, read_state, restore_rng, sources
from glm4v_core.training.state import (
    Stopped,
    check_resume_args,
    deferred_interrupt,
    find_resume,
    json_line,
    keep_log_until,
    latest_checkpoint,
    on_device,
    optimizer_tensors,
    prune_checkpoints,
    read_checkpoint,
    write_checkpoint,
)
from glm4v_core.transforms import adapter_files, lora
from glm4v_core.transforms.dtensor import whole


def make_trainable(model: GLM4V, a: FinetuneConfig) -> GLM4V:
    """What --lora-rank (adapters, or the full weights of the --train parts), --train and
    --gradient-checkpointing do to a loaded model; the memory planner (training/memory.py) runs it on a
    meta-device model. `a` needs only those options (and --lora-alpha, --lora-dropout, --lora-shared-fused, --seed)."""
    parts = a.train.split(",")
    if getattr(a, "adapter", None) is not None:  # --adapter: layers, ranks and scales from the file
        adapter_files.load_adapters(model, adapter_files.resolve_adapter(a.adapter), dropout=a.lora_dropout)
    elif a.lora_rank > 0:
        config = lora.LoRAConfig.from_presets(parts, rank=a.lora_rank, alpha=a.lora_alpha, dropout=a.lora_dropout,
                                              split_fused=not a.lora_shared_fused)
        check_lora_rank(model, config)
        lora.add_lora(model, config, seed=a.seed)
    else:
        for part in parts:
            getattr(model, PARTS[part]).requires_grad_(True)
    return model.gradient_checkpointing(a.gradient_checkpointing)


class NonFiniteStep(Exception):  # internal: train() turns it into a FinetuneError
    """A training step whose loss or gradient norm is not finite (not applied); train() saves the
    state before it and raises FinetuneError naming the step and the checkpoint."""


class Trainer:
    """Model, data, optimizer and the loop; everything that can fail on bad input fails in __init__."""

    def __init__(self, options: FinetuneConfig):
        from glm4v_core.checkpoint import resolve_checkpoint
        from glm4v_core.processing.tokenizer import resolve_tokenizer  # cli imports this module lazily
        self.options = options
        self.bar = console.NoBar()  # every report goes through it; the real bar starts with training
        args = options
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank0 = not dist.is_initialized() or dist.get_rank() == 0
        self.last_saved: Path | None = None  # the checkpoint this run wrote last
        self.resume_dir = find_resume(args.resume) if args.resume else None
        if self.resume_dir:
            check_resume_args(self.resume_dir, args)
        # first of all: nothing is written before run() takes OUT's lock. Only rank 0 asks who holds
        # the lock: under FSDP it may be rank 0 itself already
        check_out(args, self.resume_dir, probe_lock=self.rank0)
        self.checkpoint = resolve_checkpoint(args.checkpoint)
        self.config = GLM4VConfig.from_json(self.checkpoint / "config.json")
        self.image_size = None if self.config.vision is None else self.config.vision.image_size  # None: text-only
        vision_parts = sorted({"vision", "projector"} & set(args.train.split(",")))
        if vision_parts and not self.config.has_vision:
            raise FinetuneError(f"--train {args.train}: {self.checkpoint} is a text-only GLM-4 (no vision tower), it "
                                f"has no {' / '.join(vision_parts)} to train; use --train decoder")
        run_config.check_start_adapter(args, self.config)  # --adapter, before any weight is read
        self.provenance = export.base_provenance(self.checkpoint)  # a quantized base's scheme and float dtype
        self.sources = sources(self.checkpoint, args.data, args.eval_data)  # what a resume must find again
        if self.resume_dir:
            check_sources(self.resume_dir, self.sources, args)
        self.tokenizer: Tokenizer = resolve_tokenizer(args.tokenizer, self.checkpoint, self.config)
        read = dict(max_length=args.max_length, train_on=args.train_on, on_bad=args.on_bad_record, report=self.report)
        self.samples = read_samples(args.data, self.tokenizer, self.config, **read)
        self.eval_samples = read_samples(args.eval_data, self.tokenizer, self.config, **read) if args.eval_data else []
        self.micro_per_epoch = math.ceil(len(self.samples) / args.batch_size)
        self.total_steps = args.max_steps or math.ceil(args.epochs * self.micro_per_epoch / args.grad_accum)
        if self.world > 1:
            from glm4v_core.transforms import distributed  # lazy: see glm4v_core.transforms
            self.device = distributed.init()  # this rank's GPU, or the CPU
        else:
            self.device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = DTYPES.get(args.dtype)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model = self.build_model()
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=args.lr, weight_decay=args.weight_decay)
        self.step = 0
        self.step_rng: dict | None = None  # RNG states at the start of the step in progress
        self.phase = "start"  # what the run is doing: an error's message names it (see failure)
        self.epoch_batches: tuple[int, list] = (-1, [])
        self.log_path = args.out / "loss.jsonl"
        if self.resume_dir:
            self.step = read_state(self.resume_dir)["step"]  # for the size of what is left to write
        check_free_space(args.out, *export.planned_bytes(self))

    def build_model(self, shard: bool = True) -> GLM4V:
        a = self.options
        torch.manual_seed(a.seed)  # dropout draws from the global generator; its state is checkpointed
        model = make_trainable(load_model(self.checkpoint, dtype=self.dtype, device=self.device), a)
        if shard and self.world > 1:
            from glm4v_core.transforms import distributed  # lazy: see glm4v_core.transforms
            distributed.fsdp(model, distributed.mesh(self.device))
        return model.train()

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> int:
        """Train to the end (0), or until Ctrl-C (130), SIGTERM / SIGHUP (128 + the signal) with a
        checkpoint saved; a step that is not finite raises FinetuneError after saving the state
        before it. OUT's lock is held throughout."""
        with holding_out(self.options, self.resume_dir, self.rank0, self.world, self.report):
            return self.train()

    def train(self) -> int:
        a = self.options
        a.out.mkdir(parents=True, exist_ok=True)
        if self.resume_dir:  # checked and loaded first: a refused resume prints its error alone
            self.load_checkpoint(self.resume_dir)
        self.report(console.start_line(self))
        if self.resume_dir:
            self.report(f"resumed from {self.resume_dir} at step {self.step}")
        self.start_step = self.step
        source_log = self.resume_dir.parent.parent / "loss.jsonl" if self.resume_dir else self.log_path
        if self.rank0:
            keep_log_until(source_log, self.log_path, self.step)
        stopped: KeyboardInterrupt | Stopped | None = None
        self.bar = console.make_progress(self.total_steps, self.step, a.progress and self.rank0)
        try:
            while self.step < self.total_steps:
                record = self.train_step()  # logged by train_step, with the update
                self.bar.update(1)
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if a.save_every and self.step % a.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
                if a.eval_every and self.step % a.eval_every == 0 and self.step < self.total_steps:
                    self.evaluate()
        except (KeyboardInterrupt, Stopped) as e:
            if self.world > 1:  # the ranks stopped at different points: no common step to save
                raise
            stopped = e
        except NonFiniteStep as e:
            try:
                path = self.save_current()
            except Exception as again:
                raise self.failure(again) from again
            raise FinetuneError(f"{e}; the last finite state is saved in {path} (step {self.step}): resume it with "
                                f"--resume {a.out}, or start a new run (e.g. with a lower --lr)") from None
        except Exception as e:  # out of memory, a failed read or write...: keep the last whole step
            raise self.failure(e) from e
        finally:
            self.bar.close()
            self.bar = console.NoBar()
        try:
            path = self.save_checkpoint()
            if stopped is None:
                eval_loss = self.evaluate()
                written = self.finish()
        except Exception as e:
            raise self.failure(e) from e
        if isinstance(stopped, Stopped):
            self.report(f"\nstopped by {stopped.name} at step {self.step}: saved {path}; continue with "
                        f"--resume {a.out}")
            return 128 + stopped.signum
        if stopped is not None:
            self.report(f"\ninterrupted at step {self.step}: saved {path}; continue with --resume {a.out}")
            return 130
        loss = record["loss"] if self.step > self.start_step else None
        self.report(console.end_line(self, [self.log_path, path, *written], loss, eval_loss))
        return 0

    def failure(self, e: Exception) -> FinetuneError:
        """The one-line error for an exception during the run (neither a stop nor a non-finite step),
        after saving the last completed step when the state in memory is one: not while the weights
        were being updated, nor again after a checkpoint write failed, nor under --fsdp (the ranks
        are not at one step)."""
        a = self.options
        during = {"step": f"step {self.step + 1}", "update": f"applying step {self.step + 1}",
                  "save": f"writing the checkpoint of step {self.step}",
                  "eval": f"the held-out evaluation at step {self.step}",
                  "finish": "writing the final files"}.get(self.phase, f"the run at step {self.step}")
        text = " ".join(str(e).split())
        what = f"{during} failed: {type(e).__name__}" + (f": {text[:300]}" if text else "")
        if self.world > 1 or self.phase in ("update", "save"):
            why = ("under --fsdp the ranks are not at one step" if self.world > 1 else
                   "the state in memory is not a whole step" if self.phase == "update" else "it failed")
            latest = latest_checkpoint(a.out) if a.out.is_dir() else None
            where = f"the latest is {latest}: continue with --resume {a.out}" if latest else "there is none to resume"
            return FinetuneError(f"{what}; no checkpoint was written ({why}); {where}")
        if self.step == self.start_step and self.last_saved is None:
            if self.resume_dir is None:
                return FinetuneError(f"{what}; no step had completed, so no checkpoint was written")
            return FinetuneError(f"{what}; no step completed since {self.resume_dir}: continue with --resume "
                                 f"{a.resume}")
        try:
            path = self.save_current()
        except Exception as again:
            return FinetuneError(f"{what}; saving step {self.step} failed too ({type(again).__name__}: "
                                 f"{' '.join(str(again).split())[:200]})")
        return FinetuneError(f"{what}; saved the last completed step {self.step} in {path}: continue with --resume "
                             f"{a.out}")

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches; returns its log record."""
        a = self.options
        start = time.perf_counter()
        self.phase = "step"
        self.step_rng = self.rng_state()  # a Ctrl-C inside this step saves the state it started from
        micro = [self.micro_samples(self.step * a.grad_accum + k) for k in range(a.grad_accum)]
        counted = sum(s.counted for samples in micro for s in samples)
        lr = learning_rate(self.step, a, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), dtype=torch.float32)
        for samples in micro:
            batch = collate(self.share(samples), self.tokenizer, self.image_size)
            inputs = batch.inputs.to(self.device)
            out = self.model(inputs.input_ids, inputs.pixel_values, inputs.attention_mask, inputs.position_ids,
                             labels=batch.labels.to(self.device))
            weighted = out.loss * (batch.counted / counted)  # token-weighted: the step's mean over all tokens
            if weighted.requires_grad:  # a text-only batch does not reach trained vision/projector weights
                (weighted * self.world).backward()  # FSDP averages gradients over ranks; the step needs their sum
            total += weighted.detach().cpu()
        if self.world > 1:  # the step's loss: the sum of every rank's share
            total = total.to(self.device)
            dist.all_reduce(total)
        # the gradients' norm (a DTensor under FSDP), clipped to --max-grad-norm; with 0 (off) only
        # measured: clipping to inf multiplies the gradients by exactly 1.0
        norm = float(whole(nn.utils.clip_grad_norm_(self.params.values(), a.max_grad_norm or math.inf)))
        loss = float(total)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            if math.isfinite(loss):
                what = f"the gradient norm is {norm} (the loss {loss:.4f})"
            else:
                what = f"the training loss is {loss}"
            raise NonFiniteStep(f"step {self.step + 1}: {what}, not finite; the step was not applied and the run "
                                "stopped")
        tokens = sum(s.length for samples in micro for s in samples)
        with deferred_interrupt():  # never a half-updated model, nor an update without its log line
            self.phase = "update"
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.step_rng = None
            seconds = time.perf_counter() - start
            epoch = (self.step * a.grad_accum - 1) // self.micro_per_epoch
            record = {"step": self.step, "epoch": epoch, "loss": loss, "lr": lr, "counted_tokens": counted,
                      "tokens": tokens, "tokens_per_s": tokens / seconds, "seconds": seconds}
            self.log(record)
            self.phase = "step"
        return record

    def micro_samples(self, index: int) -> list[Sample]:
        """Micro-batch number `index` of the whole run (epochs laid end to end), all ranks' samples."""
        epoch, k = divmod(index, self.micro_per_epoch)
        if self.epoch_batches[0] != epoch:  # one shuffle per epoch
            a = self.options
            self.epoch_batches = (epoch, micro_batches(self.samples, a.batch_size, a.seed, epoch, a.shuffle))
        return self.epoch_batches[1][k]

    def share(self, samples: list[Sample]) -> list[Sample]:
        """This rank's samples r, r+N, ... of a micro-batch. Every rank must run the same blocks, so a
        share that is empty, or has no image while the batch has one, gets a sample of the batch
        whose labels count nothing (it adds nothing to the loss or the gradients)."""
        if self.world == 1:
            return samples
        mine = samples[dist.get_rank()::self.world]
        needs_image = any(s.images for s in samples) and not any(s.images for s in mine)
        if mine and not needs_image:
            return mine
        filler = next(s for s in samples if s.images) if needs_image else samples[0]
        return [*mine, dataclasses.replace(filler, labels=(IGNORE_INDEX,) * len(filler.labels))]

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over every counted token of --eval-data (no RNG drawn: resume stays exact)."""
        if not self.eval_samples:
            return None
        self.phase = "eval"
        self.model.eval()
        total, counted = 0.0, 0
        size = self.options.batch_size
        for k in range(0, len(self.eval_samples), size):
            batch = collate(self.eval_samples[k:k + size], self.tokenizer, self.image_size)
            inputs = batch.inputs.to(self.device)
            out = self.model(inputs.input_ids, inputs.pixel_values, inputs.attention_mask, inputs.position_ids,
                             labels=batch.labels.to(self.device))
            total += float(out.loss) * batch.counted
            counted += batch.counted
        self.model.train()
        loss = total / max(counted, 1)
        self.log({"step": self.step, "eval_loss": loss, "eval_tokens": counted})  # every rank ran the whole set
        self.report(f"step {self.step}: held-out loss {loss:.4f} over {counted} tokens")
        return loss

    def log(self, record: dict) -> None:
        if self.rank0:
            line = json_line(record).encode()  # strict JSON: a non-finite number as a string
            with open(self.log_path, "ab", buffering=0) as f:  # unbuffered: a failed write is not retried at close
                end = f.tell()
                try:
                    while line:
                        line = line[f.write(line):]
                except BaseException:
                    f.truncate(end)  # no half line (a full disk): the log stays strict JSON lines
                    raise

    def report(self, line: str) -> None:
        if self.rank0:
            self.bar.write(line, file=sys.stderr)  # through the bar: it is cleared, then redrawn below

    def finish(self) -> list[Path]:
        """The final files (adapters; merged/ or model/; the plot); returns those written."""
        self.phase = "finish"
        return export.final_files(self)

    def barrier(self) -> None:
        """Ranks wait here until rank 0 has written its files."""
        if self.world > 1:
            dist.barrier()

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors (adapters, or the trained parameters) whole, on the CPU: on every
        rank, since gathering FSDP shards is a collective."""
        source = lora.adapter_state(self.model) if self.options.lora_rank > 0 else self.params
        return {n: whole(t.detach()).cpu().contiguous() for n, t in source.items()}

    # -- checkpoints ------------------------------------------------------------------------------

    def save_current(self) -> Path:
        """The checkpoint of the current step: the one this run wrote already, or a new one."""
        saved = self.last_saved
        return saved if saved is not None and saved.name == f"step-{self.step:06d}" else self.save_checkpoint()

    def save_checkpoint(self) -> Path:
        """checkpoints/step-N (see glm4v_core.training.state), published atomically."""
        self.phase = "save"
        dst = self.options.out / "checkpoints" / f"step-{self.step:06d}"
        trained, optimizer = self.trained_state(), optimizer_tensors(self.optimizer, list(self.params))
        if self.options.lora_rank > 0 and self.model.lora_config is not None:
            def write_trained(path: Path) -> None:
                adapter_files.save_adapters(self.model, path, tensors=trained)
        else:  # full weights, or adapters of per-layer ranks (--adapter of a PEFT rank_pattern): the tensors alone
            def write_trained(path: Path) -> None:
                adapter_files.atomic_save_file(trained, path, {"format": "glm4v-finetune"})
        state = {"step": self.step, "total_steps": self.total_steps, "sources": self.sources,
                 "args": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self.options).items()}}
        rng = self.step_rng or self.rng_state()  # mid-step (Ctrl-C): the state the step started from
        if self.rank0:
            write_checkpoint(dst, write_trained, optimizer, rng, state)
            if self.options.keep_last:  # only now that the newest is complete
                prune_checkpoints(self.options.out, self.options.keep_last, self.step)
        self.barrier()
        self.last_saved = dst
        return dst

    def rng_state(self) -> dict[str, torch.Tensor]:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def load_checkpoint(self, folder: Path) -> None:
        trained = lora.adapter_state(self.model) if self.options.lora_rank > 0 else dict(self.params)
        place = on_device
        if self.world > 1:
            from glm4v_core.transforms import distributed  # lazy: see glm4v_core.transforms
            place = distributed.shard_like  # the files hold whole tensors; each rank keeps its shard
        state, rng = read_checkpoint(folder, trained, self.optimizer, list(self.params), place)
        restore_rng(rng, self.device, folder)
        self.step = state["step"]
