"""Sampling settings and the token rule of one step: greedy, temperature, top-k, top-p,
repetition penalty; stop ids and the padding of rows that have stopped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from glm4v_core.errors import GLM4VError


class SamplingError(GLM4VError):
    """Sampling settings or stop strings that cannot be used; the message names the setting."""


class NonFiniteLogitsError(GLM4VError):
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
            raise SamplingError(f"temperature must be > 0, got {self.temperature} (use do_sample=False for greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise SamplingError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")


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


