"""The runs the memory planner makes on a fake model (glm4v_core.training.memory): a training step as
`glm4v finetune` runs it (TrainingRequest: its flags), and generation as `glm4v generate` runs it
(InferenceRequest). Only config.json (and glm4v_native.json for a quantized folder) is read.

The sample, without --data: one image at the config's image size (a text-only config: none) and
`text_tokens` text tokens, every text token learned (the most the loss can count); `batch_size` such
rows. With --data: the `batch_size` longest samples of the file together (the largest micro-batch a
shuffle can draw). Training runs min(grad_accum, 2) micro-batches per step (the second one starts
with the first one's gradients in place) and two steps (the second with AdamW's state in place).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from glm4v_conversion.quantize import SCHEMES, QuantizationError, check_request
from glm4v_core.checkpoint import DTYPES, resolve_checkpoint
from glm4v_core.config import GLM4VConfig
from glm4v_core.errors import GLM4VError
from glm4v_core.model import ops
from glm4v_core.model.glm4v import GLM4V, PREFILL_CHUNK
from glm4v_core.model.loss import IGNORE_INDEX
from glm4v_core.training.config import DTYPE_CHOICES, PARTS, check_numbers
from glm4v_core.training.memory import (
    CUDA_BLOCK,
    Alloc,
    LiveBytes,
    Plan,
    finish_plan,
    make_fake,
    region_hooks,
    storage_bytes,
)
from glm4v_core.transforms.quant import quantize_model, quantized_linears

PLAN_DEVICES = ("cuda", "cpu")
INT4_GROUP_SIZE = 128  # glm4v-convert --quantize int4's default


class MemoryPlanError(GLM4VError):
    """A memory plan that cannot be made; the message names the flag or file and what is accepted."""


@dataclass(frozen=True)
class TrainingRequest:
    """What `glm4v finetune --plan` plans: the run's flags that change memory (names as FinetuneConfig's)."""
    checkpoint: Path | None = None    # a checkpoint folder or a config.json; None: the bundled demo
    data: Path | None = None          # plan the longest batch of this JSONL; None: the synthetic sample
    tokenizer: Path | None = None
    text_tokens: int = 256            # synthetic sample: text tokens beside the image
    quantize: str | None = None       # int8 / int4: plan a base quantized from a float config
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_shared_fused: bool = False
    train: str = "decoder"
    batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    max_length: int | None = None
    train_on: str = "assistant"
    seed: int = 0
    device: str = "cuda"              # the device planned for
    chunked_loss: bool = True         # the trainer's loss; False: the plain one (fp32 logits), for comparison
    lr: float = 1e-4                  # checked as the run checks them; they change no memory
    weight_decay: float = 0.0

    def check(self) -> None:
        bad = [p for p in self.train.split(",") if p not in PARTS]
        if bad:
            raise MemoryPlanError(f"--train {self.train!r}: unknown part(s) {bad}; choose from {list(PARTS)}")
        for flag, value, low in (("--batch-size", self.batch_size, 1), ("--grad-accum", self.grad_accum, 1),
                                 ("--lora-rank", self.lora_rank, 0), ("--plan-text-tokens", self.text_tokens, 1)):
            if value < low:
                raise MemoryPlanError(f"{flag} must be >= {low}, got {value}")
        check_common(self.dtype, self.quantize, self.device)
        check_numbers(self)


@dataclass(frozen=True)
class InferenceRequest:
    """What `glm4v memory` plans: a prompt of one image + text_tokens text tokens per row, then
    max_new_tokens tokens decoded with the static KV cache (prompt + new tokens slots)."""
    checkpoint: Path | None = None
    quantize: str | None = None
    dtype: str = "auto"
    batch_size: int = 1
    text_tokens: int = 256
    max_new_tokens: int = 256
    device: str = "cuda"
    prefill_chunk: int | None = PREFILL_CHUNK

    def check(self) -> None:
        for flag, value in (("--batch-size", self.batch_size), ("--text-tokens", self.text_tokens),
                            ("--max-new-tokens", self.max_new_tokens)):
            if value < 1:
                raise MemoryPlanError(f"{flag} must be >= 1, got {value}")
        check_common(self.dtype, self.quantize, self.device)


def check_common(dtype: str, quantize: str | None, device: str) -> None:
    for flag, value, accepted in (("--dtype", dtype, DTYPE_CHOICES + ("float16",)),
                                  ("--quantize", quantize, (None, *SCHEMES)), ("--device", device, PLAN_DEVICES)):
        if value not in accepted:
            raise MemoryPlanError(f"{flag} {value!r}: choose from {[a for a in accepted if a]}")


@dataclass(frozen=True)
class Base:
    """The model to plan: its config, where it came from, and the weight-only scheme of its linears."""
    config: GLM4VConfig
    folder: Path            # the checkpoint folder (a bare config.json: the folder holding it)
    name: str               # for the printout
    scheme: str | None      # None, int8, int4
    group_size: int | None


def resolve_base(checkpoint: Path | None, quantize: str | None) -> Base:
    """config.json of a folder (glm4v_native.json says whether it is quantized) or a config.json file."""
    if checkpoint is not None and checkpoint.is_file():
        config_path, folder = checkpoint, checkpoint.parent
    else:
        folder = resolve_checkpoint(checkpoint)  # None: the bundled demo checkpoint
        config_path = folder / "config.json"
    config = GLM4VConfig.from_json(config_path)
    name = "the bundled demo checkpoint" if checkpoint is None else str(checkpoint)
    stored = stored_quantization(folder) if config_path.name == "config.json" else None
    if stored and quantize:
        raise MemoryPlanError(f"--quantize {quantize}: {folder} is already quantized ({stored['scheme']}); plan it "
                              "without --quantize")
    if stored:
        return Base(config, folder, name, stored["scheme"], stored.get("group_size"))
    group = INT4_GROUP_SIZE if quantize == "int4" else None
    return Base(config, folder, name, quantize, group)


def stored_quantization(folder: Path) -> dict | None:
    """glm4v_native.json's `quantization` record, checked (None for a float folder)."""
    try:
        record = json.loads((folder / "glm4v_native.json").read_text()).get("quantization")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(record, dict):
        return None
    try:
        check_request(record.get("scheme"), record.get("group_size"), record.get("method") or "rtn")
    except QuantizationError as e:
        raise MemoryPlanError(f"{folder / 'glm4v_native.json'}: {e}") from None
    return record


def compute_dtype(name: str, device: str) -> torch.dtype:
    """--dtype auto: bfloat16 on CUDA, float32 on the CPU (the trainer's and generate's rule on CUDA)."""
    return DTYPES.get(name) or (torch.bfloat16 if device == "cuda" else torch.float32)


def meta_model(base: Base, dtype: torch.dtype) -> GLM4V:
    """The model on the meta device in the compute dtype, quantized as the base is."""
    model = GLM4V(base.config).to(dtype).requires_grad_(False)  # as load_model returns it
    if base.scheme:
        quantize_model(model, base.scheme, base.group_size)
        for layer in quantized_linears(model).values():
            layer.use_compute_dtype(dtype)
    return model


def fake_model(model: GLM4V, device: str) -> tuple[GLM4V, FakeTensorMode, list[torch.Tensor]]:
    """The meta model made fake; returns it, the mode and every tensor it holds (packed CPU int4 copies too)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    make_fake(model, mode)
    extra = []
    for layer in quantized_linears(model).values():
        if device == "cpu":  # PyTorch's packed int4 copy, as load_model builds it on the CPU
            with mode:
                layer.prepare()
        extra += list(layer._cpu_int4 or ())
    return model, mode, [*model.parameters(), *model.buffers(), *extra]


# --- the sample --------------------------------------------------------------------------------------

@dataclass
class Sample:
    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    labels: torch.Tensor
    description: str
    rows: int  # decoder rows of the longest row, after the image splice


def synthetic_sample(config: GLM4VConfig, rows: int, text_tokens: int, max_length: int | None) -> Sample:
    """`rows` rows of one image block + text_tokens text tokens, the text learned; --max-length cuts the text."""
    image_rows = 2 + config.vision.num_image_tokens if config.has_vision else 0
    if max_length is not None:
        if max_length <= image_rows:
            raise MemoryPlanError(f"--max-length {max_length}: one image alone fills {image_rows} decoder rows; "
                                  f"choose more than {image_rows}")
        text_tokens = min(text_tokens, max_length - image_rows)
    text = torch.arange(text_tokens) % (config.pad_token_id - 1) + 1  # ordinary tokens, below the special ids
    block = [config.boi_token_id, config.pad_token_id, config.eoi_token_id] if config.has_vision else []
    ids = torch.cat([torch.tensor(block, dtype=torch.long), text]).expand(rows, -1).contiguous()
    labels = torch.cat([torch.full((len(block),), IGNORE_INDEX), text]).expand(rows, -1).contiguous()
    pixels = None
    image = ""
    if config.has_vision:
        size = config.vision.image_size
        pixels = torch.zeros(rows, 3, size, size)
        image = f"one {size} px image ({image_rows} decoder rows) + "
    return Sample(ids, pixels, None, None, labels, f"{rows} x ({image}{text_tokens} text tokens, all learned)",
                  image_rows + text_tokens)


def data_sample(request: TrainingRequest, base: Base) -> Sample:
    """The batch_size longest samples of --data, collated as the trainer collates a micro-batch."""
    from glm4v_core.processing.tokenizer import resolve_tokenizer
    from glm4v_core.training.data import collate, read_samples
    tokenizer = resolve_tokenizer(request.tokenizer, base.folder, base.config)
    samples = read_samples(request.data, tokenizer, base.config, max_length=request.max_length,
                           train_on=request.train_on, report=lambda line: print(line, file=sys.stderr))
    if not samples:
        raise MemoryPlanError(f"--data {request.data}: no usable sample to plan with")
    longest = sorted(samples, key=lambda s: s.length, reverse=True)[:request.batch_size]
    image_size = base.config.vision.image_size if base.config.has_vision else None
    batch = collate(longest, tokenizer, image_size)
    i = batch.inputs
    return Sample(i.input_ids, i.pixel_values, i.attention_mask, i.position_ids, batch.labels,
                  f"the {len(longest)} longest sample(s) of {request.data} ({longest[0].length} decoder rows)",
                  longest[0].length)


# --- training ----------------------------------------------------------------------------------------

def plan_training(request: TrainingRequest) -> Plan:
    """The predicted peak of `glm4v finetune` with these flags on `request.device` (see the module docstring)."""
    from glm4v_core.training.trainer import make_trainable
    started = time.perf_counter()
    request.check()
    base = resolve_base(request.checkpoint, request.quantize)
    if {"vision", "projector"} & set(request.train.split(",")) and not base.config.has_vision:
        raise MemoryPlanError(f"--train {request.train}: {base.name} is a text-only GLM-4 (no vision tower)")
    sample = data_sample(request, base) if request.data else \
        synthetic_sample(base.config, request.batch_size, request.text_tokens, request.max_length)
    dtype = compute_dtype(request.dtype, request.device)
    model = make_trainable(meta_model(base, dtype), request).train()
    model.loss_chunk_size = GLM4V.loss_chunk_size if request.chunked_loss else None
    model, mode, tensors = fake_model(model, request.device)
    params = [p for p in model.parameters() if p.requires_grad]
    block = CUDA_BLOCK if request.device == "cuda" else 1
    trained = {id(p) for p in params}
    static = {"weights": storage_bytes([t for t in tensors if id(t) not in trained], block),
              "trained_and_optimizer": storage_bytes(params, block)}
    foreach = True if request.device == "cuda" else None  # what the default picks for CUDA (real) tensors
    optimizer = torch.optim.AdamW(params, lr=request.lr, weight_decay=request.weight_decay, foreach=foreach)
    state = optimizer_state(optimizer, params)
    static["trained_and_optimizer"] += storage_bytes(state, block)
    tracker = LiveBytes(mode, block)
    tracker.ignore([*tensors, *state])
    handles = region_hooks(model, tracker, after_vision="forward", loss=True)
    try:
        with ops.plan_device(request.device), tracker:
            training_step(model, optimizer, params, sample, request, tracker)
    finally:
        for h in handles:
            h.remove()
    tracker.peak += storage_bytes(state, block)  # what a measurement of the run from its first step sees
    peak_region = tracker.peak_region

    def classify(a: Alloc) -> str:
        if a.kind in ("gradient", "optimizer state"):
            return "trained_and_optimizer"
        if a.region == "vision":
            return "vit_working_set" if peak_region == "vision" else "activations_kept"
        return {"forward": "activations_kept", "loss": "loss", "recompute": "recomputed_layer"}.get(a.region,
                                                                                                   "transients")
    what = describe_training(request, base, sample)
    return finish_plan("training", request.device, what, static, tracker, classify, started, sample.rows)


def optimizer_state(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """AdamW's state made before the planned step (an update with zero gradients), so that the step runs
    as every step after the first does: the state in place from the start (the first step's peak is no
    higher: it only allocates the state after backward, when the activations are gone)."""
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]


def training_step(model: GLM4V, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], sample: Sample,
                  request: TrainingRequest, tracker: LiveBytes) -> None:
    """One optimizer step as Trainer.train_step takes it: per micro-batch a forward with labels and a
    backward of the token-weighted loss; then clip_grad_norm_, AdamW's step, zero_grad(set_to_none=True)."""
    micro = min(request.grad_accum, 2)  # the second micro-batch runs with the first one's gradients in place
    for _ in range(micro):
        tracker.region, tracker.in_backward = "inputs", False
        tracker.count([sample.input_ids, sample.pixel_values, sample.attention_mask, sample.position_ids,
                       sample.labels])  # made by collate from lists: no op would count them
        tracker.region = "forward"
        out = model(sample.input_ids, sample.pixel_values, sample.attention_mask, sample.position_ids,
                    labels=sample.labels)
        tracker.region, tracker.in_backward = "loss", True  # backward starts with the loss's own
        (out.loss * (1 / micro)).backward()
        tracker.in_backward = False
    tracker.mark([p.grad for p in params if p.grad is not None], "gradient")
    tracker.region = "optimizer"
    nn.utils.clip_grad_norm_(params, request.max_grad_norm or math.inf, foreach=True)  # real tensors: foreach
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def describe_training(r: TrainingRequest, base: Base, sample: Sample) -> str:
    base_kind = f"{base.scheme} base" if base.scheme else f"{compute_dtype(r.dtype, r.device)} base".replace(
        "torch.", "")
    what = (f"LoRA rank {r.lora_rank} on {r.train}" if r.lora_rank else f"full fine-tune of {r.train}")
    switches = [s for s, on in (("gradient checkpointing", r.gradient_checkpointing),
                                ("chunked loss", r.chunked_loss)) if on]
    return (f"{what} of {base.name} ({base_kind}; {', '.join(switches) or 'no checkpointing'}), {sample.description}"
            f", grad accumulation {r.grad_accum}, AdamW, on {r.device}")


# --- inference ---------------------------------------------------------------------------------------

def plan_inference(request: InferenceRequest) -> Plan:
    """The predicted peak of generating max_new_tokens after an image + text prompt (see InferenceRequest)."""
    started = time.perf_counter()
    request.check()
    base = resolve_base(request.checkpoint, request.quantize)
    sample = synthetic_sample(base.config, request.batch_size, request.text_tokens, None)
    dtype = compute_dtype(request.dtype, request.device)
    model = meta_model(base, dtype).eval().requires_grad_(False)
    model.prefill_chunk = request.prefill_chunk
    model, mode, tensors = fake_model(model, request.device)
    block = CUDA_BLOCK if request.device == "cuda" else 1
    static = {"weights": storage_bytes(tensors, block)}
    tracker = LiveBytes(mode, block)
    tracker.ignore(tensors)
    handles = region_hooks(model, tracker, after_vision="prefill")
    try:
        with ops.plan_device(request.device), tracker, torch.no_grad():
            tracker.region = "inputs"
            tracker.count([sample.input_ids, sample.pixel_values])
            prompt = model.check_prompt(sample.input_ids, sample.pixel_values, max_new_tokens=request.max_new_tokens)
            tracker.region = "prefill"
            state = model.prefill(prompt, prompt.spliced_length + request.max_new_tokens)  # generate's eager size
            tracker.mark([*state.cache.k, *state.cache.v], "kv_cache")
            tracker.region = "decode"
            tokens, positions, slot = state.logits.argmax(-1, keepdim=True), state.positions, state.slot
            for _ in range(2):  # every step has the same shapes
                logits = model.decode_step(tokens, positions, slot, state.cache)
                tokens, positions, slot = logits.float().argmax(-1, keepdim=True), positions + 1, slot + 1
    finally:
        for h in handles:
            h.remove()

    def classify(a: Alloc) -> str:
        if a.kind == "kv_cache":
            return "kv_cache"
        return {"vision": "vit_working_set", "prefill": "prefill", "decode": "decode"}.get(a.region, "transients")
    scheme = f"{base.scheme} weights" if base.scheme else str(dtype).replace("torch.", "")
    what = (f"generation with {base.name} ({scheme}): {sample.description.replace(', all learned', '')}, then "
            f"{request.max_new_tokens} new tokens (static KV cache), on {request.device}")
    return finish_plan("inference", request.device, what, static, tracker, classify, started, sample.rows)
