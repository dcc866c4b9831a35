"""GLM-4V: vision tower + projector spliced into the GLM-4 decoder's token stream (DESIGN 1.4).

Each image's block `<|begin_of_image|> <|endoftext|> <|end_of_image|>` in a prompt is replaced by
the image's (grid/2)^2 + 2 embeddings (splice.py, any number of blocks per row). Positions stay
those of the unspliced token list: boi keeps p, every patch row shares p + 1, eoi keeps p + 2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .cache import KVCache
from .config import GLM4VConfig
from .splice import ImageBlock, InputError, check_image_blocks, splice_images
from .text import TextDecoder
from .vision import Projector, VisionEncoder


@dataclass
class ModelOutput:
    logits: torch.Tensor                 # (B, T or 1, V) in the model dtype
    position_ids: torch.Tensor           # (B, T) after splicing: rotary positions
    attention_mask: torch.Tensor | None  # (B, T) after splicing, 1 = real token; None = no padding
    hidden_states: list[torch.Tensor] | None = None  # embeddings, then each layer's output
    image_embeds: torch.Tensor | None = None         # (N_images, 2 + (g/2)^2, H)


class GLM4V(nn.Module):
    def __init__(self, config: GLM4VConfig):
        super().__init__()
        self.config = config
        self.vision = VisionEncoder(config.vision)
        self.projector = Projector(config)
        self.text = TextDecoder(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.text.embed.weight.dtype

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c, w = self.config, self.text.embed.weight
        return KVCache(c.num_layers, batch, c.num_kv_groups, max_len, c.head_dim, w.dtype, w.device)

    def encode_images(self, pixel_values: torch.Tensor, max_batch: int = 4) -> torch.Tensor:
        """(N, 3, S, S) -> image embeddings (N, 2 + (g/2)^2, H), boi/eoi rows included.

        At most max_batch images go through the ViT at once: its activations, not the N outputs,
        bound the memory (a 1120 px image is 6401 ViT tokens)."""
        chunks = []
        for pixels in pixel_values.split(max_batch):  # (<= max_batch, 3, S, S)
            pixels = pixels.to(device=self.text.embed.weight.device, dtype=self.dtype)  # cast before the ViT
            chunks.append(self.projector(self.vision(pixels)))
        return torch.cat(chunks) if len(chunks) > 1 else chunks[0]

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, *, last_logits_only: bool = False,
                output_hidden_states: bool = False) -> ModelOutput:
        """input_ids (B, L) -> logits. attention_mask (B, L): 1 for real tokens, left padding only.
        position_ids default to 0..n-1 over each row's real tokens (0 on pads). With a cache,
        prefill fills it; later calls (decode) must pass position_ids and no attention_mask."""
        decoding = cache is not None and cache.length > 0
        if decoding and (attention_mask is not None or position_ids is None or pixel_values is not None):
            raise InputError("decode steps (cache already filled) take input_ids and explicit position_ids "
                             "only; padding was fixed at prefill and positions are not slot indices")
        if decoding:  # decode ids come from our own logits: no data-dependent check (host sync)
            check_ids_shape(input_ids)
        else:
            self.check_inputs(input_ids, pixel_values, attention_mask)
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if position_ids is None:
            position_ids = default_position_ids(input_ids, attention_mask)
        elif position_ids.shape != input_ids.shape:
            raise InputError(f"position_ids shape {tuple(position_ids.shape)} != input_ids shape {tuple(input_ids.shape)}")
        embeds = self.text.embed(input_ids)
        image_embeds = None
        if pixel_values is not None:  # prefill only (refused above when decoding)
            image_embeds = self.encode_images(pixel_values)
            spliced = splice_images(input_ids, embeds, position_ids, attention_mask, image_embeds,
                                    ImageBlock.from_config(self.config))
            embeds, position_ids, attention_mask = spliced.embeds, spliced.position_ids, spliced.attention_mask
        key_start = cache.key_start if decoding else first_valid_key(attention_mask)
        if cache is not None and not decoding:
            if cache.batch != input_ids.shape[0]:
                raise InputError(f"cache was built for batch {cache.batch}, input has {input_ids.shape[0]} rows")
            cache.key_start = key_start
        hidden = [] if output_hidden_states else None
        x = self.text(embeds, position_ids, key_start, cache, hidden)
        if last_logits_only:
            x = x[:, -1:]
        return ModelOutput(self.text.lm_head(x), position_ids, attention_mask, hidden, image_embeds)

    def check_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                     attention_mask: torch.Tensor | None = None, max_new_tokens: int = 0) -> torch.Tensor:
        """Prompt checks, before any compute: ids in the vocabulary, pixels of the model's image
        size, well-formed image blocks with one image each (in reading order), and the spliced
        prompt + max_new_tokens within the context. Returns (B,) the number of images per row."""
        check_ids_shape(input_ids)
        c = self.config
        bad = (input_ids < 0) | (input_ids >= c.vocab_size)
        if bad.any():
            row, col = (int(i) for i in bad.nonzero()[0])
            raise InputError(f"input_ids[{row}, {col}] = {int(input_ids[row, col])} is outside the vocabulary "
                             f"[0, {c.vocab_size})")
        v = c.vision
        want = (v.in_channels, v.image_size, v.image_size)
        if pixel_values is not None and (pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want):
            raise InputError(f"pixel_values must have shape (N, {want[0]}, {want[1]}, {want[2]}) for this model "
                             f"(vision_config.image_size = {v.image_size}), got {tuple(pixel_values.shape)}")
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        return check_image_blocks(input_ids, n_images, ImageBlock.from_config(c), attention_mask, max_new_tokens)


def check_ids_shape(input_ids: torch.Tensor) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"input_ids must be an integer tensor (B, L), got {type(input_ids).__name__} "
                         f"{getattr(input_ids, 'dtype', '')} {tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.numel() == 0:
        raise InputError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}")


def default_position_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """0..n-1 over each row's real tokens, 0 on left pads (the tokenizer's convention)."""
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def first_valid_key(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B,) index of each row's first real token, or None when nothing is padded.

    Only left padding is representable (pads, then real tokens); anything else is refused."""
    if attention_mask is None:
        return None
    mask = attention_mask.bool()
    if mask.all():
        return None
    start = (~mask).sum(1, dtype=torch.int32)  # int32: what the attention kernel reads, no per-layer cast
    cols = torch.arange(mask.shape[1], device=mask.device)
    if not torch.equal(mask, cols >= start[:, None]):
        raise InputError("attention_mask must be left padding (zeros then ones in every row); got another pattern")
    if (start == mask.shape[1]).any():
        raise InputError("attention_mask has a row with no real token")
    return start
