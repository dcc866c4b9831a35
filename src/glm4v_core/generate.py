"""Generation: thin loops over the model's two units, prefill and decode_step.

    prefill      the whole left-padded, image-spliced prompt fills cache slots 0..T-1 in one
                 forward; the logits at the last slot choose token 0.
    decode_step  step i feeds each row's token i at cache slot T + i and rotary position next + i,
                 where next = the prompt's largest position + 1. Slots and positions differ: an
                 image's patch rows fill one slot each but share one position.

Every input check runs once, at the call, before any compute (GLM4V.check_prompt). The cache is
sized once (B, T + max_new_tokens) and decode steps have the same shapes at every length. A new
token is one call of decode_and_choose (the decode step, then the TokenRule: choose, pad stopped
rows, check stop ids) and one host read (how many rows are done, whether the logits were finite):
with `compile=True` that whole unit is compiled with torch.compile (fullgraph) and, on CUDA,
replayed from a CUDA graph. Rows that hit a stop id are padded with pad_token_id afterwards; in eager mode they
also leave the batch (KVCache.keep_rows), so later steps compute only the rows still running.
"""
from __future__ import annotations

import codecs
import functools
import importlib.util
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .cache import KVCache
from .model import GLM4V, MAX_CONTEXT, InputError, Prompt

__all__ = ["MAX_CONTEXT", "Sampling", "Step", "GenerationStats", "generate", "stream_tokens", "stream_text",
           "next_token", "TextDeltas", "NonFiniteLogitsError"]


# With compile=True the cache length is rounded up to a multiple of this: the compiled step (and
# its CUDA graph) is specialized to the cache's shape, and this bounds the number of shapes.
COMPILE_CACHE_MULTIPLE = 256
# How many compiled decode steps (one per model, batch size, cache size, rule) a process may hold.
MAX_COMPILED_STEPS = 64


class NonFiniteLogitsError(ValueError):
    """The model produced NaN or inf logits (bad weights or an overflow); the message names the stage."""


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits (HF semantics and order of application)."""

    do_sample: bool = False          # False: argmax (greedy); True: draw from the softmax
    temperature: float = 1.0         # logits / temperature before sampling (sampling only)
    top_k: int = 0                   # keep the k largest logits, ties included (0 = off; sampling only)
    top_p: float = 1.0               # keep the smallest set whose probability >= top_p (1.0 = off; sampling only)
    repetition_penalty: float = 1.0  # CTRL rule on tokens already in the prompt or output (1.0 = off)

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature} (use do_sample=False for greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")


def next_token(logits: torch.Tensor, sampling: Sampling, seen: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). `seen` (B, V) bool marks tokens for the repetition penalty."""
    return choose_token(logits, sampling, seen, uniform_draws(sampling, logits.shape[0], generator, logits.device))


def uniform_draws(sampling: Sampling, rows: int, generator: torch.Generator | None,
                  device: torch.device) -> torch.Tensor | None:
    """The randomness of one sampling step, (rows,) in [0, 1); None when greedy."""
    return torch.rand(rows, generator=generator, device=device) if sampling.do_sample else None


def choose_token(logits: torch.Tensor, sampling: Sampling, seen: torch.Tensor | None,
                 uniform: torch.Tensor | None) -> torch.Tensor:
    """next_token with its random draw given (uniform (B,) in [0, 1), from uniform_draws): no generator
    inside, so a compiled step can sample. A row takes the first token whose cumulative probability
    passes its draw (inverse-CDF sampling: each token is hit with its probability)."""
    logits = logits.float()
    if sampling.repetition_penalty != 1.0 and seen is not None:
        p = sampling.repetition_penalty  # shrink a seen token's logit toward -inf, whatever its sign
        logits = torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)
    if not sampling.do_sample:
        return logits.argmax(-1)  # first index on ties, as HF
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        logits = keep_top_p(logits, sampling.top_p)
    cdf = torch.softmax(logits, dim=-1).cumsum(-1, dtype=torch.float64)  # (B, V); float64: tiny tokens keep their share
    # tokens with probability 0 never pass: their cdf equals the one before them
    return (cdf <= uniform[:, None] * cdf[:, -1:]).sum(-1)


def keep_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: drop a token when the tokens ranked above it already hold >= top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(-1) - probs  # the first token always stays (mass_before = 0)
    drop_sorted = mass_before >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


@dataclass
class Step:
    index: int                # 0 for the token from the prefill logits
    tokens: torch.Tensor      # (B,) chosen ids; pad_token_id for rows stopped at an earlier step
    logits: torch.Tensor      # (B, V) the model's raw logits that chose them (NaN: rows stopped earlier)
    finished: torch.Tensor    # (B,) bool: the row has produced a stop id (at this step or before)


@dataclass(frozen=True)
class TokenRule:
    """What happens to a step's logits: the sampling rule, the ids that may be chosen, the stop ids,
    and the padding of rows that have stopped."""

    sampling: Sampling
    stops: torch.Tensor           # (n,) ids that end a row
    pad: int                      # the token of a row after it ended
    unknown: torch.Tensor | None  # (V,) bool: ids never chosen (past a tokenizer's vocabulary); None = none

    def __call__(self, logits: torch.Tensor, finished: torch.Tensor, seen: torch.Tensor | None,
                 uniform: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """logits (B, V) of the running rows -> tokens (B,), logits (B, V) with NaN rows for rows that
        had stopped, finished (B,), seen (B, V) or None, and counts (2,) = [rows finished, non-finite
        logits]: the one tensor the loop reads on the host."""
        allowed = logits if self.unknown is None else logits.float().masked_fill(self.unknown, float("-inf"))
        tokens = choose_token(allowed, self.sampling, seen, uniform)
        if seen is not None:
            seen = seen.scatter(1, tokens[:, None], True)
        non_finite = (~torch.isfinite(logits)).count_nonzero()  # no int64 copy of the logits
        tokens = tokens.masked_fill(finished, self.pad)
        logits = logits.masked_fill(finished[:, None], float("nan"))
        finished = finished | torch.isin(tokens, self.stops)
        return tokens, logits, finished, seen, torch.stack((finished.sum(), non_finite))


def decode_and_choose(model: GLM4V, rule: TokenRule, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor,
                      slot: torch.Tensor, finished: torch.Tensor, seen: torch.Tensor | None,
                      uniform: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """One whole new token for the running rows, the unit that compile=True compiles: the model's decode
    step from the last tokens (B,), then the rule. Returns the rule's five outputs, then the next
    positions and slot. Nothing is changed in place but the cache."""
    logits = model.decode_step(tokens[:, None], positions, slot, cache)
    return (*rule(logits, finished, seen, uniform), positions + 1, slot + 1)


def generate(model: GLM4V, input_ids: torch.Tensor, pixel_values: torch.Tensor | Sequence[torch.Tensor] | None = None,
             attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None, *,
             max_new_tokens: int = 16, sampling: Sampling = Sampling(), stop_ids: Sequence[int] | None = None,
             generator: torch.Generator | None = None, compile: bool = False) -> torch.Tensor:
    """New tokens (B, n) for a (left-padded) batch, n <= max_new_tokens.

    stop_ids None = the config's eos ids; [] = never stop. A row that stops keeps its stop id and
    is padded with pad_token_id after it; n is the longest row (the loop ends when all rows stop).
    pixel_values: (N, 3, S, S) or a list of N (3, S, S), one per image block, in reading order.
    compile: run decode steps through torch.compile (and a CUDA graph on CUDA); same tokens.
    """
    steps = stream_tokens(model, input_ids, pixel_values, attention_mask, position_ids, max_new_tokens=max_new_tokens,
                          sampling=sampling, stop_ids=stop_ids, generator=generator, compile=compile)
    out, n = None, 0
    for step in steps:
        if out is None:  # preallocated once: no growth on the hot path
            out = step.tokens.new_full((step.tokens.shape[0], max_new_tokens), model.config.pad_token_id)
        out[:, step.index] = step.tokens
        n = step.index + 1
    return out[:, :n]


def stream_tokens(model: GLM4V, input_ids: torch.Tensor,
                  pixel_values: torch.Tensor | Sequence[torch.Tensor] | None = None,
                  attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None, *,
                  max_new_tokens: int = 16, sampling: Sampling = Sampling(), stop_ids: Sequence[int] | None = None,
                  generator: torch.Generator | None = None, vocab_limit: int | None = None, compile: bool = False,
                  stats: GenerationStats | None = None) -> Iterator[Step]:
    """The generation loop, one Step per new token. Every input check runs at the call, before any
    compute; the model runs as the iterator is consumed.

    vocab_limit: only ids below it can be chosen (a tokenizer's vocabulary; the embedding has
    padding rows past it that decode to nothing). stats: compile time is recorded there."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(sampling, Sampling):
        raise InputError(f"sampling must be a glm4v_core.generate.Sampling, got {type(sampling).__name__}")
    stops = check_stop_ids(model, stop_ids)
    prompt = model.check_prompt(input_ids, stack_images(model, pixel_values), attention_mask, position_ids,
                                max_new_tokens)
    return _decode_loop(model, prompt, max_new_tokens, sampling, stops, generator, vocab_limit, compile, stats)


def _decode_loop(model: GLM4V, prompt: Prompt, max_new_tokens: int, sampling: Sampling, stops: torch.Tensor,
                 generator: torch.Generator | None, vocab_limit: int | None, compile: bool,
                 stats: GenerationStats | None) -> Iterator[Step]:
    device, batch, vocab = model.device, prompt.input_ids.shape[0], model.config.vocab_size
    unknown = None if vocab_limit is None else torch.arange(vocab, device=device) >= vocab_limit
    rule = TokenRule(sampling, stops.to(device), model.config.pad_token_id, unknown)
    # inference_mode is entered per block, never across a yield (it would leak into the caller)
    with torch.inference_mode():
        cache_len = prompt.spliced_length + max_new_tokens
        if compile:  # a few cache sizes, so that a new prompt length rarely means a new compile
            cache_len = -(-cache_len // COMPILE_CACHE_MULTIPLE) * COMPILE_CACHE_MULTIPLE
        state = model.prefill(prompt, cache_len)
        positions, slot, cache = state.positions, state.slot, state.cache
        seen = None
        if sampling.repetition_penalty != 1.0:  # (B, V) prompt tokens, left pads excluded
            real = torch.ones_like(prompt.input_ids) if prompt.attention_mask is None else prompt.attention_mask
            seen = torch.zeros(batch, vocab, dtype=torch.long, device=device)
            seen = seen.scatter_add_(1, prompt.input_ids, real) > 0
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        uniform = uniform_draws(sampling, batch, generator, device)
        tokens, logits, finished, seen, counts = rule(state.logits, finished, seen, uniform)
    # The tensors above describe the running rows: all rows, unless eager decoding dropped some
    # (`alive`: their rows in the batch); compiled steps keep every row (fixed shapes).
    alive, step_fn = None, None
    for i in range(max_new_tokens):
        n_done, n_bad = counts.tolist()  # the one host sync per step
        if n_bad:
            raise NonFiniteLogitsError(f"the model produced NaN/inf logits at new token {i}; "
                                       f"{first_non_finite_stage(model, prompt)}")
        n_running = tokens.shape[0]
        yield Step(i, tokens, logits, finished) if alive is None else whole_batch(i, batch, alive, rule.pad, tokens,
                                                                                  logits, finished)
        if i + 1 == max_new_tokens or n_done == n_running:
            return
        with torch.inference_mode():
            if step_fn is None:
                start = time.perf_counter()
                step_fn = decode_step_runner(model, rule, cache, (tokens, positions, slot, finished, seen, uniform),
                                             compile)
                if stats is not None and compile:
                    stats.compile_s = time.perf_counter() - start
            if not compile and n_done:  # drop stopped rows: later steps cost only the rest
                keep = (~finished).nonzero()[:, 0]
                cache.keep_rows(keep, int(slot))
                alive = keep if alive is None else alive[keep]
                tokens, positions, finished = tokens[keep], positions[keep], finished[keep]
                seen = None if seen is None else seen[keep]
            uniform = uniform_draws(sampling, tokens.shape[0], generator, device)
            tokens, logits, finished, seen, counts, positions, slot = step_fn(tokens, positions, slot, finished, seen,
                                                                              uniform)


def whole_batch(index: int, batch: int, alive: torch.Tensor, pad: int, tokens: torch.Tensor, logits: torch.Tensor,
                finished: torch.Tensor) -> Step:
    """The Step of the whole batch from the running rows `alive`: dropped rows get pad, NaN logits, finished."""
    return Step(index, tokens.new_full((batch,), pad).index_copy(0, alive, tokens),
                logits.new_full((batch, logits.shape[-1]), float("nan")).index_copy(0, alive, logits),
                finished.new_ones(batch).index_copy(0, alive, finished))


StepFn = Callable[..., tuple[torch.Tensor, ...]]


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
        for static, value in zip(self.inputs, inputs):
            if static is not None:
                static.copy_(value)
        self.graph.replay()
        return clone_all(self.outputs)


def clone_all(tensors: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor | None, ...]:
    return tuple(None if t is None else t.clone() for t in tensors)


def first_non_finite_stage(model: GLM4V, prompt: Prompt) -> str:
    """Re-run the prompt without a cache and name the first stage whose output is not finite."""
    with torch.inference_mode():
        out = model(prompt.input_ids, prompt.pixel_values, prompt.attention_mask, prompt.position_ids,
                    output_hidden_states=True)
    stages = [] if out.image_embeds is None else [("image embeddings", out.image_embeds)]
    stages += [("word embeddings" if i == 0 else f"decoder layer {i - 1}", h) for i, h in enumerate(out.hidden_states)]
    stages += [("logits", out.logits)]
    for name, t in stages:
        if not bool(torch.isfinite(t).all()):
            return f"first non-finite stage of the prompt's forward: {name}"
    return "the prompt's forward is finite: the first non-finite value appeared in a decode step"


def check_stop_ids(model: GLM4V, stop_ids: Sequence[int] | None) -> torch.Tensor:
    """None (the config's eos ids) or a sequence of token ids of the vocabulary -> (n,) int64."""
    if stop_ids is None:
        return torch.tensor(model.config.eos_token_ids, dtype=torch.long)
    if isinstance(stop_ids, (str, bytes, int)) or not isinstance(stop_ids, Sequence):
        raise InputError(f"stop_ids must be a list of token ids (or None for the config's eos ids), got {stop_ids!r:.60}")
    vocab = model.config.vocab_size
    for i in stop_ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab:
            raise InputError(f"stop_ids must hold token ids in [0, {vocab}), got {i!r}")
    return torch.tensor(list(stop_ids), dtype=torch.long)


def stack_images(model: GLM4V, pixel_values) -> torch.Tensor | None:
    """None, (N, 3, S, S), or a list of (3, S, S) -> (N, 3, S, S) of the model's image size."""
    if pixel_values is None or isinstance(pixel_values, torch.Tensor):
        return pixel_values  # checked by model.check_prompt
    images = list(pixel_values)
    if not images:
        return None
    v = model.config.vision
    want = (v.in_channels, v.image_size, v.image_size)
    for i, image in enumerate(images):
        if not isinstance(image, torch.Tensor) or tuple(image.shape) != want:
            shape = tuple(getattr(image, "shape", ()))
            raise InputError(f"image {i} has shape {shape}, but this model takes {want} (every image "
                             f"is resized to vision_config.image_size = {v.image_size})")
    return torch.stack(images)


# -- text -----------------------------------------------------------------------------------------

class TokenDecoder(Protocol):
    vocab_size: int  # ids the decoder knows: generation never picks others

    def decode_bytes(self, ids: Sequence[int]) -> bytes: ...


class TextDeltas:
    """Token ids in, text out, never splitting a character or emitting part of a stop string.

    An incremental UTF-8 decoder holds back an incomplete multi-byte tail until its last byte
    arrives; text that could be the start of a stop string is held until it cannot. The work per
    token is bounded by the token's length and the longest stop string."""

    def __init__(self, decoder: TokenDecoder, stop_strings: Sequence[str] = ()):
        if isinstance(stop_strings, str) or any(not isinstance(s, str) or not s for s in stop_strings):
            raise ValueError(f"stop_strings must be a list of non-empty str, got {stop_strings!r}")
        self.decoder, self.stop_strings = decoder, tuple(stop_strings)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""      # decoded text not yet emitted: it might begin a stop string
        self.stopped = False  # a stop string was found; nothing more will be emitted

    def push(self, token_id: int) -> str:
        return self._release(self._held + self._utf8.decode(self.decoder.decode_bytes([token_id])), final=False)

    def flush(self) -> str:
        """The held text at the end (an unfinished character becomes U+FFFD)."""
        return self._release(self._held + self._utf8.decode(b"", final=True), final=True)

    def _release(self, text: str, final: bool) -> str:
        if self.stopped:
            return ""
        hits = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[:min(hits)]
        keep = 0 if final else self._stop_prefix_length(text)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        return max((n for s in self.stop_strings for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if s.startswith(text[len(text) - n:])), default=0)


@dataclass
class GenerationStats:
    """Filled in by stream_text: when the first token came, how many followed, and compile time."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token_s: float = 0.0  # prefill (incl. the ViT) + the first sampling
    compile_s: float = 0.0              # torch.compile + CUDA graph capture of the decode step (compile=True)
    total_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first, per second of decoding (the prefill and the compile are not in it)."""
        decode_s = self.total_s - self.time_to_first_token_s - self.compile_s
        return (self.new_tokens - 1) / decode_s if self.new_tokens > 1 and decode_s > 0 else 0.0

    def summary(self) -> str:
        compiled = f", compile {self.compile_s:.2f} s" if self.compile_s else ""
        return (f"{self.new_tokens} tokens in {self.total_s:.2f} s: time to first token "
                f"{self.time_to_first_token_s:.3f} s{compiled}, decode {self.decode_tokens_per_s:.1f} tok/s "
                f"(prompt {self.prompt_tokens} tokens)")


def stream_text(model: GLM4V, tokenizer: TokenDecoder, input_ids: torch.Tensor,
                pixel_values: torch.Tensor | Sequence[torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None, *,
                max_new_tokens: int = 256, sampling: Sampling = Sampling(), stop_ids: Sequence[int] | None = None,
                stop_strings: Sequence[str] = (), generator: torch.Generator | None = None,
                stats: GenerationStats | None = None, compile: bool = False) -> Iterator[str]:
    """Text deltas of one prompt (batch 1) as tokens arrive; stop ids and stop strings are not emitted.

    Only ids below tokenizer.vocab_size are chosen. Inputs are checked at the call; the model
    runs as the iterator is consumed. `stats`, when given, is filled in as tokens arrive."""
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[0] != 1:
        raise InputError(f"stream_text streams one prompt, got a batch of {input_ids.shape[0]}; use generate()")
    deltas = TextDeltas(tokenizer, stop_strings)
    stats = stats if stats is not None else GenerationStats()
    steps = stream_tokens(model, input_ids, pixel_values, attention_mask, position_ids, max_new_tokens=max_new_tokens,
                          sampling=sampling, stop_ids=stop_ids, generator=generator, vocab_limit=tokenizer.vocab_size,
                          compile=compile, stats=stats)
    stats.prompt_tokens = input_ids.shape[-1]
    return _stream_text(steps, deltas, stats)


def _stream_text(steps: Iterator[Step], deltas: TextDeltas, stats: GenerationStats) -> Iterator[str]:
    start = time.perf_counter()
    try:
        for step in steps:
            token, stopped = int(step.tokens[0]), bool(step.finished[0])  # the sync that makes timing honest
            stats.new_tokens += 1
            stats.total_s = time.perf_counter() - start
            if step.index == 0:
                stats.time_to_first_token_s = stats.total_s
            if stopped:
                break  # a stop id: not part of the answer
            delta = deltas.push(token)
            if delta:
                yield delta
            if deltas.stopped:
                break
        tail = deltas.flush()
        if tail:
            yield tail
    finally:
        steps.close()
        stats.total_s = time.perf_counter() - start
