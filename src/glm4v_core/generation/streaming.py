"""Text streaming: token ids -> text deltas (UTF-8 safe), stop strings, and the timing of a run.
"""
from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch

from glm4v_core.generation.loop import GenerationStats, Step, stream_tokens
from glm4v_core.generation.sampling import Sampling, SamplingError
from glm4v_core.model.glm4v import GLM4V
from glm4v_core.model.splice import InputError


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
            raise SamplingError(f"stop_strings must be a list of non-empty str, got {stop_strings!r}")
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
    start = stats.clock()  # the loop times the first token and the decode steps; this, the whole answer
    try:
        for step in steps:
            token, stopped = int(step.tokens[0]), bool(step.finished[0])
            stats.new_tokens += 1
            stats.total_s = stats.clock() - start
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
        stats.total_s = stats.clock() - start


