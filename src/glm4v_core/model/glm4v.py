"""GLM-4V: vision tower + projector spliced into the GLM-4 decoder's token stream.

Each image's block `<|begin_of_image|> <|endoftext|> <|end_of_image|>` in a prompt is replaced by
the image's (grid/2)^2 + 2 embeddings (splice.py, any number of blocks per row). Positions stay
those of the unspliced token list: boi keeps p, every patch row shares p + 1, eoi keeps p + 2.

A text-only config (glm-4-9b-chat, -1m) builds the decoder alone: `vision` and `projector` are None and
images are refused; the image placeholder ids are then ordinary tokens, as in those checkpoints' own code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from glm4v_core.config import GLM4VConfig
from glm4v_core.model.cache import KVCache
from glm4v_core.model.decoder import KeyRange, TextDecoder
from glm4v_core.model.init import init_parameters
from glm4v_core.model.loss import DEFAULT_CHUNK_SIZE, causal_lm_loss, check_labels, splice_labels
from glm4v_core.model.splice import (
    ImageBlock,
    InputError,
    check_context,
    check_image_blocks,
    splice_images,
    spliced_length,
)
from glm4v_core.model.vision import Projector, VisionEncoder

# Prompt slots per prefill pass: measured on CPU (benchmarks/prefill_chunk.py, results/prefill_chunk_cpu.json).
PREFILL_CHUNK = 2048


@dataclass
class ModelOutput:
    logits: torch.Tensor | None          # (B, T, V) in the model dtype; None when labels were given
    position_ids: torch.Tensor           # (B, T) after splicing: rotary positions
    attention_mask: torch.Tensor | None  # (B, T) after splicing, 1 = real token; None = no padding
    hidden_states: list[torch.Tensor] | None = None  # embeddings, then each layer's output
    image_embeds: torch.Tensor | None = None         # (N_images, 2 + (g/2)^2, H)
    loss: torch.Tensor | None = None                 # fp32 scalar when labels were given


@dataclass
class Prompt:
    """Checked model inputs (every check done, nothing computed yet); `GLM4V.check_prompt` makes it."""
    input_ids: torch.Tensor              # (B, L)
    pixel_values: torch.Tensor | None    # (N, 3, S, S), one per image block, in reading order
    attention_mask: torch.Tensor | None  # (B, L) 0/1, left padding only; None = no padding
    position_ids: torch.Tensor           # (B, L) rotary positions of the unspliced tokens
    images_per_row: torch.Tensor         # (B,) number of image blocks of each row
    spliced_length: int                  # T: cache slots the prompt fills (each image's 3 ids become 2 + (g/2)^2)


@dataclass
class DecodeState:
    """What prefill hands to the decode loop: the filled cache and where the next token goes."""
    cache: KVCache
    logits: torch.Tensor     # (B, V) at each row's last prompt slot: they choose the first new token
    positions: torch.Tensor  # (B, 1) rotary position of the next token: the prompt's largest + 1
    slot: torch.Tensor       # (1,) cache slot of the next token: the spliced prompt length


class GLM4V(nn.Module):
    """GLM4V(config) has parameters on the `meta` device (shapes only, no memory): fill them with
    `glm4v_core.load_model(path)` or `GLM4V.from_config(config, seed=...)`."""

    loss_chunk_size: int | None = DEFAULT_CHUNK_SIZE  # vocabulary chunk of the training loss; None: plain
    prefill_chunk: int | None = PREFILL_CHUNK  # prompt slots per prefill pass (bounds activations); None: one pass

    def __init__(self, config: GLM4VConfig):
        super().__init__()
        self.config = config
        with torch.device("meta"):  # never torch.empty memory that would compute garbage silently
            self.vision = VisionEncoder(config.vision) if config.has_vision else None
            self.projector = Projector(config) if config.has_vision else None
            self.text = TextDecoder(config)

    @classmethod
    def from_config(cls, config: GLM4VConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> GLM4V:
        """A randomly initialized model, ready to train (see glm4v_core.model.init for the scheme)."""
        model = cls(config).to(dtype).to_empty(device=device)
        init_parameters(model, seed)
        return model

    def gradient_checkpointing(self, enabled: bool = True) -> GLM4V:
        """Recompute each ViT and decoder block in backward instead of keeping its activations."""
        self.text.checkpoint_layers = enabled
        if self.vision is not None:
            self.vision.checkpoint_layers = enabled
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.text.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text.embed.weight.device

    def encode_images(self, pixel_values: torch.Tensor, max_batch: int = 4) -> torch.Tensor:
        """(N, 3, S, S) -> image embeddings (N, 2 + (g/2)^2, H), boi/eoi rows included.

        At most max_batch images go through the ViT at once: its activations, not the N outputs,
        bound the memory (a 1120 px image is 6401 ViT tokens)."""
        chunks = []
        grad = torch.is_grad_enabled()
        for pixels in pixel_values.split(max_batch):  # (<= max_batch, 3, S, S)
            pixels = pixels.to(device=self.device, dtype=self.dtype)  # cast before the ViT
            # a part with nothing to train runs without a graph: it keeps nothing for backward and
            # skips the checkpointing (the projector still needs one when a trained ViT is below it)
            with torch.set_grad_enabled(grad and (pixels.requires_grad or trains(self.vision))):
                vit_out = self.vision(pixels)
            with torch.set_grad_enabled(grad and (vit_out.requires_grad or trains(self.projector))):
                chunks.append(self.projector(vit_out))
        return torch.cat(chunks) if len(chunks) > 1 else chunks[0]

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None, *,
                labels: torch.Tensor | None = None, output_hidden_states: bool = False,
                logits_to_keep: int | None = None) -> ModelOutput:
        """input_ids (B, L) -> logits (B, T, V) of the spliced sequence, no cache (parity, training).

        attention_mask (B, L): 1 for real tokens, left padding only. position_ids default to
        0..n-1 over each row's real tokens (0 on pads). labels (B, L): one per input token, -100 =
        not counted; the output then has `loss` (the mean next-token cross entropy, see
        glm4v_core.model.loss) and no logits. logits_to_keep N: logits of the last N slots only
        (B, N, V): a long prompt's (T, V) logits would dwarf everything else."""
        prompt = self.check_prompt(input_ids, pixel_values, attention_mask, position_ids)
        if labels is not None:
            check_labels(labels, input_ids, self.config.vocab_size)
        embeds, positions, mask, image_embeds, source_index, is_patch = self.embed(prompt)
        hidden = [] if output_hidden_states else None
        x = self.text(embeds, positions, KeyRange(first_valid_key(mask), None), hidden_states=hidden)
        if labels is not None:  # training: the loss without logits of the whole sequence
            targets = splice_labels(labels.to(x.device), source_index, is_patch, mask)
            weight = self.text.lm_head.weight_rows(x.dtype)  # the loss reads it in vocabulary chunks
            loss = causal_lm_loss(x, weight, targets, self.loss_chunk_size)
            return ModelOutput(None, positions, mask, hidden, image_embeds, loss)
        if logits_to_keep is not None:
            if not isinstance(logits_to_keep, int) or isinstance(logits_to_keep, bool) or logits_to_keep < 1:
                raise InputError(f"logits_to_keep must be a positive int (the last N slots), got {logits_to_keep!r}")
            x = x[:, -logits_to_keep:]
        return ModelOutput(self.text.lm_head(x), positions, mask, hidden, image_embeds)

    def prefill(self, prompt: Prompt, cache_len: int) -> DecodeState:
        """Run a checked prompt once, filling slots 0..T-1 of a new cache of cache_len >= T slots.

        The decoder runs over `prefill_chunk` slots at a time: each chunk writes its keys to the cache
        and attends to every key before it, so the logits are those of one pass, while the MLP and
        attention working set is bounded by the chunk, not the prompt (no (T, T) tensor anywhere)."""
        if cache_len < prompt.spliced_length:
            raise InputError(f"cache_len {cache_len} < the prompt's {prompt.spliced_length} cache slots")
        embeds, positions, mask, *_ = self.embed(prompt)
        B, T, _ = embeds.shape
        c = self.config
        cache = KVCache(c.num_layers, B, c.num_kv_groups, cache_len, c.head_dim, self.dtype, self.device)
        key_start = first_valid_key(mask)
        if key_start is not None:
            cache.key_start.copy_(key_start)
        chunk = check_prefill_chunk(self.prefill_chunk) or T
        for first in range(0, T, chunk):
            last = min(first + chunk, T)
            # the first chunk attends to its own keys; later ones to the cache's slots [0, last)
            keys = KeyRange(key_start, None) if first == 0 else \
                KeyRange(key_start, torch.full((B,), last, dtype=torch.int32, device=self.device), last)
            x = self.text(embeds[:, first:last], positions[:, first:last], keys, cache,
                          torch.arange(first, last, device=self.device))
        logits = self.text.lm_head(x[:, -1])  # only the last slot chooses a token
        next_position = positions.max(dim=1, keepdim=True).values + 1  # not the slot count
        return DecodeState(cache, logits, next_position, torch.tensor([T], device=self.device))

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor,
                    cache: KVCache) -> torch.Tensor:
        """One new token per row: tokens, positions (B, 1), cache slot (1,) -> logits (B, V).

        No checks and no host syncs: the shapes are the same at every step, so it can be compiled
        and captured in a CUDA graph. Writes the step's keys at `slot`; the caller advances it."""
        keys = KeyRange(cache.key_start[:cache.rows], (slot + 1).to(torch.int32).expand(cache.rows))
        x = self.text(self.text.embed(tokens), positions, keys, cache, slot)
        return self.text.lm_head(x[:, -1])

    def embed(self, prompt: Prompt) -> tuple[torch.Tensor, ...]:
        """Word embeddings with every image spliced in: (embeds (B, T, H), positions (B, T),
        attention mask (B, T) or None, image embeddings or None, source_index (B, T) or None,
        is_patch (B, T) or None); the last two map slots to input tokens (for the labels)."""
        embeds = self.text.embed(prompt.input_ids)
        if prompt.pixel_values is None:
            return embeds, prompt.position_ids, prompt.attention_mask, None, None, None
        image_embeds = self.encode_images(prompt.pixel_values)
        spliced = splice_images(prompt.input_ids, embeds, prompt.position_ids, prompt.attention_mask, image_embeds,
                                ImageBlock.from_config(self.config))
        return (spliced.embeds, spliced.position_ids, spliced.attention_mask, image_embeds, spliced.source_index,
                spliced.is_patch)

    def check_prompt(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                     max_new_tokens: int = 0) -> Prompt:
        """Every input check, before any compute: types, shapes, values, image blocks, and that
        the prompt plus max_new_tokens fits the context. Moves the inputs to the model's device."""
        check_materialized(self)
        check_ids_shape(input_ids)
        L = input_ids.shape[1]
        if pixel_values is not None:
            check_pixels(pixel_values)
        attention_mask = check_attention_mask(attention_mask, input_ids)
        if position_ids is None:
            position_ids = default_position_ids(input_ids, attention_mask)
        else:
            check_position_ids(position_ids, input_ids)
        # image blocks, one image each, and the cache budget: each image fills 2 + (g/2)^2 slots
        images_per_row = self.check_inputs(input_ids, pixel_values, attention_mask, max_new_tokens)
        if pixel_values is not None and pixel_values.shape[0] == 0:
            pixel_values = None  # (0, 3, S, S): no image, nothing for the ViT
        longest = int(position_ids.max()) + 1  # rotary positions: an image counts as its 3 placeholder ids
        context = self.config.context_length
        if longest + max_new_tokens > context:
            raise InputError(f"prompt of {longest} positions + max_new_tokens {max_new_tokens} exceeds the model's "
                             f"context of {context} positions")
        spliced = L if pixel_values is None else spliced_length(input_ids, ImageBlock.from_config(self.config))
        device = self.device

        def to(t):
            return None if t is None else t.to(device)

        return Prompt(to(input_ids), to(pixel_values), to(attention_mask), to(position_ids), to(images_per_row),
                      spliced)

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
        if not c.has_vision:  # a text-only GLM-4: its image-block ids are plain tokens, and no images
            if pixel_values is not None and pixel_values.shape[0] > 0:
                raise InputError(f"pixel_values given ({pixel_values.shape[0]} image(s)), but this checkpoint is a "
                                 "text-only GLM-4 (no vision_config, no vision tower): pass no images")
            none = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
            check_context(input_ids, none, None, attention_mask, max_new_tokens, c.context_length)
            return none
        v = c.vision
        want = (v.in_channels, v.image_size, v.image_size)
        if pixel_values is not None and (pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want):
            raise InputError(f"pixel_values must have shape (N, {want[0]}, {want[1]}, {want[2]}) for this model "
                             f"(vision_config.image_size = {v.image_size}), got {tuple(pixel_values.shape)}")
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        return check_image_blocks(input_ids, n_images, ImageBlock.from_config(c), attention_mask, max_new_tokens,
                                  c.context_length)


def trains(module: nn.Module) -> bool:
    """Some parameter of `module` takes gradients."""
    return any(p.requires_grad for p in module.parameters())


def check_prefill_chunk(chunk) -> int | None:
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise InputError(f"prefill_chunk must be a positive int (prompt slots per prefill pass) or None, got {chunk!r}")
    return chunk


def check_materialized(model: nn.Module) -> None:
    """Refuse to compute with parameters that were never filled (a bare GLM4V(config))."""
    empty = [name for name, p in model.named_parameters() if p.is_meta]
    if empty:
        raise InputError(f"{len(empty)} parameter(s) were never filled (e.g. {empty[0]!r} is on the meta device): "
                         "use glm4v_core.load_model(path) for a checkpoint or GLM4V.from_config(config, seed=...) "
                         "for random weights")


def check_pixels(pixel_values: torch.Tensor) -> None:
    """Normalized float pixels (what glm4v_core.processing.image.load_image makes); shapes are checked
    with the blocks."""
    if not isinstance(pixel_values, torch.Tensor):
        raise InputError(f"pixel_values must be a float tensor (N, 3, S, S), got {type(pixel_values).__name__}")
    if not pixel_values.is_floating_point():
        raise InputError(f"pixel_values must be normalized float pixels (glm4v_core.processing.image.load_image), got "
                         f"dtype {pixel_values.dtype}: raw 0-255 or bool images would be read as wrong colours")
    if not bool(torch.isfinite(pixel_values).all()):
        raise InputError("pixel_values hold NaN or inf values")


def check_attention_mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor | None:
    """None, or a (B, L) tensor of 0/1 (int or bool) in the left-padding pattern; returned as int64."""
    if attention_mask is None:
        return None
    if (not isinstance(attention_mask, torch.Tensor) or attention_mask.is_floating_point()
            or attention_mask.is_complex()):
        raise InputError(f"attention_mask must be an integer or bool tensor of 0/1, got "
                         f"{getattr(attention_mask, 'dtype', type(attention_mask).__name__)}")
    if attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    mask = attention_mask.long()
    if not bool(((mask == 0) | (mask == 1)).all()):
        others = sorted(set(mask.unique().tolist()) - {0, 1})
        raise InputError(f"attention_mask must hold only 0 and 1, found {others[:5]}")
    start = (mask == 0).sum(1)
    if not torch.equal(mask.bool(), torch.arange(mask.shape[1], device=mask.device) >= start[:, None]):
        raise InputError("attention_mask must be left padding (zeros then ones in every row); got another pattern")
    if bool((start == mask.shape[1]).any()):
        raise InputError("attention_mask has a row with no real token")
    return mask


def check_position_ids(position_ids: torch.Tensor, input_ids: torch.Tensor) -> None:
    if not isinstance(position_ids, torch.Tensor) or position_ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"position_ids must be an integer tensor, got "
                         f"{getattr(position_ids, 'dtype', type(position_ids).__name__)}")
    if position_ids.shape != input_ids.shape:
        raise InputError(f"position_ids shape {tuple(position_ids.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if bool((position_ids < 0).any()):
        raise InputError("position_ids must be >= 0")


def check_ids_shape(input_ids: torch.Tensor) -> None:
    if (not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2
            or input_ids.dtype not in (torch.int64, torch.int32)):
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
    """(B,) index of each row's first real token of a checked (left-padding) mask, or None when
    nothing is padded."""
    if attention_mask is None:
        return None
    mask = attention_mask.bool()
    if mask.all():
        return None
    return (~mask).sum(1, dtype=torch.int32)  # int32: what the attention kernel reads, no per-layer cast
