"""Conversation(s) -> model input tensors. The only place that combines template, image and padding.

Every image of every message gets its own <|begin_of_image|> <|endoftext|> <|end_of_image|> block;
`pixel_values` stacks all images in reading order, the order of their blocks: row by row, and within a
row message by message, left to right (the reference's torch.stack over all rows fails as soon as one
row has no image, and it takes one image per conversation).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from glm4v_core.processing.image import load_image
from glm4v_core.processing.tokenizer import Tokenizer, TokenizerError, conversation_images


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # (B, L) int64
    pixel_values: torch.Tensor | None  # (n_images, 3, S, S) float32, one per image block, in reading order
    attention_mask: torch.Tensor | None = None  # (B, L) int64, 0 on left pads; None: no padding
    position_ids: torch.Tensor | None = None  # (B, L) int64, 0 on pads, 0..n-1 on each row's tokens

    def to(self, device: torch.device | str) -> ModelInputs:
        fields = (self.input_ids, self.pixel_values, self.attention_mask, self.position_ids)
        return ModelInputs(*(None if t is None else t.to(device) for t in fields))


def build_inputs(
    tokenizer: Tokenizer, messages: Sequence[Mapping], image_size: int, add_generation_prompt: bool = True
) -> ModelInputs:
    """One conversation -> input_ids (1, L) and pixel_values (n_images, 3, S, S) or None."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    return ModelInputs(torch.tensor([ids], dtype=torch.long), load_images(conversation_images(messages), image_size))


def build_batch(
    tokenizer: Tokenizer,
    conversations: Sequence[Sequence[Mapping]],
    image_size: int,
    add_generation_prompt: bool = True,
) -> ModelInputs:
    """Several conversations -> left-padded (B, L) ids, mask and positions, plus the rows' images."""
    if isinstance(conversations, (str, Mapping)) or len(conversations) == 0:
        raise TokenizerError("build_batch expects a non-empty list of conversations (lists of message dicts)")
    rows = [tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt) for c in conversations]
    input_ids, attention_mask, position_ids = pad_left(rows, tokenizer.pad_id)
    images = [image for c in conversations for image in conversation_images(c)]  # reading order
    return ModelInputs(input_ids, load_images(images, image_size), attention_mask, position_ids)


def load_images(images: Sequence, image_size: int) -> torch.Tensor | None:
    """Paths or PIL images -> (N, 3, S, S) float32, or None for no image."""
    return torch.stack([load_image(image, image_size) for image in images]) if images else None


def pad_left(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad to the longest row: pads get mask 0 and position 0; each row's tokens count from 0."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row)
        input_ids[i, width - n:] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - n:] = 1
        position_ids[i, width - n:] = torch.arange(n)
    return input_ids, attention_mask, position_ids
