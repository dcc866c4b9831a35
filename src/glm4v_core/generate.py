"""Generation: thin loops over the model's two units, prefill and decode_step.

    prefill      the whole left-padded, image-spliced prompt fills cache slots 0..T-1 in one
                 forward; the logits at the last slot choose token 0.
    decode_step  step i feeds each row's token i at cache slot T + i and rotary position next + i,
                 where next = the prompt's largest position + 1. Slots and positions differ: an
                 image's patch rows fill one slot each but share one position.

Every input check runs once, at the call, before any compute (GLM4V.check_prompt). The cache is
sized once (B, T + max_new_tokens) and decode steps have the same shapes at every length: with
`compile=True` the step is compiled with torch.compile (fullgraph) and, on CUDA, replayed from a
CUDA graph. Rows that hit a stop id are padded with pad_token_id afterwards; in eager mode they
also leave the batch (KVCache.keep_rows), so later steps compute only the rows still running.
"""
from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .cache import KVCache
from .model import GLM4V, MAX_CONTEXT, DecodeState, InputError, Prompt

__all__ = ["MAX_CONTEXT", "Sampling", "Step", "GenerationStats", "generate", "stream_tokens", "stream_text",
           "next_token", "TextDeltas", "NonFiniteLogitsError"]


# With compile=True the cache length is rounded up to a multiple of this: the compiled step (and
# its CUDA graph) is specialized to the cache's shape, and this bounds the number of shapes.
COMPILE_CACHE_MULTIPLE = 256


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
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


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
    device, pad = model.device, model.config.pad_token_id
    batch = prompt.input_ids.shape[0]
    stops = stops.to(device)
    seen = None
    if sampling.repetition_penalty != 1.0:  # (B, V) prompt tokens, left pads excluded
        real = torch.ones_like(prompt.input_ids) if prompt.attention_mask is None else prompt.attention_mask
        seen = torch.zeros(batch, model.config.vocab_size, dtype=torch.long, device=device)
        seen = seen.scatter_add_(1, prompt.input_ids, real) > 0
    # inference_mode is entered per block, never across a yield (it would leak into the caller)
    with torch.inference_mode():
        cache_len = prompt.spliced_length + max_new_tokens
        if compile:  # a few cache sizes, so that a new prompt length rarely means a new compile
            cache_len = -(-cache_len // COMPILE_CACHE_MULTIPLE) * COMPILE_CACHE_MULTIPLE
        state = model.prefill(prompt, cache_len)
        logits = state.logits
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        alive = torch.arange(batch, device=device)  # the rows still running, in cache-row order
        unknown = None if vocab_limit is None else torch.arange(vocab_limit, logits.shape[-1], device=device)
    step_fn = None
    for i in range(max_new_tokens):
        with torch.inference_mode():
            allowed = logits if unknown is None else logits.float().index_fill(-1, unknown, float("-inf"))
            picked = next_token(allowed, sampling, None if seen is None else seen[alive], generator)
            if seen is not None:
                seen[alive, picked] = True
            # one host sync per step: how many rows are done, and whether the logits were finite
            n_bad = (~torch.isfinite(logits)).sum()
            # rows stopped at an earlier step get pad and NaN logits (compiled steps keep them in the batch)
            token = torch.full((batch,), pad, dtype=torch.long, device=device).index_copy_(0, alive, picked)
            token = token.masked_fill(finished, pad)
            full = logits.new_full((batch, logits.shape[-1]), float("nan")).index_copy_(0, alive, logits)
            logits = full.masked_fill(finished[:, None], float("nan"))
            finished = finished | torch.isin(token, stops)
            n_done, n_bad = torch.stack((finished.sum(), n_bad)).tolist()
        if n_bad:
            raise NonFiniteLogitsError(f"the model produced NaN/inf logits at new token {i}; "
                                       f"{first_non_finite_stage(model, prompt)}")
        yield Step(i, token, logits, finished)
        if i + 1 == max_new_tokens or n_done == batch:
            return
        with torch.inference_mode():
            if step_fn is None:
                start = time.perf_counter()
                step_fn = decode_step_runner(model, state, compile)
                if stats is not None and compile:
                    stats.compile_s = time.perf_counter() - start
            if not compile and batch - n_done < len(alive):  # drop stopped rows: later steps cost only the rest
                keep = (~finished[alive]).nonzero()[:, 0]
                state.cache.keep_rows(keep, int(state.slot))
                alive, state.positions = alive[keep], state.positions[keep]
            tokens = token[alive][:, None]
            logits = step_fn(tokens, state.positions, state.slot, state.cache)
            state.positions += 1
            state.slot += 1


StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, KVCache], torch.Tensor]


def decode_step_runner(model: GLM4V, state: DecodeState, compile: bool) -> StepFn:
    """model.decode_step, or with compile=True its torch.compile'd graph (fullgraph: no graph breaks),
    replayed from a CUDA graph on CUDA. Compiling and capturing happen here, before the first step;
    the warm-up runs write the next slot, which the first real step overwrites before reading it."""
    if not compile:
        return model.decode_step
    step = torch.compile(model.decode_step, fullgraph=True, dynamic=False)
    tokens = torch.full((state.cache.rows, 1), model.config.pad_token_id, dtype=torch.long, device=model.device)
    if model.device.type != "cuda":
        step(tokens, state.positions.clone(), state.slot.clone(), state.cache)  # compile now, not in step 1
        return step
    return CUDAGraphStep(step, tokens, state)


class CUDAGraphStep:
    """A decode step captured once in a CUDA graph and replayed: one launch per step instead of
    hundreds. The inputs are copied into the graph's static tensors; the logits tensor it returns
    is the graph's own and is overwritten by the next replay."""

    def __init__(self, step: StepFn, tokens: torch.Tensor, state: DecodeState):
        self.inputs = (tokens.clone(), state.positions.clone(), state.slot.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: compiles kernels, settles the allocator
            for _ in range(2):
                step(*self.inputs, state.cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(*self.inputs, state.cache)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor,
                 cache: KVCache) -> torch.Tensor:
        for static, value in zip(self.inputs, (tokens, positions, slot)):
            static.copy_(value)
        self.graph.replay()
        return self.logits


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
