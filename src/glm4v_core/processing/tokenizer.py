"""GLM-4 tokenizer: tiktoken byte-level BPE over `tokenizer.model`, 14 special tokens, chat templates.

Reproduces the `ChatGLM4Tokenizer` of THUDM/glm-4v-9b and glm-4-9b-chat without transformers or
jinja (pinned by tests/fixtures/tokenizer/cases.json and chat_text_cases.json). The templates and
the message checks live in chat_template.py; `apply_chat_template` here turns their pieces into ids.
"""
from __future__ import annotations

import binascii
import operator
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tiktoken

from glm4v_conversion.files import read_bytes
from glm4v_core.config import BUNDLED_VOCABULARY, GLM4VConfig
from glm4v_core.errors import CLIError
from glm4v_core.processing.chat_template import (
    IMAGE_PLACEHOLDER,
    MESSAGE_KEYS,
    PREFIX_TOKENS,
    ROLES,
    Message,
    Special,
    TokenizerError,
    check_conversation,
    check_message,
    checkpoint_template,
    conversation_images,
    template_named,
)

# Message checks moved to chat_template.py; these names stay importable from here.
__all__ = ["IMAGE_PLACEHOLDER", "MESSAGE_KEYS", "PAT_STR", "PREFIX_TOKENS", "ROLES", "SPECIAL_TOKENS", "STOP_TOKENS",
           "Message", "Tokenizer", "TokenizerError", "check_conversation", "check_message", "check_tokenizer_fits",
           "conversation_images", "load_ranks", "resolve_tokenizer", "truncated_tokenizer"]

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
STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")  # generation ends on any of these


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

class Tokenizer:
    """GLM-4 BPE + special tokens + one chat template. Special ids follow the last rank, so toy
    vocabularies work too. `template` says what conversations it takes (roles, images, tools)."""

    def __init__(self, ranks: dict[bytes, int], name: str = "glm4", chat_template: str = "glm4v"):
        self.template = template_named(chat_template)
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
    def from_file(cls, path: str | Path, chat_template: str = "glm4v") -> Tokenizer:
        template_named(chat_template)  # a bad name fails before the 0.3 s vocabulary load
        return cls(load_ranks(path), chat_template=chat_template)

    @classmethod
    def from_checkpoint(cls, directory: str | Path, chat_template: str | None = None) -> Tokenizer:
        """The folder's tokenizer.model, with the template its reference tokenizer applies unless
        `chat_template` names one (chat_template.checkpoint_template says how it is chosen)."""
        path = Path(directory) / "tokenizer.model"
        if not (path.exists() or path.is_symlink()):
            raise TokenizerError(
                f"no tokenizer.model in {directory}: GLM-4 checkpoints ship it beside config.json; "
                "for a folder without one, use Tokenizer.from_file(<path to a rank file>)"
            )
        return cls.from_file(path, chat_template or checkpoint_template(directory))

    @property
    def chat_template(self) -> str:
        """The template's name: 'glm4v' (GLM-4V checkpoints) or 'glm4-chat' (glm-4-9b-chat, -1m)."""
        return self.template.name

    @property
    def chat_roles(self) -> tuple[str, ...]:
        """The roles a message may have under this template, for servers and chat commands to check."""
        return self.template.roles

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
        self,
        messages: Sequence[Mapping],
        add_generation_prompt: bool = False,
        add_special_tokens: bool = True,
        special_tokens_in_content: str = "text",
    ) -> list[int]:
        """The conversation's ids under this tokenizer's template; add_special_tokens writes [gMASK]<sop>.

        The special tokens the template writes are always ids. Text from the messages (content, metadata,
        tools) is plain BPE by default, so a '<|user|>' typed by a user stays text and cannot forge a turn.
        special_tokens_in_content="parse" turns such text into control tokens, as the reference tokenizer
        does on the rendered string (the ids then equal tokenizer(render_chat(...)) in transformers)."""
        encoders = {"text": self.encode_ordinary, "parse": self.encode}
        if special_tokens_in_content not in encoders:
            raise TokenizerError(f"special_tokens_in_content must be 'text' (special-token text in messages stays "
                                 f"text) or 'parse' (it becomes control tokens), got {special_tokens_in_content!r}")
        encode = encoders[special_tokens_in_content]
        ids = []
        for piece in self._chat_pieces(messages, add_generation_prompt, add_special_tokens):
            ids += [self.special_ids[piece]] if isinstance(piece, Special) else encode(piece)
        return ids

    def render_chat(
        self, messages: Sequence[Mapping], add_generation_prompt: bool = False, add_special_tokens: bool = True
    ) -> str:
        """The conversation as the template's text (transformers' apply_chat_template(..., tokenize=False))."""
        return "".join(self._chat_pieces(messages, add_generation_prompt, add_special_tokens))

    def _chat_pieces(self, messages: Sequence[Mapping], add_generation_prompt: bool, add_special_tokens: bool):
        return self.template.render(check_conversation(messages), add_generation_prompt, add_special_tokens)


def _check_text(text: Any) -> str:
    if not isinstance(text, str):
        raise TokenizerError(f"expected text as str, got {type(text).__name__}")
    return text


def resolve_tokenizer(path: Path | None, checkpoint: Path, config: GLM4VConfig,
                      chat_template: str | None = None) -> Tokenizer:
    """--tokenizer, else the checkpoint's tokenizer.model, else the bundled vocabulary cut to fit.

    chat_template: a template name, or None (or "auto") for the checkpoint's own (checkpoint_template:
    glm4v for GLM-4V, glm4-chat for a text-only GLM-4), whichever vocabulary file is used."""
    if chat_template in (None, "auto"):
        chat_template = checkpoint_template(checkpoint)
    if path is not None:
        tokenizer = Tokenizer.from_file(path, chat_template)
    elif (checkpoint / "tokenizer.model").exists() or (checkpoint / "tokenizer.model").is_symlink():
        tokenizer = Tokenizer.from_checkpoint(checkpoint, chat_template)  # a FIFO or folder there is named
    elif BUNDLED_VOCABULARY.is_file():
        tokenizer = truncated_tokenizer(BUNDLED_VOCABULARY, config.pad_token_id, chat_template)
    else:
        raise CLIError(f"{checkpoint} has no tokenizer.model; pass --tokenizer FILE")
    check_tokenizer_fits(tokenizer, config)
    return tokenizer


def truncated_tokenizer(vocabulary: Path, n_ranks: int, chat_template: str = "glm4v") -> Tokenizer:
    """The first n_ranks BPE ranks of a vocabulary; the special tokens then take ids n_ranks.. ."""
    template_named(chat_template)  # a bad name fails before the vocabulary load
    ranks = load_ranks(vocabulary)
    if not 256 <= n_ranks <= len(ranks):
        raise CLIError(f"cannot cut {vocabulary} ({len(ranks)} ranks) to {n_ranks} ranks (need 256 single bytes)")
    return Tokenizer({token: rank for token, rank in ranks.items() if rank < n_ranks}, chat_template=chat_template)


def check_tokenizer_fits(tokenizer: Tokenizer, config: GLM4VConfig) -> None:
    """The ids the model treats specially must be the tokenizer's, or prompts are silently wrong."""
    sp = tokenizer.special_ids
    pairs = {"pad_token_id (<|endoftext|>)": (config.pad_token_id, sp["<|endoftext|>"])}
    if config.has_vision:  # a text-only GLM-4 has no image ids to compare
        pairs |= {"boi_token_id (<|begin_of_image|>)": (config.boi_token_id, sp["<|begin_of_image|>"]),
                  "eoi_token_id (<|end_of_image|>)": (config.eoi_token_id, sp["<|end_of_image|>"])}
    for name, (model_id, tok_id) in pairs.items():
        if model_id != tok_id:
            raise TokenizerError(f"tokenizer does not fit the checkpoint: config {name} is {model_id}, the "
                                 f"tokenizer's is {tok_id}")
    if tokenizer.vocab_size > config.vocab_size:
        raise TokenizerError(f"tokenizer has {tokenizer.vocab_size} ids, the model's embedding only "
                             f"{config.vocab_size}")


