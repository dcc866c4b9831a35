"""GLM-4V: vision tower + projector spliced into the GLM-4 decoder's token stream.

A prompt with an image holds `<|begin_of_image|> <|endoftext|> <|end_of_image|>`; those three
token embeddings are replaced by the image's (grid/2)^2 + 2 embeddings. Positions stay those of
the unspliced token list: boi keeps p, every patch row shares p + 1, eoi keeps p + 2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .cache import KVCache
from .config import GLM4VConfig
from .init import init_parameters
from .loss import DEFAULT_CHUNK_SIZE, causal_lm_loss, check_labels, splice_labels
from .text import KeyRange, TextDecoder
from .vision import Projector, VisionEncoder


# The model card promises an 8K context: rotary positions 0..8191 (the config's seq_length is nominal).
MAX_CONTEXT = 8192


class InputError(ValueError):
    """Model inputs that do not fit the model or each other; the message says which and how."""


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
    pixel_values: torch.Tensor | None    # (N, 3, S, S), one per row holding the placeholder
    attention_mask: torch.Tensor | None  # (B, L) 0/1, left padding only; None = no padding
    position_ids: torch.Tensor           # (B, L) rotary positions of the unspliced tokens
    image_rows: torch.Tensor             # (B,) bool: rows holding an image
    spliced_length: int                  # T: cache slots the prompt fills (an image's 3 ids become 2 + (g/2)^2)


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

    def __init__(self, config: GLM4VConfig):
        super().__init__()
        self.config = config
        with torch.device("meta"):  # never torch.empty memory that would compute garbage silently
            self.vision = VisionEncoder(config.vision)
            self.projector = Projector(config)
            self.text = TextDecoder(config)

    @classmethod
    def from_config(cls, config: GLM4VConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> "GLM4V":
        """A randomly initialized model, ready to train (see glm4v_core.init for the scheme)."""
        model = cls(config).to(dtype).to_empty(device=device)
        init_parameters(model, seed)
        return model

    def gradient_checkpointing(self, enabled: bool = True) -> "GLM4V":
        """Recompute each ViT and decoder block in backward instead of keeping its activations."""
        self.vision.checkpoint_layers = self.text.checkpoint_layers = enabled
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.text.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text.embed.weight.device

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> image embeddings (N, 2 + (g/2)^2, H), boi/eoi rows included."""
        pixels = pixel_values.to(device=self.device, dtype=self.dtype)  # cast before the ViT
        return self.projector(self.vision(pixels))

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None, *,
                labels: torch.Tensor | None = None, output_hidden_states: bool = False) -> ModelOutput:
        """input_ids (B, L) -> logits (B, T, V) of the spliced sequence, no cache (parity, training).

        attention_mask (B, L): 1 for real tokens, left padding only. position_ids default to
        0..n-1 over each row's real tokens (0 on pads). labels (B, L): one per input token, -100 =
        not counted; the output then has `loss` (the mean next-token cross entropy, see
        glm4v_core.loss) and no logits."""
        prompt = self.check_prompt(input_ids, pixel_values, attention_mask, position_ids)
        if labels is not None:
            check_labels(labels, input_ids, self.config.vocab_size)
        embeds, positions, mask, image_embeds, source_index, is_patch = self.embed(prompt)
        hidden = [] if output_hidden_states else None
        x = self.text(embeds, positions, KeyRange(first_valid_key(mask), None), hidden_states=hidden)
        if labels is not None:  # training: the loss without logits of the whole sequence
            targets = splice_labels(labels.to(x.device), source_index, is_patch, mask)
            loss = causal_lm_loss(x, self.text.lm_head.weight, targets, self.loss_chunk_size)
            return ModelOutput(None, positions, mask, hidden, image_embeds, loss)
        return ModelOutput(self.text.lm_head(x), positions, mask, hidden, image_embeds)

    def prefill(self, prompt: Prompt, cache_len: int) -> DecodeState:
        """Run a checked prompt once, filling slots 0..T-1 of a new cache of cache_len >= T slots."""
        if cache_len < prompt.spliced_length:
            raise InputError(f"cache_len {cache_len} < the prompt's {prompt.spliced_length} cache slots")
        embeds, positions, mask, *_ = self.embed(prompt)
        B, T, _ = embeds.shape
        c = self.config
        cache = KVCache(c.num_layers, B, c.num_kv_groups, cache_len, c.head_dim, self.dtype, self.device)
        key_start = first_valid_key(mask)
        if key_start is not None:
            cache.key_start.copy_(key_start)
        x = self.text(embeds, positions, KeyRange(key_start, None), cache, torch.arange(T, device=self.device))
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
        embeds, positions, mask, source_index, is_patch = splice_images(
            embeds, prompt.position_ids, prompt.attention_mask, prompt.image_rows, image_embeds,
            self.config.boi_token_id, prompt.input_ids)
        return embeds, positions, mask, image_embeds, source_index, is_patch

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
        image_rows = self.check_inputs(input_ids, pixel_values)
        longest = int(position_ids.max()) + 1
        if longest + max_new_tokens > MAX_CONTEXT:
            raise InputError(f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                             f"context of {MAX_CONTEXT} positions (an image counts as its 3 placeholder tokens)")
        spliced = L if pixel_values is None else L - 3 + 2 + self.config.vision.num_image_tokens
        device = self.device
        to = (lambda t: None if t is None else t.to(device))
        return Prompt(to(input_ids), to(pixel_values), to(attention_mask), to(position_ids), to(image_rows), spliced)

    def check_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Prompt checks, before any compute: ids in the vocabulary, pixels of the model's image
        size, at most one `boi pad eoi` block per row and one image per such row (in row order).
        Returns (B,) bool: the rows holding an image."""
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
        is_boi, is_eoi = input_ids == c.boi_token_id, input_ids == c.eoi_token_id
        n_boi, n_eoi = is_boi.sum(1), is_eoi.sum(1)
        rows = n_boi > 0
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        placeholder = (f"<|begin_of_image|> <|endoftext|> <|end_of_image|> (ids {c.boi_token_id}, "
                       f"{c.pad_token_id}, {c.eoi_token_id})")
        if pixel_values is None and rows.any():
            raise InputError(f"input_ids row {int(rows.nonzero()[0])} holds the image placeholder "
                             f"(<|begin_of_image|> id {c.boi_token_id}) but no image was given")
        if pixel_values is None:
            return rows
        if not rows.any():
            raise InputError(f"{n_images} image(s) given but the prompt has no image placeholder {placeholder}: "
                             "put the image in a chat message, or drop it")
        if (n_boi > 1).any() or (n_eoi != n_boi).any():
            raise InputError(f"each row may hold one image placeholder {placeholder}; found boi counts "
                             f"{n_boi.tolist()} and eoi counts {n_eoi.tolist()}")
        if int(rows.sum()) != n_images:
            raise InputError(f"{n_images} image(s) given for {int(rows.sum())} row(s) with an image placeholder: "
                             "give one image per such row, in row order")
        boi_at = is_boi.float().argmax(1)
        L = input_ids.shape[1]
        nxt = input_ids.gather(1, (boi_at + 1).clamp(max=L - 1)[:, None])[:, 0]
        eoi_ok = is_eoi.gather(1, (boi_at + 2).clamp(max=L - 1)[:, None])[:, 0] & (boi_at + 2 < L)
        if (rows & ~((nxt == c.pad_token_id) & eoi_ok)).any():
            raise InputError(f"the image placeholder must be exactly <|begin_of_image|> <|endoftext|> <|end_of_image|> "
                             f"(ids {c.boi_token_id}, {c.pad_token_id}, {c.eoi_token_id}) in consecutive positions")
        return rows


def check_materialized(model: nn.Module) -> None:
    """Refuse to compute with parameters that were never filled (a bare GLM4V(config))."""
    empty = [name for name, p in model.named_parameters() if p.is_meta]
    if empty:
        raise InputError(f"{len(empty)} parameter(s) were never filled (e.g. {empty[0]!r} is on the meta device): "
                         "use glm4v_core.load_model(path) for a checkpoint or GLM4V.from_config(config, seed=...) "
                         "for random weights")


def check_pixels(pixel_values: torch.Tensor) -> None:
    """Normalized float pixels (what glm4v_core.image.load_image makes); shapes are checked with the blocks."""
    if not isinstance(pixel_values, torch.Tensor):
        raise InputError(f"pixel_values must be a float tensor (N, 3, S, S), got {type(pixel_values).__name__}")
    if not pixel_values.is_floating_point():
        raise InputError(f"pixel_values must be normalized float pixels (glm4v_core.image.load_image), got "
                         f"dtype {pixel_values.dtype}: raw 0-255 or bool images would be read as wrong colours")
    if not bool(torch.isfinite(pixel_values).all()):
        raise InputError("pixel_values hold NaN or inf values")


def check_attention_mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor | None:
    """None, or a (B, L) tensor of 0/1 (int or bool) in the left-padding pattern; returned as int64."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.is_floating_point() or attention_mask.is_complex():
        raise InputError(f"attention_mask must be an integer or bool tensor of 0/1, got "
                         f"{getattr(attention_mask, 'dtype', type(attention_mask).__name__)}")
    if attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    mask = attention_mask.long()
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise InputError(f"attention_mask must hold only 0 and 1, found {sorted(set(mask.unique().tolist()) - {0, 1})[:5]}")
    first_valid_key(mask)  # refuses anything but left padding
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


def splice_images(embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  image_rows: torch.Tensor, image_embeds: torch.Tensor, boi_token_id: int,
                  input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                    torch.Tensor, torch.Tensor]:
    """Replace each image row's 3 placeholder tokens by its image embeddings (vectorized, no loop).

    Output length T = L - 3 + N (N = image embedding rows). Rows without an image (in a mixed
    batch) are shifted right by N - 3 behind extra left pads (mask 0, position 0).
    Returns (embeds, positions, mask, source_index, is_patch): source_index (B, T) is the input
    token each slot comes from, is_patch (B, T) marks image patch rows (the labels' map)."""
    B, L, H = embeds.shape
    N = image_embeds.shape[1]
    T = L - 3 + N
    t = torch.arange(T, device=embeds.device)[None, :]  # (1, T) output slots
    boi = (input_ids == boi_token_id).float().argmax(1)[:, None]  # (B, 1)
    has = image_rows[:, None]
    in_image = has & (t >= boi) & (t < boi + N)
    # source token of each output slot: before the image, itself; after, shifted back by N - 3
    src = torch.where(has & (t < boi), t, t - (N - 3))
    src = torch.where(in_image, boi + 1, src)  # patch rows take the placeholder's position
    src = torch.where(in_image & (t == boi), boi, src)  # boi row keeps boi's position
    src = torch.where(in_image & (t == boi + N - 1), boi + 2, src)  # eoi row keeps eoi's position
    is_extra_pad = src < 0  # text-only rows of a mixed batch
    src = src.clamp(min=0)
    image_index = (image_rows.long().cumsum(0) - 1).clamp(min=0)  # which image belongs to each row
    img = image_embeds.to(embeds.dtype)[image_index]  # (B, N, H)
    img_slot = (t - boi).clamp(0, N - 1)
    spliced = torch.where(in_image[..., None],
                          img.gather(1, img_slot[..., None].expand(B, T, H)),
                          embeds.gather(1, src[..., None].expand(B, T, H)))
    positions = position_ids.gather(1, src).masked_fill(is_extra_pad, 0)
    mask = None
    if attention_mask is not None or is_extra_pad.any():
        base = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        # patch rows are real tokens; boi/eoi rows keep their tokens' mask values
        mask = base.gather(1, src).masked_fill(in_image & (t > boi) & (t < boi + N - 1), 1)
        mask = mask.masked_fill(is_extra_pad, 0)
    is_patch = in_image & (t > boi) & (t < boi + N - 1)
    return spliced, positions, mask, src, is_patch
