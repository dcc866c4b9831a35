"""Images inside the token stream: every `<|begin_of_image|> <|endoftext|> <|end_of_image|>` block
of a prompt is replaced by its own image's embeddings.

    tokens     ... x  boi  pad  eoi  y ...          (an image block = 3 token ids)
    positions  ... q  p    p+1  p+2  p+3 ...        (whatever position_ids says; left pads are 0)
    spliced    ... x  boi' P patch rows  eoi' y ...  (boi', patches, eoi' come from the image tower)
    positions  ... q  p    p+1 (x P)     p+2  p+3 ...

Cache slot != position: the P patch rows fill P slots but share the position of the placeholder
token they replace, so text after an image keeps its unspliced index. A row may hold any number
of blocks (0 included); images are taken in reading order, row by row and left to right. The
reference model splices only a row's first block; applying the same rule to every block is our
extension, and it reduces to the reference's rule for one image per row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from glm4v_core.errors import GLM4VError

# The GLM-4V-9B model card promises an 8K context: 8192 cache slots (an image takes 2 + num_image_tokens
# of them, 1602 at 1120 px) and rotary positions 0..8191. A model's own context is
# GLM4VConfig.context_length (the text checkpoints' seq_length is larger).
MAX_CONTEXT = 8192


class InputError(GLM4VError):
    """Model inputs that do not fit the model or each other; the message says which and how."""


@dataclass(frozen=True)
class ImageBlock:
    """The placeholder block's three token ids, and how many embedding rows an image becomes."""

    boi: int   # <|begin_of_image|>
    pad: int   # <|endoftext|>: the slot between boi and eoi
    eoi: int   # <|end_of_image|>
    rows: int  # 2 + num_image_tokens: boi row, patch rows, eoi row (1602 at 1120 px)

    @classmethod
    def from_config(cls, config) -> ImageBlock:
        """From a GLM4VConfig (token ids and the vision tower's output size)."""
        return cls(config.boi_token_id, config.pad_token_id, config.eoi_token_id,
                   2 + config.vision.num_image_tokens)

    def describe(self) -> str:
        return f"<|begin_of_image|> <|endoftext|> <|end_of_image|> (ids {self.boi}, {self.pad}, {self.eoi})"


@dataclass
class Spliced:
    embeds: torch.Tensor                 # (B, T, H) token embeddings with every block replaced by its image's rows
    position_ids: torch.Tensor           # (B, T) rotary positions: the unspliced token indices, 0 on pads
    attention_mask: torch.Tensor | None  # (B, T) 1 = real token; None when nothing is padded
    source_index: torch.Tensor           # (B, T) long: the unspliced token each slot comes from (0 on added pads)
    is_patch: torch.Tensor               # (B, T) bool: the slot is an image patch row (not boi, eoi or text)


def check_image_blocks(input_ids: torch.Tensor, num_images: int, block: ImageBlock,
                       attention_mask: torch.Tensor | None = None, max_new_tokens: int = 0,
                       context: int = MAX_CONTEXT) -> torch.Tensor:
    """Every block of every row well formed, one image per block, and the spliced prompt (plus
    max_new_tokens) within the context; raises InputError before any compute. Returns (B,) the
    number of blocks of each row. Token ids are assumed to be in the vocabulary already."""
    is_boi, is_eoi = input_ids == block.boi, input_ids == block.eoi
    B, L = input_ids.shape
    after = torch.full((B, 2), -1, dtype=input_ids.dtype, device=input_ids.device)
    following = torch.cat([input_ids, after], dim=1)  # (B, L + 2): ids[j+1], ids[j+2] exist for every j
    well_formed = is_boi & (following[:, 1:L + 1] == block.pad) & (following[:, 2:L + 2] == block.eoi)
    eoi_closes = torch.zeros_like(is_eoi)
    eoi_closes[:, 2:] = well_formed[:, :-2]  # an eoi is fine only where a well-formed block ends
    bad = (is_boi & ~well_formed) | (is_eoi & ~eoi_closes)
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        found = input_ids[row, max(col - 2, 0):col + 3].tolist()
        what = "<|begin_of_image|>" if bool(is_boi[row, col]) else "<|end_of_image|>"
        raise InputError(f"input_ids row {row}: {what} at index {col} is not part of a complete image block; "
                         f"a block is {block.describe()} in consecutive positions, found ids {found} around it")
    per_row = is_boi.sum(1)  # (B,)
    counts = per_row.tolist()
    n_blocks = sum(counts)
    if n_blocks != num_images:
        if num_images == 0:
            row = next(i for i, n in enumerate(counts) if n)
            raise InputError(f"input_ids row {row} holds the image placeholder {block.describe()} "
                             f"but no image was given (image blocks per row: {counts})")
        if n_blocks == 0:
            raise InputError(f"{num_images} image(s) given but the prompt has no image placeholder "
                             f"{block.describe()}: put the images in chat messages, or drop them")
        rows_with = sum(1 for n in counts if n)
        raise InputError(f"{num_images} image(s) given for {n_blocks} image block(s) in {rows_with} row(s) "
                         f"(blocks per row: {counts}): give one image per block, in reading order "
                         "(row by row, left to right)")
    check_context(input_ids, per_row, block, attention_mask, max_new_tokens, context)
    return per_row


def check_context(input_ids: torch.Tensor, blocks_per_row: torch.Tensor, block: ImageBlock | None,
                  attention_mask: torch.Tensor | None, max_new_tokens: int, context: int) -> None:
    """Each row's real tokens, with every image counted as its `block.rows` cache slots instead of
    its 3 placeholder tokens, plus max_new_tokens, must fit in `context` slots (block None: a
    text-only model, blocks_per_row all 0)."""
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    tokens = input_ids.new_full((input_ids.shape[0],), input_ids.shape[1]) if attention_mask is None \
        else attention_mask.long().sum(1)
    slots = tokens if block is None else tokens + blocks_per_row * (block.rows - 3)  # (B,)
    row = int((slots + max_new_tokens).argmax())
    need = int(slots[row]) + max_new_tokens
    if need <= context:
        return
    n_images, n_text = int(blocks_per_row[row]), int(tokens[row] - 3 * blocks_per_row[row])
    if n_images == 0:
        raise InputError(f"prompt row {row} exceeds the model's context of {context}: {n_text} tokens + "
                         f"max_new_tokens {max_new_tokens} = {need} cache slots")
    fit = max(0, (context - max_new_tokens - n_text) // block.rows)
    raise InputError(f"prompt row {row} exceeds the model's context of {context}: {n_text} text tokens + "
                     f"{n_images} image(s) x {block.rows} cache slots + max_new_tokens {max_new_tokens} = {need} "
                     f"slots; beside this text and answer, at most {fit} image(s) fit")


def spliced_length(input_ids: torch.Tensor, block: ImageBlock) -> int:
    """Cache slots the (padded) prompt fills once its blocks are spliced: the longest row's."""
    blocks = (input_ids == block.boi).sum(1)  # (B,)
    return input_ids.shape[1] + int(blocks.max()) * (block.rows - 3)


def splice_images(input_ids: torch.Tensor, embeds: torch.Tensor, position_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None, image_embeds: torch.Tensor, block: ImageBlock) -> Spliced:
    """Replace every (checked) block by its image's rows; vectorized over tokens and blocks.

    image_embeds (N, block.rows, H): one image per block in reading order. Each token fills
    `width` output slots (P = rows - 2 for a block's middle token, else 1); a row's tokens start at
    the exclusive cumsum of widths. Rows shorter than the longest are left-padded again (mask 0,
    position 0, zero embeddings)."""
    B, L, H = embeds.shape
    P = block.rows - 2
    is_boi = input_ids == block.boi
    is_middle = torch.zeros_like(is_boi)
    is_middle[:, 1:] = is_boi[:, :-1]  # the <|endoftext|> of each block: it becomes the P patch rows
    width = torch.where(is_middle, P, 1)  # (B, L) output slots per input token
    length = width.sum(1)  # (B,) spliced length of each row
    T = int(length.max())
    start = width.cumsum(1) - width + (T - length)[:, None]  # (B, L) first slot of each token, after new pads
    tokens = torch.arange(L, device=input_ids.device).expand(B, L)
    # Which token each slot comes from: mark each token's first slot, then carry it forward over the
    # patch slots (a running max, since token indices grow along the row); new left pads stay -1.
    source = torch.full((B, T), -1, dtype=torch.long, device=input_ids.device)
    source = source.scatter(1, start, tokens).cummax(1).values
    added_pad = source < 0
    source = source.clamp(min=0)
    is_patch = is_middle.gather(1, source)  # added pads read token 0, never a block's middle

    rows = torch.arange(B, device=input_ids.device)[:, None]  # (B, 1)
    out = embeds.new_zeros(B, T, H)
    out[rows, start] = embeds  # text (and the placeholder tokens, overwritten next)
    image_row, image_start = is_boi.nonzero(as_tuple=True)[0], start[is_boi]  # (N,) each, reading order
    slots = image_start[:, None] + torch.arange(block.rows, device=input_ids.device)  # (N, rows)
    out[image_row[:, None], slots] = image_embeds.to(embeds.dtype)  # boi row, P patch rows, eoi row

    positions = position_ids.gather(1, source).masked_fill(added_pad, 0)  # patch rows: the middle token's
    mask = None
    if attention_mask is not None or bool(added_pad.any()):
        base = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        mask = base.gather(1, source).masked_fill(added_pad, 0)
    return Spliced(out, positions, mask, source, is_patch)
