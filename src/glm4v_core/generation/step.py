"""The decode step: one new token for the running rows (the model's decode step, then the token
rule), eager, compiled with torch.compile, or replayed from a CUDA graph.
"""
from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch

from glm4v_core.generation.sampling import TokenRule
from glm4v_core.model.cache import KVCache
from glm4v_core.model.glm4v import GLM4V

StepFn = Callable[..., tuple[torch.Tensor, ...]]  # a decode step: eager, compiled or a CUDA graph

# With compile=True the cache length is rounded up to a multiple of this: the compiled step (and
# its CUDA graph) is specialized to the cache's shape, and this bounds the number of shapes.
COMPILE_CACHE_MULTIPLE = 256


# How many compiled decode steps (one per model, batch size, cache size, rule) a process may hold.
MAX_COMPILED_STEPS = 64


def decode_and_choose(model: GLM4V, rule: TokenRule, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor,
                      slot: torch.Tensor, finished: torch.Tensor, seen: torch.Tensor | None,
                      uniform: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """One whole new token for the running rows, the unit that compile=True compiles: the model's decode
    step from the last tokens (B,), then the rule. Returns the rule's five outputs, then the next
    positions and slot. Nothing is changed in place but the cache."""
    logits = model.decode_step(tokens[:, None], positions, slot, cache)
    return (*rule(logits, finished, seen, uniform), positions + 1, slot + 1)


def decode_step_runner(model: GLM4V, rule: TokenRule, cache: KVCache, example: tuple, compile: bool) -> StepFn:
    """decode_and_choose for this model, rule and cache; with compile=True its torch.compile'd graph
    (fullgraph: no graph breaks), replayed from a CUDA graph on CUDA. Compiling and capturing happen
    here, before the first step, on `example` inputs; these warm-up runs write the next slot, which
    the first real step overwrites before reading it."""
    step = functools.partial(decode_and_choose, model, rule, cache)
    if not compile:
        return step
    options = cpu_compile_options() if model.device.type == "cpu" else {}
    step = torch.compile(step, fullgraph=True, dynamic=False, options=options)
    # Each model, batch size, cache size and rule compiles one more graph of decode_and_choose; past
    # dynamo's limit (8) a fullgraph compile fails, so a long chat (a cache size per 256 slots) would.
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"  # older torch
    with torch._dynamo.config.patch(**{limit: MAX_COMPILED_STEPS}):
        if model.device.type != "cuda":
            step(*example)  # compile now, not in step 1
            return step
        return CUDAGraphStep(step, example)


def compiled_graphs() -> int:
    """How many graphs dynamo has compiled in this process: a decode step during which the count
    grew recompiled (a new shape, a failed guard), so its time is warm-up, not decoding."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def cpu_compile_options() -> dict:
    """Inductor options of the compiled CPU step, each only where this torch version has it:
    - no size asserts: dynamo's guards already check every input's shape and strides, and the
      asserts are Python work on every token;
    - batch-1 products (one row, both weight sides <= 2048) as inductor's own fused loops instead
      of BLAS calls: on small models the BLAS call, not the arithmetic, is the cost."""
    config, options = torch._inductor.config, {}
    if hasattr(config, "size_asserts"):
        options["size_asserts"] = False
    if importlib.util.find_spec("torch._inductor.fx_passes.decompose_mem_bound_mm") is not None:
        options["post_grad_fusion_options"] = {**config.post_grad_fusion_options, "decompose_mm_pass": {}}
    return options


class CUDAGraphStep:
    """A decode step captured once in a CUDA graph and replayed: one launch per step instead of
    hundreds. The inputs are copied into the graph's static tensors, and its outputs copied out (the
    next replay overwrites them; the caller may keep a Step)."""

    def __init__(self, step: StepFn, example: tuple):
        self.inputs = clone_all(example)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: compiles kernels, settles the allocator
            for _ in range(2):
                step(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = step(*self.inputs)

    def __call__(self, *inputs: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        for static, value in zip(self.inputs, inputs, strict=False):
            if static is not None:
                static.copy_(value)
        self.graph.replay()
        return clone_all(self.outputs)


def clone_all(tensors: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor | None, ...]:
    return tuple(None if t is None else t.clone() for t in tensors)
