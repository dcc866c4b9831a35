"""The fine-tuning loop: model, data, optimizer, the token-weighted step, evaluation, checkpoints
and resume (what `glm4v finetune` runs; the options are training/config.py:FinetuneConfig)."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from glm4v_core.checkpoint import DTYPES, check_device, load_model, save_model
from glm4v_core.config import GLM4VConfig
from glm4v_core.model.glm4v import GLM4V
from glm4v_core.model.loss import IGNORE_INDEX
from glm4v_core.processing.tokenizer import Tokenizer
from glm4v_core.training.config import PARTS, FinetuneConfig, FinetuneError, check_lora_rank, learning_rate
from glm4v_core.training.data import Sample, collate, micro_batches, read_samples
from glm4v_core.training.output import check_out, out_lock
from glm4v_core.training.resume import check_sources, restore_rng, sources
from glm4v_core.training.state import (
    Stopped,
    check_resume_args,
    deferred_interrupt,
    find_resume,
    json_line,
    keep_log_until,
    on_device,
    optimizer_tensors,
    plot_loss,
    read_checkpoint,
    write_checkpoint,
)
from glm4v_core.transforms import lora
from glm4v_core.transforms.dtensor import whole


class NonFiniteStep(Exception):  # internal: train() turns it into a FinetuneError
    """A training step whose loss or gradient norm is not finite (not applied); train() saves the
    state before it and raises FinetuneError naming the step and the checkpoint."""






class Trainer:
    """Model, data, optimizer and the loop; everything that can fail on bad input fails in __init__."""

    def __init__(self, options: FinetuneConfig):
        from glm4v_core.checkpoint import resolve_checkpoint
        from glm4v_core.processing.tokenizer import resolve_tokenizer  # cli imports this module lazily
        self.options = options
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
        self.epoch_batches: tuple[int, list] = (-1, [])
        self.log_path = args.out / "loss.jsonl"

    def build_model(self, shard: bool = True) -> GLM4V:
        a = self.options
        torch.manual_seed(a.seed)  # dropout draws from the global generator; its state is checkpointed
        model = load_model(self.checkpoint, dtype=self.dtype, device=self.device)
        parts = a.train.split(",")
        if a.lora_rank > 0:
            config = lora.LoRAConfig.from_presets(parts, rank=a.lora_rank, alpha=a.lora_alpha, dropout=a.lora_dropout,
                                                  split_fused=not a.lora_shared_fused)
            check_lora_rank(model, config)
            lora.add_lora(model, config, seed=a.seed)
        else:
            for part in parts:
                getattr(model, PARTS[part]).requires_grad_(True)
        model.gradient_checkpointing(a.gradient_checkpointing)
        if shard and self.world > 1:
            from glm4v_core.transforms import distributed  # lazy: see glm4v_core.transforms
            distributed.fsdp(model, distributed.mesh(self.device))
        return model.train()

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> int:
        """Train to the end (0), or until Ctrl-C (130), SIGTERM / SIGHUP (128 + the signal) with a
        checkpoint saved; a step that is not finite raises FinetuneError after saving the state
        before it. OUT's lock is held throughout."""
        with self.holding_out():
            return self.train()

    @contextlib.contextmanager
    def holding_out(self) -> Iterator[None]:
        """OUT's lock (rank 0 takes it, every rank learns whether it could) and the --out rule
        again under it: another run may have written there since __init__."""
        a = self.options
        with contextlib.ExitStack() as stack:
            refusal = None
            if self.rank0:
                try:
                    stack.enter_context(out_lock(a.out))
                    check_out(a, self.resume_dir, probe_lock=False)
                except FinetuneError as e:
                    refusal = e
            if self.world > 1:
                box = [str(refusal) if refusal is not None else None]
                dist.broadcast_object_list(box, src=0)
                if refusal is None and box[0] is not None:
                    refusal = FinetuneError(box[0])
            if refusal is not None:
                raise refusal
            yield

    def train(self) -> int:
        a = self.options
        a.out.mkdir(parents=True, exist_ok=True)
        if self.resume_dir:
            self.load_checkpoint(self.resume_dir)
            self.report(f"resumed from {self.resume_dir} at step {self.step}")
        source_log = self.resume_dir.parent.parent / "loss.jsonl" if self.resume_dir else self.log_path
        if self.rank0:
            keep_log_until(source_log, self.log_path, self.step)
        stopped: KeyboardInterrupt | Stopped | None = None
        bar = make_progress(self.total_steps, self.step, a.progress and self.rank0)
        try:
            while self.step < self.total_steps:
                record = self.train_step()  # logged by train_step, with the update
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if a.save_every and self.step % a.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
                if a.eval_every and self.step % a.eval_every == 0 and self.step < self.total_steps:
                    self.evaluate()
        except (KeyboardInterrupt, Stopped) as e:
            if self.world > 1:  # the ranks stopped at different points: no common step to save
                raise
            stopped = e
        except NonFiniteStep as e:
            saved = self.last_saved  # this step's state, if this run saved it already
            path = saved if saved is not None and saved.name == f"step-{self.step:06d}" else self.save_checkpoint()
            raise FinetuneError(f"{e}; the last finite state is saved in {path} (step {self.step}): resume it with "
                                f"--resume {a.out}, or start a new run (e.g. with a lower --lr)") from None
        finally:
            bar.close()
        path = self.save_checkpoint()
        if isinstance(stopped, Stopped):
            self.report(f"\nstopped by {stopped.name} at step {self.step}: saved {path}; continue with "
                        f"--resume {a.out}")
            return 128 + stopped.signum
        if stopped is not None:
            self.report(f"\ninterrupted at step {self.step}: saved {path}; continue with --resume {a.out}")
            return 130
        self.evaluate()
        self.finish()
        return 0

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches; returns its log record."""
        a = self.options
        start = time.perf_counter()
        self.step_rng = self.rng_state()  # a Ctrl-C inside this step saves the state it started from
        micro = [self.micro_samples(self.step * a.grad_accum + k) for k in range(a.grad_accum)]
        counted = sum(s.counted for samples in micro for s in samples)
        lr = learning_rate(self.step, a, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), dtype=torch.float32)
        for samples in micro:
            batch = collate(self.share(samples), self.tokenizer, self.config.vision.image_size)
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
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.step_rng = None
            seconds = time.perf_counter() - start
            epoch = (self.step * a.grad_accum - 1) // self.micro_per_epoch
            record = {"step": self.step, "epoch": epoch, "loss": loss, "lr": lr, "counted_tokens": counted,
                      "tokens": tokens, "tokens_per_s": tokens / seconds, "seconds": seconds}
            self.log(record)
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
        self.model.eval()
        total, counted = 0.0, 0
        size = self.options.batch_size
        for k in range(0, len(self.eval_samples), size):
            batch = collate(self.eval_samples[k:k + size], self.tokenizer, self.config.vision.image_size)
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
            with open(self.log_path, "a") as f:
                f.write(json_line(record))  # strict JSON: a non-finite number as a string

    def report(self, line: str) -> None:
        if self.rank0:
            print(line, file=sys.stderr)

    def finish(self) -> None:
        a = self.options
        if a.lora_rank > 0:
            adapters = self.trained_state()
            if self.rank0:
                lora.save_adapters(self.model, a.out / "adapter.safetensors", tensors=adapters)
        if a.lora_rank == 0 or a.save_merged:
            model = self.whole_model()
            if self.rank0 and a.lora_rank > 0:
                save_model(lora.remove_lora(model), a.out / "merged", overwrite=True)
            elif self.rank0:
                save_model(model, a.out / "model", overwrite=True)
        if self.rank0:
            plot_loss(self.log_path, a.out / "loss.png")
        self.barrier()

    def whole_model(self) -> GLM4V | None:
        """The trained model as one process holds it: the model itself, or under FSDP an unsharded
        copy built on rank 0 from the gathered state (None on the other ranks)."""
        if self.world == 1:
            return self.model
        state = {}
        for name, t in self.model.state_dict().items():
            t = whole(t)  # a collective: every rank gathers, rank 0 keeps
            if self.rank0:
                state[name] = t.cpu()
        if not self.rank0:
            return None
        model = self.build_model(shard=False)
        model.load_state_dict(state)
        return model

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

    def save_checkpoint(self) -> Path:
        """checkpoints/step-N (see glm4v_core.training.state), published atomically."""
        dst = self.options.out / "checkpoints" / f"step-{self.step:06d}"
        trained, optimizer = self.trained_state(), optimizer_tensors(self.optimizer, list(self.params))
        if self.options.lora_rank > 0:
            def write_trained(path: Path) -> None:
                lora.save_adapters(self.model, path, tensors=trained)
        else:
            def write_trained(path: Path) -> None:
                lora.atomic_save_file(trained, path, {"format": "glm4v-finetune"})
        state = {"step": self.step, "total_steps": self.total_steps, "sources": self.sources,
                 "args": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self.options).items()}}
        rng = self.step_rng or self.rng_state()  # mid-step (Ctrl-C): the state the step started from
        if self.rank0:
            write_checkpoint(dst, write_trained, optimizer, rng, state)
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






def make_progress(total: int, done: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not enabled:
        return _NoBar()
    return tqdm(total=total, initial=done, unit="step", dynamic_ncols=True)


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw) -> None: ...
    def close(self) -> None: ...
