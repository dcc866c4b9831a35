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

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from glm4v_core.generation.sampling import NonFiniteLogitsError, Sampling, TokenRule, uniform_draws
from glm4v_core.generation.step import COMPILE_CACHE_MULTIPLE, compiled_graphs, decode_step_runner
from glm4v_core.model.glm4v import GLM4V, Prompt
from glm4v_core.model.splice import InputError


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
                  stats: GenerationStats | None = None, stop_rows: torch.Tensor | None = None) -> Iterator[Step]:
    """The generation loop, one Step per new token. Every input check runs at the call, before any
    compute; the model runs as the iterator is consumed.

    vocab_limit: only ids below it can be chosen (a tokenizer's vocabulary; the embedding has
    padding rows past it that decode to nothing). stats: the time to first token, the compile and
    warm-up time and the warm decode rate are recorded there (see GenerationStats).
    stop_rows: a (B,) bool CPU tensor the caller may set while it iterates: a row set there is done
    (its own token limit, a stop string, a cancelled request) and leaves as a row that produced a
    stop id does, from the next step on (padded; dropped from the compute in eager mode)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(sampling, Sampling):
        raise InputError(f"sampling must be a glm4v_core.Sampling, got {type(sampling).__name__}")
    stops = check_stop_ids(model, stop_ids)
    if stop_rows is not None and (stop_rows.dtype != torch.bool or tuple(stop_rows.shape) != (input_ids.shape[0],)):
        raise InputError(f"stop_rows must be a bool tensor of shape ({input_ids.shape[0]},) (one flag per row), "
                         f"got {stop_rows.dtype} {tuple(stop_rows.shape)}")
    prompt = model.check_prompt(input_ids, stack_images(model, pixel_values), attention_mask, position_ids,
                                max_new_tokens)
    return _decode_loop(model, prompt, max_new_tokens, sampling, stops, generator, vocab_limit, compile, stats,
                        stop_rows)


def _decode_loop(model: GLM4V, prompt: Prompt, max_new_tokens: int, sampling: Sampling, stops: torch.Tensor,
                 generator: torch.Generator | None, vocab_limit: int | None, compile: bool,
                 stats: GenerationStats | None, stop_rows: torch.Tensor | None) -> Iterator[Step]:
    stats = stats if stats is not None else GenerationStats()
    clock, start = stats.clock, stats.clock()
    step_start, stats.compile_s = start, 0.0
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
    warmup = False  # the step just run compiled or captured something: it and all before it are not timed
    for i in range(max_new_tokens):
        n_done, n_bad = counts.tolist()  # the one host sync per step
        ready = clock()
        if i == 0:
            stats.time_to_first_token_s = ready - start
        if warmup:
            stats.compile_s += ready - step_start
        if i == 0 or warmup:  # the warm window starts anew after the prefill and after every warm-up step
            warm_start, stats.warm_tokens, stats.warm_s = ready, 0, 0.0
        else:
            stats.warm_tokens, stats.warm_s = stats.warm_tokens + 1, ready - warm_start
        if n_bad:
            raise NonFiniteLogitsError(f"the model produced NaN/inf logits at new token {i}; "
                                       f"{first_non_finite_stage(model, prompt)}")
        n_running = tokens.shape[0]
        yield Step(i, tokens, logits, finished) if alive is None else whole_batch(i, batch, alive, rule.pad, tokens,
                                                                                  logits, finished)
        if stop_rows is not None and bool(stop_rows.any()):  # rows the caller is done with stop as if by a stop id
            released = stop_rows.to(device)
            finished = finished | (released if alive is None else released[alive])
            n_done = int(finished.sum())
        if i + 1 == max_new_tokens or n_done == n_running:
            return
        step_start = clock()
        graphs = compiled_graphs() if compile else 0
        with torch.inference_mode():
            if step_fn is None:
                step_fn = decode_step_runner(model, rule, cache, (tokens, positions, slot, finished, seen, uniform),
                                             compile)
            if not compile and n_done:  # drop stopped rows: later steps cost only the rest
                keep = (~finished).nonzero()[:, 0]
                cache.keep_rows(keep, int(slot))
                alive = keep if alive is None else alive[keep]
                tokens, positions, finished = tokens[keep], positions[keep], finished[keep]
                seen = None if seen is None else seen[keep]
            uniform = uniform_draws(sampling, tokens.shape[0], generator, device)
            tokens, logits, finished, seen, counts, positions, slot = step_fn(tokens, positions, slot, finished, seen,
                                                                              uniform)
        # the first compiled step (torch.compile, CUDA graph capture) and any later one during which
        # dynamo (re)compiled a graph (a guard failed) are warm-up, not decoding
        warmup = compile and (i == 0 or compiled_graphs() != graphs)


def whole_batch(index: int, batch: int, alive: torch.Tensor, pad: int, tokens: torch.Tensor, logits: torch.Tensor,
                finished: torch.Tensor) -> Step:
    """The Step of the whole batch from the running rows `alive`: dropped rows get pad, NaN logits, finished."""
    return Step(index, tokens.new_full((batch,), pad).index_copy(0, alive, tokens),
                logits.new_full((batch, logits.shape[-1]), float("nan")).index_copy(0, alive, logits),
                finished.new_ones(batch).index_copy(0, alive, finished))


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
        raise InputError("stop_ids must be a list of token ids (or None for the config's eos ids), "
                         f"got {stop_ids!r:.60}")
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


@dataclass
class GenerationStats:
    """Timings of one generation, filled in as its tokens arrive (stream_tokens / stream_text).

    The decode rate counts only warm steps: those after the prefill and after every compile and
    warm-up (the first compiled step, which compiles and on CUDA captures its graph, and any later
    step during which dynamo recompiled). Those warm-up steps are summed in compile_s instead."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token_s: float = 0.0  # prefill (incl. the ViT) + the first sampling
    compile_s: float = 0.0              # compile and warm-up steps (compile=True; 0 in eager)
    warm_tokens: int = 0                # tokens of the warm steps ...
    warm_s: float = 0.0                 # ... and the seconds from the token before them to their last
    total_s: float = 0.0
    clock: Callable[[], float] = field(default=time.perf_counter, repr=False, compare=False)  # tests pass a fake

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the warm steps (0 when there were none)."""
        return self.warm_tokens / self.warm_s if self.warm_tokens and self.warm_s > 0 else 0.0

    def summary(self) -> str:
        compiled = f", compile + warm-up {self.compile_s:.2f} s" if self.compile_s else ""
        if not self.warm_tokens:
            rate = "no warm decode step to time" if self.compile_s else "no decode step"
        else:
            rate = f"decode {self.decode_tokens_per_s:.1f} tok/s" + (" (warm)" if self.compile_s else "")
        return (f"{self.new_tokens} tokens in {self.total_s:.2f} s: time to first token "
                f"{self.time_to_first_token_s:.3f} s{compiled}, {rate} (prompt {self.prompt_tokens} tokens)")
