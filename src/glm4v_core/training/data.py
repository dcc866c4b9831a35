"""Fine-tuning data: a JSONL file of image conversations -> token samples -> left-padded batches with labels.

One JSON object per line (blank lines are allowed):

    {"messages": [{"role": "user", "content": "What is in the picture?", "image": "photos/cat.png"},
                  {"role": "assistant", "content": "A cat on a sofa."}]}

- `messages` is what the chat template takes: roles system, user, assistant, observation; keys
  role, content, optional metadata and image. `image` is a path, or a list of paths, relative to
  the JSONL file's folder unless absolute; it is passed to the chat template as given (where the
  template takes one image per conversation, a record with more is reported as bad).
- Each sample is the template's tokens (no generation prompt) followed by one `<|endoftext|>`,
  so the model learns to end its answer.

Labels (one per input token, -100 = not counted; the model shifts them: token t predicts t + 1):
- train_on="assistant" (default, GLM-4's own recipe): a token is counted when the token before it
  belongs to an assistant message (its `<|assistant|>` role token included). So the model learns
  each answer and the token that ends it (the next role token, or the final `<|endoftext|>`),
  and never the prompts.
- train_on="all": every token but the first (which nothing precedes).
Image placeholder tokens are never counted here (their patch rows count nothing in the model
anyway), so a batch's count of labels is exactly the number of tokens its loss averages over.

Bad records are found when the file is read, never later when a batch is built: a line that is
not UTF-8, longer than MAX_LINE_BYTES or not valid JSON (nesting too deep included); an unknown
role or key; an image that is missing or that processing.image.verify_image refuses (it decodes
each image once: truncated, corrupt, not an image, over MAX_IMAGE_PIXELS, a decompression bomb);
no counted token; longer than max_length after the image splice. Each is reported as
`FILE:LINE: reason` and skipped (on_bad="skip") or raises DataError (on_bad="error"). Nothing is
truncated. Lines end at "\n" only, so a raw U+2028 inside a JSON string stays in its record.
"""
from __future__ import annotations

import codecs
import json
import os
import reprlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from glm4v_conversion.files import open_regular, os_reason
from glm4v_core.config import GLM4VConfig
from glm4v_core.errors import GLM4VError
from glm4v_core.model.loss import IGNORE_INDEX
from glm4v_core.processing.chat import ModelInputs, pad_left
from glm4v_core.processing.image import ImageError, load_image, verify_image
from glm4v_core.processing.tokenizer import IMAGE_PLACEHOLDER, Tokenizer, TokenizerError, check_conversation

TRAIN_ON = ("assistant", "all")
ON_BAD_RECORD = ("skip", "error")
# A record that fits even a 128k-row context is a few MB of JSON at most; a longer line is a wrong
# file or a lost newline. It is refused without being held in memory (read past in 1 MiB pieces).
MAX_LINE_BYTES = 16 * 2**20


class DataError(GLM4VError):
    """A fine-tuning record or file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Sample:
    line: int                   # 1-based line in the JSONL file
    messages: tuple[dict, ...]  # image paths resolved
    input_ids: tuple[int, ...]  # template tokens + <|endoftext|>
    labels: tuple[int, ...]     # same length; -100 = not counted
    length: int                 # decoder rows after the image splice (what memory and time scale with)

    @property
    def images(self) -> list[str]:
        return [im for m in self.messages for im in _as_list(m.get("image"))]

    @property
    def counted(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class TrainingBatch:
    inputs: ModelInputs   # left-padded ids, mask, positions, the rows' images in row order
    labels: torch.Tensor  # (B, L) int64, lined up with inputs.input_ids; -100 on pads
    counted: int          # labels that count (= tokens the loss averages over)
    tokens: int           # decoder rows after the splice, pads excluded


def _as_list(image) -> list:
    if image is None:
        return []
    return list(image) if isinstance(image, (list, tuple)) else [image]


def image_rows(config: GLM4VConfig) -> int:
    """Decoder rows one image becomes: boi + (grid/2)^2 patches + eoi."""
    grid = config.vision.image_size // config.vision.patch_size
    return 2 + (grid // 2) ** 2


def tokenize_sample(messages: Sequence[Mapping], tokenizer: Tokenizer, train_on: str = "assistant"
                    ) -> tuple[list[int], list[int]]:
    """Conversation -> (input_ids, labels) by the rules in the module docstring."""
    if train_on not in TRAIN_ON:
        raise DataError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    sp = tokenizer.special_ids
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    blocks = [_message_ids(tokenizer, m) for m in messages]  # the template: prefix, then one block per message
    prefix = len(ids) - sum(map(len, blocks))
    if ids[prefix:] != [t for b in blocks for t in b]:
        raise DataError("the chat template is not a concatenation of per-message blocks; cannot place labels")
    owner = ["prefix"] * prefix + [m["role"] for m, b in zip(messages, blocks, strict=True) for _ in b]
    ids = [*ids, sp["<|endoftext|>"]]
    image_pads = {t + 1 for t, token in enumerate(ids) if token == sp[IMAGE_PLACEHOLDER[0]]}  # boi PAD eoi
    labels = [IGNORE_INDEX] * len(ids)
    for t in range(1, len(ids)):
        if (train_on == "all" or owner[t - 1] == "assistant") and t not in image_pads:
            labels[t] = ids[t]
    return ids, labels


def _message_ids(tokenizer: Tokenizer, message: Mapping) -> list[int]:
    return tokenizer.apply_chat_template([message], add_generation_prompt=False, add_special_tokens=False)


def read_samples(path: str | Path, tokenizer: Tokenizer, config: GLM4VConfig, *, max_length: int | None = None,
                 train_on: str = "assistant", on_bad: str = "skip",
                 report: Callable[[str], None] = print) -> list[Sample]:
    """Every usable record of a JSONL file, in file order. Bad records are reported as
    `FILE:LINE: reason` through `report` and skipped, or raise DataError (on_bad="error")."""
    if on_bad not in ON_BAD_RECORD:
        raise DataError(f"on_bad must be one of {ON_BAD_RECORD}, got {on_bad!r}")
    path = Path(path)
    max_length = max_length or config.seq_length
    checked: dict[str, str | None] = {}  # image path -> why it is refused (None: usable); each decoded once
    samples, skipped = [], 0
    with open_regular(path, "fine-tuning data", DataError) as f:  # a FIFO is refused, never read
        for number, line in _lines(f, path):
            if not line.strip():
                continue
            try:
                samples.append(parse_record(line, number, path.parent, tokenizer, config, max_length=max_length,
                                            train_on=train_on, checked=checked))
            except DataError as e:
                reason = _clip(str(e))
                if on_bad == "error":
                    raise DataError(f"{path}:{number}: {reason} (pass --on-bad-record skip to skip such records)"
                                    ) from None
                report(f"{path}:{number}: skipped: {reason}")
                skipped += 1
    if not samples:
        raise DataError(f"{path} holds no usable record ({skipped} skipped)")
    if skipped:
        report(f"{path}: {len(samples)} record(s) used, {skipped} skipped")
    return samples


def _clip(reason: str, limit: int = 500) -> str:
    """One short line: a reason quotes the record's values, which may be huge or hold newlines."""
    reason = reason.replace("\r", "\\r").replace("\n", "\\n")
    return reason if len(reason) <= limit else f"{reason[:limit]}... ({len(reason)} characters)"


def _lines(f: BinaryIO, path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based number, bytes) per line, split at b"\\n" only. A line over MAX_LINE_BYTES comes cut
    to MAX_LINE_BYTES + 2 bytes (parse_record refuses it), and the rest of it is read past."""
    number = 0
    try:
        while line := f.readline(MAX_LINE_BYTES + 2):  # + 2: the "\r\n" of a line right at the limit
            number += 1
            if len(line) == MAX_LINE_BYTES + 2 and not line.endswith(b"\n"):
                tail = line
                while tail and not tail.endswith(b"\n"):
                    tail = f.readline(2**20)
                yield number, line
            else:
                yield number, line.rstrip(b"\r\n")
    except OSError as e:
        raise DataError(f"cannot read fine-tuning data {path} after line {number}: {os_reason(e)}") from None


def parse_record(line: bytes, number: int, folder: Path, tokenizer: Tokenizer, config: GLM4VConfig, *,
                 max_length: int, train_on: str, checked: dict[str, str | None] | None = None) -> Sample:
    """One JSONL line -> Sample, or DataError saying why not. `checked` carries the images already
    decoded between calls."""
    if len(line) > MAX_LINE_BYTES:
        raise DataError(f"line is longer than MAX_LINE_BYTES = {MAX_LINE_BYTES} bytes (a missing newline?)")
    if number == 1:
        line = line.removeprefix(codecs.BOM_UTF8)  # the byte-order mark some editors write
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text (at byte {e.start + 1} of the line: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:  # json's C parser counts its depth and stops cleanly
        raise DataError("JSON nested too deeply to parse") from None
    except ValueError as e:  # e.g. an integer of over 4300 digits (Python's int-from-text limit)
        raise DataError(f"JSON that Python cannot read: {e}") from None
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        raise DataError('expected an object {"messages": [...]} with a non-empty list of messages')
    messages = []
    for i, m in enumerate(record["messages"]):
        if isinstance(m, dict) and m.get("image") is not None and not config.has_vision:
            raise DataError(f"message {i} has an image, but the checkpoint is a text-only GLM-4 (no vision tower)")
        if isinstance(m, dict) and m.get("image") is not None:
            m = {**m, "image": _resolve_images(m["image"], folder, i, {} if checked is None else checked)}
        messages.append(m)
    try:
        check_conversation(messages)
        ids, labels = tokenize_sample(messages, tokenizer, train_on)
    except TokenizerError as e:
        raise DataError(str(e)) from None
    n_images = sum(len(_as_list(m.get("image"))) for m in messages)  # 0 for a text-only checkpoint
    length = len(ids) + (n_images * (image_rows(config) - len(IMAGE_PLACEHOLDER)) if n_images else 0)
    if length > max_length:
        raise DataError(f"{length} decoder rows after the image splice exceed max_length {max_length} "
                        "(nothing is truncated: shorten the record or raise --max-length)")
    if all(label == IGNORE_INDEX for label in labels):
        raise DataError(f"no token to learn (train_on={train_on!r} and the record has no assistant message "
                        "with content)")
    return Sample(number, tuple(messages), tuple(ids), tuple(labels), length)


def _resolve_images(image, folder: Path, index: int, checked: dict[str, str | None]):
    """A path or a list of paths, relative to the data file's folder; each is decoded once here, so
    that a file load_image would refuse is refused now, not in the middle of training."""
    paths = _as_list(image)
    if not paths or not all(isinstance(p, str) and p for p in paths):
        raise DataError(f"message {index}: 'image' must be a path or a non-empty list of paths, "
                        f"got {reprlib.repr(image)}")  # reprlib: shortened, and safe for deep nesting
    resolved = [str(p if Path(p).is_absolute() else folder / p) for p in paths]
    for original, p in zip(paths, resolved, strict=True):
        if not os.path.exists(p):  # False also for a name no file can have (too long, a NUL byte)
            raise DataError(f"message {index}: image {original!r} does not exist (looked for {p!r})")
        if p not in checked:
            try:
                verify_image(p)
                checked[p] = None
            except ImageError as e:
                checked[p] = str(e)
        if checked[p] is not None:
            raise DataError(f"message {index}: image {original!r} is not a readable image ({checked[p]})")
    return resolved if isinstance(image, (list, tuple)) else resolved[0]


def collate(samples: Sequence[Sample], tokenizer: Tokenizer, image_size: int | None) -> TrainingBatch:
    """Left-padded batch, as chat.build_batch pads it, with labels padded by -100 alongside.

    pixel_values stacks every image of every row, rows in order and each row's images in message
    order (chat.build_batch's order)."""
    input_ids, attention_mask, position_ids = pad_left([s.input_ids for s in samples], tokenizer.pad_id)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i, s in enumerate(samples):
        labels[i, labels.shape[1] - len(s.labels):] = torch.tensor(s.labels, dtype=torch.long)
    images = []
    for s in samples:
        for path in s.images:
            try:
                images.append(load_image(path, image_size))
            except ValueError as e:
                raise DataError(f"line {s.line}: {e}") from None
    pixel_values = torch.stack(images) if images else None
    inputs = ModelInputs(input_ids, pixel_values, attention_mask, position_ids)
    return TrainingBatch(inputs, labels, sum(s.counted for s in samples), sum(s.length for s in samples))


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The sample order of one epoch: a permutation drawn from (seed, epoch) alone, so a resumed
    run replays exactly the batches an uninterrupted one sees."""
    if not shuffle:
        return list(range(n))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def micro_batches(samples: Sequence[Sample], batch_size: int, seed: int, epoch: int,
                  shuffle: bool = True) -> list[list[Sample]]:
    """One epoch's micro-batches (the last may be smaller)."""
    order = epoch_order(len(samples), seed, epoch, shuffle)
    return [[samples[i] for i in order[k:k + batch_size]] for k in range(0, len(order), batch_size)]
