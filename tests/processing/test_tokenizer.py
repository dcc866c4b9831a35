"""Tokenizer and chat template vs the reference ChatGLM4Tokenizer outputs in fixtures/tokenizer/cases.json.

Expected values come from the fixtures, from the tokenizer facts written out here, or from raw
tiktoken built straight from the rank file (an oracle that shares no code with ours).
"""
from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import time
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
from helpers.paths import FIXTURES
from PIL import Image

from glm4v_core.processing.tokenizer import PAT_STR, SPECIAL_TOKENS, Tokenizer, TokenizerError

VOCAB = FIXTURES / "tokenizer" / "tokenizer.model"
CASES = json.loads((FIXTURES / "tokenizer" / "cases.json").read_text(encoding="utf-8"))
TEXT_CASES = CASES["cases"]
CHAT_CASES = [c for c in CASES["chat_template_cases"] if "conversation" in c]  # batch case: test_chat.py

# The tokenizer facts (special ids, split pattern), written out independently of the code under test.
EXPECTED_SPECIAL_IDS = {
    "<|endoftext|>": 151329, "[MASK]": 151330, "[gMASK]": 151331, "[sMASK]": 151332, "<sop>": 151333,
    "<eop>": 151334, "<|system|>": 151335, "<|user|>": 151336, "<|assistant|>": 151337,
    "<|observation|>": 151338, "<|begin_of_image|>": 151339, "<|end_of_image|>": 151340,
    "<|begin_of_video|>": 151341, "<|end_of_video|>": 151342,
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(VOCAB)


@pytest.fixture(scope="module")
def raw() -> tiktoken.Encoding:
    """Raw tiktoken with no special tokens, loaded by tiktoken's own reader: the reference's setup."""
    ranks = tiktoken.load.load_tiktoken_bpe(str(VOCAB))
    return tiktoken.Encoding("raw", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})


def fixture_image(placeholder: str) -> Image.Image:
    """cases.json names its images '<PIL image: NAME>'; NAME.png is in fixtures/images."""
    name = re.fullmatch(r"<PIL image: (\w+)>", placeholder).group(1)
    with Image.open(FIXTURES / "images" / f"{name}.png") as img:
        return img.copy()  # decoded, in its file mode (RGB, RGBA or L), file closed


def with_images(conversation: list[dict]) -> list[dict]:
    return [{**m, "image": fixture_image(m["image"])} if "image" in m else m for m in conversation]


def test_vocabulary_fixture_is_the_real_one():
    assert hashlib.sha256(VOCAB.read_bytes()).hexdigest() == CASES["tokenizer_model_sha256"]


# -- the 26 text cases -------------------------------------------------------------------------

@pytest.mark.parametrize("case", TEXT_CASES, ids=[c["id"] for c in TEXT_CASES])
def test_encode_matches_reference(tok, case):
    assert tok.encode(case["text"]) == case["ids"]
    assert [151331, 151333, *tok.encode(case["text"])] == case["ids_with_special_tokens"]  # [gMASK]<sop>


@pytest.mark.parametrize("case", TEXT_CASES, ids=[c["id"] for c in TEXT_CASES])
def test_encode_ordinary_matches_reference(tok, case):
    ids = tok.encode_ordinary(case["text"])
    assert ids == case["ids_ordinary"]
    assert [tok.decode_bytes([i]).hex() for i in ids] == case["ordinary_token_bytes_hex"]


@pytest.mark.parametrize("case", TEXT_CASES, ids=[c["id"] for c in TEXT_CASES])
def test_decode_matches_reference(tok, case):
    assert tok.decode(case["ids"]) == case["decode_ids_no_space_between_special"]
    assert tok.decode(case["ids_ordinary"]) == case["text"]


def test_decode_partial_utf8_is_replaced(tok):
    # '你' is one token of 3 bytes; alone, its first 2 bytes are not valid UTF-8.
    (nihao,) = [c for c in TEXT_CASES if c["id"] == "zh_nihao"]
    first = bytes.fromhex(nihao["ordinary_token_bytes_hex"][0])
    assert tok.decode_bytes(nihao["ids_ordinary"][:1]) == first
    assert tok.decode(nihao["ids"]) == "你好"


def test_decode_accepts_tensors(tok):
    torch = pytest.importorskip("torch")
    (case,) = [c for c in TEXT_CASES if c["id"] == "special_text_roles"]
    assert tok.decode(torch.tensor(case["ids"])) == case["text"]


def test_encode_equals_split_on_specials_then_raw_bpe(tok, raw):
    """HF's rule, rebuilt with Python re + raw tiktoken, on random mixes of specials and text."""
    rng = random.Random(0)
    pieces = ["Hello", " world", "你好", "\n", "  ", "<|", "|>", "<|user", "[gMASK", "x<", "😀", "123", *SPECIAL_TOKENS]
    splitter = re.compile("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")")
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        expected = []
        for part in splitter.split(text):
            expected += [EXPECTED_SPECIAL_IDS[part]] if part in EXPECTED_SPECIAL_IDS else raw.encode_ordinary(part)
        assert tok.encode(text) == expected, text
        assert tok.encode_ordinary(text) == raw.encode_ordinary(text), text
        assert tok.decode(expected) == text


# -- special ids -------------------------------------------------------------------------------

def test_special_ids(tok):
    assert tok.special_ids == EXPECTED_SPECIAL_IDS
    assert tok.stop_ids == [151329, 151336, 151338]
    assert tok.pad_id == 151329
    assert tok.vocab_size == 151343


def test_special_ids_follow_a_toy_vocabulary(tmp_path):
    """The tiny fixture's ids (vocab - 223 + offset) fall out of an 801-rank vocabulary."""
    reference = json.loads((FIXTURES / "tiny" / "reference.json").read_text())["special_tokens"]
    tokens = [bytes([b]) for b in range(256)] + [bytes([a, b]) for a in range(1, 4) for b in range(256)][:545]
    write_vocab(tmp_path / "tokenizer.model", tokens)
    toy = Tokenizer.from_checkpoint(tmp_path)
    assert {k: toy.special_ids[k] for k in reference} == reference
    assert toy.decode(toy.encode("ab<|user|>")) == "ab<|user|>"
    assert toy.chat_template == "glm4v"  # no tokenizer_config.json: the GLM-4V template, as before
    assert Tokenizer({bytes([i]): i for i in range(256)}).chat_template == "glm4v"  # built from ranks too


def write_vocab(path: Path, tokens: list[bytes]) -> Path:
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(tokens)))
    return path


def test_vocabulary_loads_fast():
    start = time.perf_counter()
    Tokenizer.from_file(VOCAB)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"loading the vocabulary took {elapsed:.2f} s (typically ~0.3 s)"


# -- chat template -----------------------------------------------------------------------------

@pytest.mark.parametrize("case", CHAT_CASES, ids=[c["id"] for c in CHAT_CASES])
def test_chat_template_matches_reference(tok, case):
    ids = tok.apply_chat_template(
        with_images(case["conversation"]),
        add_generation_prompt=case["add_generation_prompt"],
        add_special_tokens=case["add_special_tokens"],
    )
    assert ids == case["ids"]
    assert tok.decode(ids) == case["text_equivalent"]
    rendered = tok.render_chat(with_images(case["conversation"]), case["add_generation_prompt"],
                               case["add_special_tokens"])
    assert rendered == case["text_equivalent"]


def test_chat_template_accepts_image_path(tok):
    (case,) = [c for c in CHAT_CASES if c["id"] == "b_image_text"]
    path = str(FIXTURES / "images" / "gradient_rgb_97x61.png")
    conversation = [{**case["conversation"][0], "image": path}]
    assert tok.apply_chat_template(conversation, add_generation_prompt=True) == case["ids"]


def test_chat_template_metadata_and_observation(tok, raw):
    """<|role|> BPE(metadata + '\\n') BPE(content), per the reference's build_single_message."""
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris"}'},
        {"role": "observation", "content": "18C"},
    ]
    bpe = raw.encode_ordinary
    expected = [151331, 151333, 151336, *bpe("\n"), *bpe("weather?"),
                151337, *bpe("get_weather\n"), *bpe('{"city": "Paris"}'),
                151338, *bpe("\n"), *bpe("18C"), 151337]
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == expected


def test_metadata_and_newline_are_one_bpe_string(tok, raw):
    """The reference encodes metadata + '\\n' as one string: a trailing space merges with the newline."""
    bpe = raw.encode_ordinary
    assert bpe("tool \n") != bpe("tool ") + bpe("\n")  # so this test tells the two apart
    messages = [{"role": "observation", "metadata": "tool ", "content": "ok"}]
    assert tok.apply_chat_template(messages, add_special_tokens=False) == [151338, *bpe("tool \n"), *bpe("ok")]


def test_special_text_in_content_is_text_unless_parsed(tok, raw):
    """The reference GLM-4V template encodes content as plain text; "parse" opts into control tokens."""
    messages = [{"role": "user", "content": "a<|assistant|>b"}]
    assert tok.apply_chat_template(messages) == [151331, 151333, 151336, *raw.encode_ordinary("\n"),
                                                 *raw.encode_ordinary("a<|assistant|>b")]
    parsed = tok.apply_chat_template(messages, special_tokens_in_content="parse")
    assert parsed == [151331, 151333, 151336, *raw.encode_ordinary("\n"), *raw.encode_ordinary("a"), 151337,
                      *raw.encode_ordinary("b")]
    assert tok.chat_roles == ("system", "user", "assistant", "observation")


def test_missing_or_none_content_is_empty(tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant"}, {"role": "user", "content": None}]
    assert tok.apply_chat_template(messages) == [151331, 151333, 151336, 198, 6023]


# -- errors ------------------------------------------------------------------------------------

def first_lines(n: int) -> list[bytes]:
    with VOCAB.open("rb") as f:
        return [next(f) for _ in range(n)]


def test_small_valid_vocabulary_loads(tmp_path):
    """Positive control for the corruption tests below: the same 300 lines, untouched, load."""
    path = tmp_path / "ok.model"
    path.write_bytes(b"".join(first_lines(300)))
    assert Tokenizer.from_file(path).special_ids["<|endoftext|>"] == 300


@pytest.mark.parametrize("line, corrupt, message", [
    (3, b"IQ==\n", r"ok\.model:3: expected 'base64\(token_bytes\) rank'"),
    (3, b"IQ== 2 7\n", r"ok\.model:3: expected 'base64\(token_bytes\) rank'"),
    (5, b"Jg== 5\n", r"ok\.model:5: rank '5' where 4 was expected .*contiguous"),
    (7, b"Jg== x\n", r"ok\.model:7: rank 'x' where 6 was expected"),
    (9, b"I*Q== 8\n", r"ok\.model:9: token .* is not valid base64"),
    (11, b"IQ== 10\n", r"ok\.model:11: token b'!' already appeared on line 1"),
])
def test_malformed_vocabulary(tmp_path, line, corrupt, message):
    lines = first_lines(300)
    lines[line - 1] = corrupt
    path = tmp_path / "ok.model"
    path.write_bytes(b"".join(lines))
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_file(path)


def test_missing_and_empty_vocabulary(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer vocabulary .*nope.model not found"):
        Tokenizer.from_file(tmp_path / "nope.model")
    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(TokenizerError, match="empty.model is empty"):
        Tokenizer.from_file(tmp_path / "empty.model")


def test_checkpoint_without_tokenizer_model():
    with pytest.raises(TokenizerError, match=r"no tokenizer\.model in .*tiny"):
        Tokenizer.from_checkpoint(FIXTURES / "tiny")


@pytest.mark.parametrize("bad", [-1, 151343, 10**9])
def test_decode_out_of_range(tok, bad):
    with pytest.raises(TokenizerError, match=rf"token id {bad} at position 1 .* valid ids are 0\.\.151342"):
        tok.decode([9703, bad, 11])


@pytest.mark.parametrize("bad, kind", [(1.5, "float"), ([1], "list"), ("7", "str")])
def test_decode_non_int_ids(tok, bad, kind):
    with pytest.raises(TokenizerError, match=f"token ids must be ints; got {kind} .* at position 2"):
        tok.decode([9703, 11, bad])


def test_encode_rejects_non_text(tok):
    with pytest.raises(TokenizerError, match="expected text as str, got bytes"):
        tok.encode(b"hi")


@pytest.mark.parametrize("messages, message", [
    ([{"role": "bot", "content": "hi"}], r"message 0 has unknown role 'bot'; expected one of \['system'"),
    ([{"role": "user", "content": "a"}, {"content": "b"}], r"message 1 has unknown role None"),
    ([{"role": "user", "content": ["hi"]}], r"message 0: 'content' must be a str, got list"),
    ([{"role": "user", "content": 3}], r"'content' must be a str, got int"),
    ([{"role": "user", "content": "hi", "metadata": {"a": 1}}], r"'metadata' must be a str, got dict"),
    ([{"role": "user", "content": "hi", "images": "x.png"}], r"unsupported keys \['images'\]"),
    ([("user", "hi")], r"message 0 must be a dict"),
    ("hello", r"a conversation is a list of message dicts, got str"),
])
def test_bad_messages(tok, messages, message):
    with pytest.raises(TokenizerError, match=message):
        tok.apply_chat_template(messages)


# -- several images: one placeholder block per image, before the message's text -------------------

BOI, PAD, EOI = 151339, 151329, 151340


def test_images_in_two_turns_each_get_a_block(tok, raw):
    image = Image.new("RGB", (4, 4))
    messages = [{"role": "user", "content": "a", "image": image}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c", "image": "second.png"}]
    bpe = raw.encode_ordinary
    expected = [151331, 151333, 151336, *bpe("\n"), BOI, PAD, EOI, *bpe("a"), 151337, *bpe("\n"), *bpe("b"),
                151336, *bpe("\n"), BOI, PAD, EOI, *bpe("c"), 151337]
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == expected


def test_a_list_of_images_gives_blocks_in_order_before_the_text(tok, raw):
    bpe = raw.encode_ordinary
    messages = [{"role": "user", "content": "Which is brighter?", "image": ["a.jpg", Image.new("L", (2, 2))]}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == [
        151331, 151333, 151336, *bpe("\n"), BOI, PAD, EOI, BOI, PAD, EOI, *bpe("Which is brighter?"), 151337]
    only_images = [{"role": "user", "content": "", "image": ("a.jpg", "b.jpg", "c.jpg")}]
    assert tok.apply_chat_template(only_images) == [151331, 151333, 151336, *bpe("\n"), *[BOI, PAD, EOI] * 3]


@pytest.mark.parametrize("falsy", ["", None, False, []])
def test_a_falsy_image_is_no_image(tok, falsy):
    """As in the reference (`if image:`): no placeholder, and an empty message is still dropped."""
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    with_falsy = [{"role": "user", "content": "hi", "image": falsy},
                  {"role": "assistant", "content": "", "image": falsy}]
    assert tok.apply_chat_template(with_falsy, add_generation_prompt=True) == \
        tok.apply_chat_template(plain, add_generation_prompt=True)


def test_an_empty_entry_in_an_image_list_is_an_error(tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "user", "content": "x", "image": ["a.jpg", ""]}]
    with pytest.raises(TokenizerError, match=r"message 1: 'image' list entry 1 is empty"):
        tok.apply_chat_template(messages)


def test_random_conversations_follow_the_template_rule(tok, raw):
    """The template rule written out with raw tiktoken, on random conversations with 0, 1 or several
    images per message (paths, lists, falsy values): one block per image, before the text."""
    rng = random.Random(1)
    texts = ["", "hi", "你好 world", "<|user|> stays text", " trailing ", "\n"]
    images = [None, "", False, [], "a.png", ["a.png"], ["a.png", "b.png"], ("a.png", "b.png", "c.png")]
    role_ids = {"system": 151335, "user": 151336, "assistant": 151337, "observation": 151338}
    for _ in range(300):
        messages, expected = [], [151331, 151333]
        for _ in range(rng.randint(0, 5)):
            m = {"role": rng.choice(list(role_ids)), "content": rng.choice(texts), "image": rng.choice(images)}
            if rng.random() < 0.3:
                m["metadata"] = rng.choice(["tool", "x "])
            messages.append(m)
            n_images = 0 if not m["image"] else 1 if isinstance(m["image"], str) else len(m["image"])
            if m["content"] or n_images:
                expected += [role_ids[m["role"]], *raw.encode_ordinary(m.get("metadata", "") + "\n"),
                             *[BOI, PAD, EOI] * n_images, *raw.encode_ordinary(m["content"])]
        assert tok.apply_chat_template(messages, add_generation_prompt=True) == [*expected, 151337], messages
