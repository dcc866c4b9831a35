"""GLM-4 tokenizer: tiktoken byte-level BPE over `tokenizer.model`, 14 special tokens, chat template.

Reproduces THUDM/glm-4v-9b `ChatGLM4Tokenizer` (every claim is pinned by
tests/fixtures/tokenizer/cases.json) without transformers or jinja. The template is the
`apply_chat_template` method below: that is the whole algorithm.
"""
from __future__ import annotations

import binascii
import operator
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import tiktoken

from glm4v_conversion.files import read_bytes
from glm4v_core.config import BUNDLED_VOCABULARY, GLM4VConfig
from glm4v_core.errors import CLIError, GLM4VError


class TokenizerError(GLM4VError):
    """A bad vocabulary file, message or token id; the text says which and where."""


# GLM-4's pre-tokenizer split: OpenAI's original cl100k_base pattern (digits in runs of <= 3).
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# In id order: the first takes the id right after the last BPE rank (151329 in the real vocabulary).
SPECIAL_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
)
ROLES = ("system", "user", "assistant", "observation")
STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")  # generation ends on any of these
PREFIX_TOKENS = ("[gMASK]", "<sop>")
# <|endoftext|> doubles as the image slot; the model swaps these 3 embeddings for the image's 1602.
# One block per image; the reference allows one image per conversation, we allow any number.
IMAGE_PLACEHOLDER = ("<|begin_of_image|>", "<|endoftext|>", "<|end_of_image|>")
MESSAGE_KEYS = ("role", "content", "metadata", "image")


class Message(NamedTuple):
    """One checked chat message; `images` holds what the caller passed (paths or PIL images), in order."""

    role: str
    content: str
    metadata: str
    images: tuple[Any, ...]


# ---------------------------------------------------------------------------------------------
# Vocabulary file: one `base64(token_bytes) rank` per line, ranks 0, 1, 2, ... in file order.

def load_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a tiktoken rank file; any defect raises TokenizerError naming the file and line."""
    path = Path(path)
    lines = read_bytes(path, "tokenizer vocabulary", TokenizerError).splitlines()  # refuses FIFOs, folders
    if not lines:
        raise TokenizerError(f"{path} is empty; expected lines 'base64(token_bytes) rank'")
    ranks = _parse_ranks_fast(lines)
    if ranks is None:
        _raise_first_bad_line(path, lines)
    return ranks


def _parse_ranks_fast(lines: list[bytes]) -> dict[bytes, int] | None:
    """Whole-file parse in a few C-speed passes (~0.1 s for 151k lines); None on any defect.

    The per-line loop that can say *where* a defect is runs only when this returns None.
    """
    fields = [line.partition(b" ") for line in lines]
    if [rank for _, _, rank in fields] != [b"%d" % i for i in range(len(fields))]:
        return None  # also catches a missing separator or a third field (both land in `rank`)
    try:
        tokens = [binascii.a2b_base64(tok, strict_mode=True) for tok, _, _ in fields]
    except binascii.Error:
        return None
    ranks = dict(zip(tokens, range(len(tokens)), strict=True))
    return ranks if len(ranks) == len(tokens) else None  # a shorter dict means duplicate tokens


def _raise_first_bad_line(path: Path, lines: list[bytes]) -> None:
    seen: dict[bytes, int] = {}
    for i, line in enumerate(lines):
        where = f"{path}:{i + 1}"
        fields = line.split(b" ")
        if len(fields) != 2 or not fields[0]:
            raise TokenizerError(f"{where}: expected 'base64(token_bytes) rank' (one space), got {line[:80]!r}")
        token_b64, rank = fields
        if rank != b"%d" % i:
            raise TokenizerError(
                f"{where}: rank {rank[:20].decode(errors='replace')!r} where {i} was expected "
                "(ranks must be contiguous: 0, 1, 2, ... in file order)"
            )
        try:
            token = binascii.a2b_base64(token_b64, strict_mode=True)
        except binascii.Error as e:
            raise TokenizerError(f"{where}: token {token_b64[:40]!r} is not valid base64 ({e})") from e
        if token in seen:
            raise TokenizerError(f"{where}: token {token!r} already appeared on line {seen[token] + 1}")
        seen[token] = i
    raise AssertionError(f"{path}: fast parse rejected the file but every line checks out")


# ---------------------------------------------------------------------------------------------
# Messages

def check_message(message: Any, index: int) -> Message:
    """Validate one chat message dict; `index` only serves the error text."""
    where = f"message {index}"
    if not isinstance(message, Mapping):
        raise TokenizerError(f"{where} must be a dict with 'role' and 'content', got {type(message).__name__}")
    unknown = sorted(set(message) - set(MESSAGE_KEYS))
    if unknown:  # a typo such as 'images' would otherwise silently drop the image
        raise TokenizerError(f"{where} has unsupported keys {unknown}; allowed: {list(MESSAGE_KEYS)}")
    role = message.get("role")
    if role not in ROLES:
        raise TokenizerError(f"{where} has unknown role {role!r}; expected one of {list(ROLES)}")
    content = _optional_str(message, "content", where)
    metadata = _optional_str(message, "metadata", where)
    return Message(role, content, metadata, _images(message.get("image"), where))


def _no_image(value: Any) -> bool:
    """The reference's `if image:` on the values it can meet; a PIL image or a tensor is never falsy here."""
    return value is None or value is False or (isinstance(value, (str, bytes, list, tuple)) and len(value) == 0)


def _images(value: Any, where: str) -> tuple[Any, ...]:
    """'image': one image or a list of them (placed before the text, in order); '', None, False = none."""
    if _no_image(value):
        return ()
    if not isinstance(value, (list, tuple)):
        return (value,)
    empty = [i for i, v in enumerate(value) if _no_image(v)]
    if empty:
        raise TokenizerError(f"{where}: 'image' list entry {empty[0]} is empty ({value[empty[0]]!r}); "
                             "give a path or a PIL image, or leave it out of the list")
    return tuple(value)


def _optional_str(message: Mapping, key: str, where: str) -> str:
    value = message.get(key)
    if value is None:  # the reference treats a missing or None field as ""
        return ""
    if not isinstance(value, str):
        hint = " (put an image under the 'image' key)" if key == "content" else ""
        raise TokenizerError(f"{where}: {key!r} must be a str, got {type(value).__name__}{hint}")
    return value


def check_conversation(messages: Sequence[Mapping]) -> list[Message]:
    """Validate a whole conversation (any number of images, in any messages)."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TokenizerError(f"a conversation is a list of message dicts, got {type(messages).__name__}")
    return [check_message(m, i) for i, m in enumerate(messages)]


def conversation_images(messages: Sequence[Mapping]) -> list[Any]:
    """The conversation's images (paths or PIL images) in the order of their placeholder blocks."""
    return [image for m in check_conversation(messages) for image in m.images]


# ---------------------------------------------------------------------------------------------

class Tokenizer:
    """GLM-4 BPE + special tokens. Special ids follow the last rank, so toy vocabularies work too."""

    def __init__(self, ranks: dict[bytes, int], name: str = "glm4"):
        n_ranks = len(ranks)
        self.special_ids: dict[str, int] = {t: n_ranks + i for i, t in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = n_ranks + len(SPECIAL_TOKENS)  # ids the tokenizer can produce or decode
        self.pad_id = self.special_ids["<|endoftext|>"]
        self.stop_ids = [self.special_ids[t] for t in STOP_TOKENS]
        # tiktoken finds special-token text itself (one Rust regex pass). That equals HF's added-token
        # split here: exact matches, no stripping, and no special token is a prefix of another.
        self._enc = tiktoken.Encoding(
            name, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=dict(self.special_ids)
        )

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        return cls(load_ranks(path))

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> Tokenizer:
        path = Path(directory) / "tokenizer.model"
        if not (path.exists() or path.is_symlink()):
            raise TokenizerError(
                f"no tokenizer.model in {directory}: GLM-4V checkpoints ship it beside config.json; "
                "for a folder without one, use Tokenizer.from_file(<path to a rank file>)"
            )
        return cls.from_file(path)

    # -- text <-> ids ---------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """BPE where special-token text (e.g. '<|user|>') becomes its id; no [gMASK]<sop> prefix."""
        return self._enc.encode(_check_text(text), allowed_special="all")

    def encode_ordinary(self, text: str) -> list[int]:
        """BPE only: special-token text stays text (how message content is encoded)."""
        return self._enc.encode_ordinary(_check_text(text))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Concatenated token bytes (special ids give their text); for streaming partial UTF-8."""
        if hasattr(ids, "tolist"):  # tensors and arrays
            ids = ids.tolist()
        elif not isinstance(ids, (list, tuple)):
            ids = list(ids)
        try:
            return self._enc.decode_bytes(ids)
        except (KeyError, OverflowError, TypeError) as e:
            # tiktoken knows exactly our ids (ranks + specials), so validating only on failure is free
            raise self._bad_ids_error(ids) from e

    def decode(self, ids: Sequence[int]) -> str:
        """UTF-8 with replacement; special tokens become their text with no spaces added around them."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def _bad_ids_error(self, ids: Sequence) -> TokenizerError:
        for pos, i in enumerate(ids):
            try:
                i = operator.index(i)  # ints and numpy integers, not floats
            except TypeError:
                return TokenizerError(f"token ids must be ints; got {type(i).__name__} {i!r} at position {pos}")
            if not 0 <= i < self.vocab_size:
                return TokenizerError(
                    f"token id {i} at position {pos} is outside the vocabulary: valid ids are "
                    f"0..{self.vocab_size - 1} ({self.vocab_size - len(SPECIAL_TOKENS)} BPE ranks + "
                    f"{len(SPECIAL_TOKENS)} special tokens); larger embedding rows are never produced"
                )
        return TokenizerError(f"tiktoken could not decode {len(ids)} ids that all look valid")

    # -- chat template ----------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: Sequence[Mapping], add_generation_prompt: bool = False, add_special_tokens: bool = True
    ) -> list[int]:
        """[gMASK]<sop> then, per message: <|role|> BPE(metadata + "\\n") [one image block per image] BPE(content)."""
        sp = self.special_ids
        ids = [sp[t] for t in PREFIX_TOKENS] if add_special_tokens else []
        for m in check_conversation(messages):
            if not m.content and not m.images:
                continue  # the reference drops such a message entirely, role token included
            ids.append(sp[f"<|{m.role}|>"])
            ids += self.encode_ordinary(m.metadata + "\n")
            ids += [sp[t] for t in IMAGE_PLACEHOLDER] * len(m.images)  # in the images' order, before the text
            ids += self.encode_ordinary(m.content)  # plain text: '<|user|>' inside content stays text
        if add_generation_prompt:
            ids.append(sp["<|assistant|>"])  # no end-of-turn token exists in GLM-4's format
        return ids


def _check_text(text: Any) -> str:
    if not isinstance(text, str):
        raise TokenizerError(f"expected text as str, got {type(text).__name__}")
    return text




def resolve_tokenizer(path: Path | None, checkpoint: Path, config: GLM4VConfig) -> Tokenizer:
    """--tokenizer, else the checkpoint's tokenizer.model, else the bundled vocabulary cut to fit."""
    if path is not None:
        tokenizer = Tokenizer.from_file(path)
    elif (checkpoint / "tokenizer.model").exists() or (checkpoint / "tokenizer.model").is_symlink():
        tokenizer = Tokenizer.from_checkpoint(checkpoint)  # a FIFO or folder there is named, not skipped
    elif BUNDLED_VOCABULARY.is_file():
        tokenizer = truncated_tokenizer(BUNDLED_VOCABULARY, config.pad_token_id)
    else:
        raise CLIError(f"{checkpoint} has no tokenizer.model; pass --tokenizer FILE")
    check_tokenizer_fits(tokenizer, config)
    return tokenizer


def truncated_tokenizer(vocabulary: Path, n_ranks: int) -> Tokenizer:
    """The first n_ranks BPE ranks of a vocabulary; the special tokens then take ids n_ranks.. ."""
    ranks = load_ranks(vocabulary)
    if not 256 <= n_ranks <= len(ranks):
        raise CLIError(f"cannot cut {vocabulary} ({len(ranks)} ranks) to {n_ranks} ranks (need 256 single bytes)")
    return Tokenizer({token: rank for token, rank in ranks.items() if rank < n_ranks})


def check_tokenizer_fits(tokenizer: Tokenizer, config: GLM4VConfig) -> None:
    """The ids the model treats specially must be the tokenizer's, or prompts are silently wrong."""
    sp = tokenizer.special_ids
    pairs = {"pad_token_id (<|endoftext|>)": (config.pad_token_id, sp["<|endoftext|>"]),
             "boi_token_id (<|begin_of_image|>)": (config.boi_token_id, sp["<|begin_of_image|>"]),
             "eoi_token_id (<|end_of_image|>)": (config.eoi_token_id, sp["<|end_of_image|>"])}
    for name, (model_id, tok_id) in pairs.items():
        if model_id != tok_id:
            raise TokenizerError(f"tokenizer does not fit the checkpoint: config {name} is {model_id}, the "
                                 f"tokenizer's is {tok_id}")
    if tokenizer.vocab_size > config.vocab_size:
        raise TokenizerError(f"tokenizer has {tokenizer.vocab_size} ids, the model's embedding only "
                             f"{config.vocab_size}")


