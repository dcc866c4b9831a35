"""Causal-LM loss of GLM-4V: the reference's label rule, computed without full-sequence logits.

Labels are given per input token (-100 = not counted). After the image splice, every output slot
takes the label of the token it came from; an image block's boi and eoi rows keep the labels of
the boi and eoi tokens, its patch rows and every padding slot count nothing. Then the usual shift:
hidden state t predicts label t + 1, cross entropy in fp32, mean over every counted token of the
batch (not per row).

Memory: the plain way builds fp32 logits (B, T, vocab) for the whole sequence (1.1 GB for one
1120 px image prompt with the real 151552-word vocabulary, plus as much again for their gradient).
`linear_cross_entropy` only looks at the counted positions and walks the vocabulary in chunks with
a running log-sum-exp; backward recomputes each chunk's logits instead of keeping them. A quantized
head is dequantized chunk by chunk too (forward and again in backward), never whole. Same loss and
gradients as the plain path (tests/model/test_loss.py).
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from einops import rearrange

from glm4v_core.errors import GLM4VError

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 8192  # vocabulary columns per chunk: (counted tokens x 8192) fp32 at a time


class Rows(Protocol):
    """A (V, H) weight that makes its rows when sliced (`w[a:b]`, a tensor), never whole at once."""

    shape: torch.Size

    def __getitem__(self, rows: slice) -> torch.Tensor: ...


class LabelError(GLM4VError):
    """labels that do not fit input_ids or the vocabulary; the message says which and how."""


def check_labels(labels: torch.Tensor, input_ids: torch.Tensor, vocab_size: int) -> None:
    """labels (B, L): integer, input_ids' shape, each -100 or a token id of the vocabulary."""
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise LabelError(f"labels must be an integer tensor (B, L), got {type(labels).__name__} "
                         f"{getattr(labels, 'dtype', '')}")
    if labels.shape != input_ids.shape:
        raise LabelError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}: "
                         "give one label per input token (-100 where nothing is learned)")
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        raise LabelError(f"labels[{row}, {col}] = {int(labels[row, col])} is neither {IGNORE_INDEX} (ignored) "
                         f"nor a token id in [0, {vocab_size})")


def splice_labels(labels: torch.Tensor, source_index: torch.Tensor | None, is_patch: torch.Tensor | None,
                  attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Labels (B, L) of the input tokens -> labels (B, T) of the spliced sequence.

    source_index (B, T): the input token each output slot comes from (None: no splice, T = L);
    is_patch (B, T): slot holds an image patch row; attention_mask (B, T): the spliced mask, 0 on
    padding. Patch rows and padding get -100; boi/eoi rows keep their tokens' labels."""
    spliced = labels.long() if source_index is None else labels.long().gather(1, source_index)
    ignored = torch.zeros_like(spliced, dtype=torch.bool)
    if is_patch is not None:
        ignored |= is_patch
    if attention_mask is not None:
        ignored |= attention_mask == 0
    return spliced.masked_fill(ignored, IGNORE_INDEX)


def causal_lm_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor | Rows, labels: torch.Tensor,
                   chunk_size: int | None = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Mean next-token cross entropy (fp32 scalar) of final-normed hidden (B, T, H) against the
    spliced labels (B, T). lm_head_weight (V, H): a tensor, or rows made on demand (a quantized
    head's DequantizedRows: `w[a:b]` dequantizes those rows). chunk_size None: the plain path (fp32
    logits of the whole sequence, as the reference computes them); else `linear_cross_entropy` over
    the counted positions. A batch with no counted token gives 0 (nothing to learn), not NaN."""
    targets = labels[:, 1:]  # hidden state t predicts token t + 1
    counted = targets != IGNORE_INDEX  # (B, T-1)
    n = counted.sum().clamp(min=1)
    if chunk_size is None:
        logits = F.linear(hidden[:, :-1], lm_head_weight[:]).float()  # (B, T-1, V), model dtype then fp32
        total = F.cross_entropy(rearrange(logits, "b t v -> (b t) v"), rearrange(targets, "b t -> (b t)"),
                                ignore_index=IGNORE_INDEX, reduction="sum")
        return total / n
    return linear_cross_entropy(hidden[:, :-1][counted], lm_head_weight, targets[counted], chunk_size) / n


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor | Rows, targets: torch.Tensor,
                         chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """sum_i [logsumexp(hidden_i @ weight.T) - (hidden_i @ weight.T)[targets_i]] in fp32.

    hidden (N, H), weight (V, H) (a tensor, or Rows: frozen, sliced again in backward), targets (N,)
    in [0, V). Never holds more than (N, chunk_size) logits; the logits are recomputed chunk by chunk
    in backward."""
    if chunk_size < 1:
        raise LabelError(f"chunk_size must be a positive number of vocabulary columns, got {chunk_size}")
    return LinearCrossEntropy.apply(hidden, weight, targets, chunk_size)


def _chunk_logits(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(N, c) fp32 logits of one vocabulary chunk (rows: its c weight rows): matmul in the model
    dtype, then fp32, exactly as the plain path rounds them."""
    return F.linear(hidden, rows).float()


class LinearCrossEntropy(torch.autograd.Function):
    """Fused output projection + cross entropy, chunked over the vocabulary.

    Forward keeps a running log-sum-exp per row, lse = log sum_v exp(z_v), and picks the target
    logit z_y from whichever chunk holds it; loss = sum (lse - z_y). Backward, with g the incoming
    gradient: dz = g * (softmax(z) - onehot(y)) per chunk, recomputed from (hidden, weight, lse);
    d hidden = dz @ W_chunk summed over chunks (fp32), d W_chunk = dz.T @ hidden."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_size: int) -> torch.Tensor:
        N, V = hidden.shape[0], weight.shape[0]
        lse = torch.full((N,), float("-inf"), device=hidden.device)
        target_logit = torch.zeros(N, device=hidden.device)
        for start in range(0, V, chunk_size):
            end = min(start + chunk_size, V)
            z = _chunk_logits(hidden, weight[start:end])  # (N, c)
            lse = torch.logaddexp(lse, z.logsumexp(-1))
            here = (targets >= start) & (targets < end)
            picked = z.gather(1, (targets - start).clamp(0, end - start - 1)[:, None])[:, 0]
            target_logit = target_logit + torch.where(here, picked, 0.0)
        ctx.rows = None if isinstance(weight, torch.Tensor) else weight  # made again in backward, not kept
        ctx.save_for_backward(hidden, targets, lse, *([weight] if ctx.rows is None else []))
        ctx.chunk_size = chunk_size
        return (lse - target_logit).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, targets, lse, *kept = ctx.saved_tensors
        weight = kept[0] if kept else ctx.rows
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, V = hidden.shape[0], weight.shape[0]
        grad_hidden = torch.zeros(hidden.shape, device=hidden.device) if want_hidden else None  # fp32 sum
        grad_weight = torch.empty_like(weight) if want_weight else None
        rows = torch.arange(N, device=hidden.device)
        for start in range(0, V, ctx.chunk_size):
            end = min(start + ctx.chunk_size, V)
            w = weight[start:end]
            dz = (_chunk_logits(hidden, w) - lse[:, None]).exp_()  # softmax (N, c)
            here = (targets >= start) & (targets < end)
            dz[rows[here], targets[here] - start] -= 1.0
            dz = (dz * grad).to(hidden.dtype)  # the plain path's grad also returns to the model dtype here
            if want_hidden:
                grad_hidden += (dz @ w).float()
            if want_weight:
                grad_weight[start:end] = dz.T @ hidden
        if want_hidden:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None
