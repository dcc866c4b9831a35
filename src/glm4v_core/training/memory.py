"""Will it fit? The peak memory of a training step or of generation, planned without reading a weight.

The model is built on the meta device from config.json, with the transforms the real run applies
(int8 / int4 quantization, LoRA adapters or trained parts, gradient checkpointing); its tensors are
then replaced by fake ones (torch's FakeTensorMode: shapes, dtypes and strides, no storage), and the
real code runs on them: two steps of the trainer (each: forward with labels, backward, gradient
clipping, AdamW; the second with the optimizer state in place), or a prefill and decode steps.
`LiveBytes`, a TorchDispatchMode, sees every tensor each op returns and keeps a weak reference to
its storage: the bytes of the live storages, their peak, and at the peak which part of the run made
each one (the components). The same class on real tensors measures a real step (benchmarks/memory_plan.py).

Fake and real tensors mix: integer and bool tensors (token ids, masks, positions, the splice map,
the counted labels) and the pixels stay real, so the data-dependent code (input checks, the image
splice) runs as it does for real; everything computed from a weight is fake, and so is every float
tensor a factory makes (a KV cache, the loss's buffers). A bool mask indexing a fake tensor is
turned into its real indices first (a fake nonzero would have no size).

Target device. Fake tensors live on the CPU, but the plan takes the code path of the planned device
(ops.plan_device). On CUDA: the Triton attention (it keeps O and the log-sum-exp for backward, never
a score matrix or K/V expanded to the query heads), the Triton RMSNorm, Triton quantized matmuls
where no gradient is needed, the foreach AdamW and clip_grad_norm_; each tensor is counted as the
caching allocator counts it (torch.cuda.max_memory_allocated: rounded up to CUDA_BLOCK), and
CUDA_CONTEXT_BYTES plus CUDA_FRAGMENTATION of the run's own peak are added (`cuda_overhead`).
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from glm4v_core.model.decoder import Block
from glm4v_core.model.glm4v import GLM4V
from glm4v_core.model.vision import VisionBlock

MiB, GiB = 2**20, 2**30
CUDA_BLOCK = 512  # the caching allocator rounds every tensor up to 512 B (what max_memory_allocated counts)
# Outside torch's allocator: the CUDA context with cuBLAS's handles and workspace and the loaded
# Triton / torch kernels (about 500 MiB on an H100 with torch 2.x, as nvidia-smi shows it).
CUDA_CONTEXT_BYTES = 512 * MiB
# Reserved but not allocated: the caching allocator keeps freed blocks in 2 MiB (small) or 20 MiB+
# (large) segments and cannot always reuse them for other sizes; 10% of the bytes a run allocates and
# frees (its peak above the model), a margin rather than a measurement.
CUDA_FRAGMENTATION = 0.10

TRAINING_COMPONENTS = {  # JSON key -> what it holds (the printed label)
    "weights": "frozen weights and buffers",
    "trained_and_optimizer": "trained parameters + their gradients + AdamW state",
    "activations_kept": "activations kept for backward",
    "recomputed_layer": "the recomputed layer (gradient checkpointing)",
    "vit_working_set": "ViT working set",
    "loss": "loss (chunked cross entropy)",
    "transients": "transients (gradients in flight, optimizer temporaries, inputs)",
    "cuda_overhead": "CUDA context + allocator",
}
INFERENCE_COMPONENTS = {
    "weights": "weights and buffers",
    "kv_cache": "KV cache (static: prompt + new tokens)",
    "vit_working_set": "ViT working set",
    "prefill": "prefill working set",
    "decode": "decode step working set",
    "transients": "transients (inputs)",
    "cuda_overhead": "CUDA context + allocator",
}


@dataclass(eq=False)
class Alloc:
    """One storage: its bytes, the part of the run that made it, and when (LiveBytes.clock) it lived."""
    nbytes: int
    region: str
    born: int
    died: int | None = None
    kind: str | None = None  # what it turned out to be (gradient, optimizer state, kv_cache), once known


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages that ops return while the mode is active, as long as they live.

    Storages that existed before (weights) are never counted; `region` (set by the caller's hooks)
    labels new ones. With a fake_mode, float tensors made by factories are made fake (see the module
    docstring) and bool masks indexing fake tensors become indices. block: round each storage up."""

    def __init__(self, fake_mode: FakeTensorMode | None = None, block: int = 1):
        super().__init__()
        self.fake_mode, self.block = fake_mode, block
        self.allocs: list[Alloc] = []
        self.storages = WeakIdKeyDictionary()  # storage -> its Alloc (None: there before, not counted)
        self.finalizers: list[weakref.finalize] = []
        self.live = self.peak = self.clock = self.peak_clock = 0
        self.region, self.peak_region = "forward", "forward"
        self.in_backward = False
        self.phase_peaks: dict[str, int] = {}  # region -> the most bytes live while it ran

    def ignore(self, tensors) -> None:
        for t in tensors:
            self.storages[t.untyped_storage()] = None

    def count(self, tensors, region: str | None = None) -> None:
        """Count tensors made outside any op (e.g. torch.tensor from a list) as if an op had made them."""
        for t in tensors:
            if t is not None:
                self._track(t, region or self.region)

    def mark(self, tensors, kind: str) -> None:
        for t in tensors:
            alloc = self.storages.get(t.untyped_storage())
            if alloc is not None:
                alloc.kind = kind

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.fake_mode is not None:
            out = self._fake_dispatch(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, self.region)
        return out

    def _fake_dispatch(self, func, args, kwargs):
        leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if not leaves:  # a factory: float results are fake, integer ones real (indices, masks)
            with self.fake_mode:
                out = func(*args, **kwargs)
            if all(t.is_floating_point() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)):
                return out
            return func(*args, **kwargs)
        if func in INDEXING and isinstance(args[0], FakeTensor):
            args = (args[0], [j for i in args[1] for j in real_indices(i)], *args[2:])
        return func(*args, **kwargs)

    def _track(self, t: torch.Tensor, region: str) -> None:
        storage = t.untyped_storage()
        if storage in self.storages or storage.nbytes() == 0:
            return
        self.clock += 1
        alloc = Alloc(-(-storage.nbytes() // self.block) * self.block, region, self.clock)
        self.storages[storage] = alloc
        self.allocs.append(alloc)
        self.finalizers.append(weakref.finalize(storage, self._free, alloc))
        self.live += alloc.nbytes
        self.phase_peaks[region] = max(self.phase_peaks.get(region, 0), self.live)
        if self.live > self.peak:
            self.peak, self.peak_clock, self.peak_region = self.live, self.clock, region

    def _free(self, alloc: Alloc) -> None:
        self.clock += 1
        alloc.died = self.clock
        self.live -= alloc.nbytes

    def at_peak(self) -> list[Alloc]:
        """The storages live at the peak."""
        t = self.peak_clock
        return [a for a in self.allocs if a.born <= t and (a.died is None or a.died > t)]

    def __exit__(self, *exc):
        for f in self.finalizers:  # the tracker is done: storages that outlive it are no longer followed
            f.detach()
        return super().__exit__(*exc)


INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
            torch.ops.aten._index_put_impl_.default}


def real_indices(index) -> tuple:
    """A real bool mask over k dims -> its k real long indices (the same selection); another index: (index,)."""
    if isinstance(index, torch.Tensor) and not isinstance(index, FakeTensor) and index.dtype == torch.bool:
        return index.nonzero(as_tuple=True)
    return (index,)


# --- the model, built without weights ------------------------------------------------------------------

def make_fake(model: nn.Module, fake_mode: FakeTensorMode) -> nn.Module:
    """Replace every (meta) parameter and buffer by a fake CPU tensor of its shape and dtype, in place.
    (Module.to_empty cannot: it swaps tensor types, which a fake tensor refuses.)"""
    with fake_mode:
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is not None:
                    module._parameters[name] = nn.Parameter(torch.empty_like(p, device="cpu"), p.requires_grad)
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = torch.empty_like(b, device="cpu")
    return model


def storage_bytes(tensors, block: int) -> int:
    """Bytes of the distinct storages of `tensors` (tied or viewed tensors count once)."""
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[id(s)] = (s, -(-s.nbytes() // block) * block)  # keep s alive: its id stays unique
    return sum(n for _, n in seen.values())


def region_hooks(model: GLM4V, tracker: LiveBytes, after_vision: str, loss: bool = False) -> list:
    """Hooks that set tracker.region: 'vision' in the ViT and projector, then `after_vision`; with
    `loss`, 'loss' from the final norm's output until its gradient is back; 'recompute' in a block run
    again in backward (checkpointing). Returns the handles."""
    handles = []

    def enter(region):
        def hook(*_):
            tracker.region = region
        return hook

    def after_norm(_module, _args, out):
        tracker.region = "loss"
        if out.requires_grad:
            out.register_hook(lambda grad: setattr(tracker, "region", "backward"))

    def block_in(*_):
        if tracker.in_backward:
            tracker.region = "recompute"

    def block_out(*_):
        if tracker.in_backward:
            tracker.region = "backward"

    if model.vision is not None:
        handles.append(model.vision.register_forward_pre_hook(enter("vision")))
        handles.append(model.projector.register_forward_hook(enter(after_vision), always_call=True))
    if loss:
        handles.append(model.text.final_norm.register_forward_hook(after_norm))
    for m in model.modules():
        if isinstance(m, Block | VisionBlock):
            handles.append(m.register_forward_pre_hook(block_in))
            handles.append(m.register_forward_hook(block_out, always_call=True))  # also when recompute stops early
    return handles


@dataclass
class Plan:
    """A predicted peak: `components` (bytes at the peak, keys of TRAINING_ / INFERENCE_COMPONENTS) add up
    to `peak_bytes`; `run_peak_bytes` is the peak above the model as built (what a measurement of the
    same run on real tensors sees); `phases`: the most bytes live during each part of the run."""
    kind: str                     # "training" or "inference"
    device: str                   # the device planned for
    description: str              # the model, the sample and the switches, in words
    components: dict[str, int]
    run_peak_bytes: int
    phases: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    sample_rows: int = 0          # decoder rows of the longest sample (after the image splice)

    @property
    def peak_bytes(self) -> int:
        return sum(self.components.values())


def finish_plan(kind: str, device: str, description: str, static: dict[str, int], tracker: LiveBytes,
                classify, started: float, sample_rows: int) -> Plan:
    """Add the storages live at the peak (by classify(alloc)) to the static bytes, and the CUDA overhead."""
    components = dict.fromkeys(TRAINING_COMPONENTS if kind == "training" else INFERENCE_COMPONENTS, 0)
    components.update(static)
    for alloc in tracker.at_peak():
        components[classify(alloc)] += alloc.nbytes
    base = sum(static.values())
    if device == "cuda":
        components["cuda_overhead"] = CUDA_CONTEXT_BYTES + round(CUDA_FRAGMENTATION * tracker.peak)
    phases = {region: base + n for region, n in tracker.phase_peaks.items()}
    return Plan(kind, device, description, components, tracker.peak, phases, time.perf_counter() - started,
                sample_rows)
