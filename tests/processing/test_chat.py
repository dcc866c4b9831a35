"""build_inputs / build_batch vs the reference's apply_chat_template outputs (cases.json, tiny fixture)."""
from __future__ import annotations

import json
import re

import pytest
import torch
from helpers.paths import FIXTURES
from PIL import Image
from safetensors.torch import load_file

from glm4v_core.processing.chat import ModelInputs, build_batch, build_inputs, pad_left
from glm4v_core.processing.image import load_image
from glm4v_core.processing.tokenizer import Tokenizer, TokenizerError

CASES = {c["id"]: c for c in json.loads((FIXTURES / "tokenizer" / "cases.json").read_text())["chat_template_cases"]}
# build_inputs always adds [gMASK]<sop>, so case f (add_special_tokens=False) is the tokenizer's alone.
SINGLE = [k for k, c in CASES.items() if "conversation" in c and c["add_special_tokens"]]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(FIXTURES / "tokenizer" / "tokenizer.model")


def with_images(conversation: list[dict]) -> list[dict]:
    """cases.json names images '<PIL image: NAME>'; NAME.png is in fixtures/images."""
    def load(placeholder: str) -> Image.Image:
        name = re.fullmatch(r"<PIL image: (\w+)>", placeholder).group(1)
        with Image.open(FIXTURES / "images" / f"{name}.png") as img:
            return img.copy()  # decoded, in its file mode (RGB, RGBA or L), file closed
    return [{**m, "image": load(m["image"])} if "image" in m else m for m in conversation]


def fixture_pixels(case: dict) -> torch.Tensor:
    file, key = case["images_equal_fixture"].split(":")
    return load_file(FIXTURES / "images" / file)[key]


@pytest.mark.parametrize("case_id", SINGLE)
def test_build_inputs_matches_reference(tok, case_id):
    case = CASES[case_id]
    inputs = build_inputs(tok, with_images(case["conversation"]), image_size=case.get("image_size", 56),
                          add_generation_prompt=case["add_generation_prompt"])
    assert inputs.input_ids.dtype == torch.long
    assert inputs.input_ids.tolist() == [case["ids"]]
    if "images_shape" in case:
        assert list(inputs.pixel_values.shape) == case["images_shape"]
        assert torch.equal(inputs.pixel_values[0], fixture_pixels(case)), \
            f"max abs diff {(inputs.pixel_values[0] - fixture_pixels(case)).abs().max():.3g}"
    else:
        assert inputs.pixel_values is None
    assert inputs.attention_mask is None and inputs.position_ids is None  # one row: nothing is padded


def test_build_batch_matches_reference_left_padding(tok):
    case = CASES["g_batch_left_padding"]
    batch = build_batch(tok, case["conversations"], image_size=56, add_generation_prompt=case["add_generation_prompt"])
    assert batch.input_ids.tolist() == case["input_ids"]
    assert batch.attention_mask.tolist() == case["attention_mask"]
    assert batch.position_ids.tolist() == case["position_ids"]
    assert batch.pixel_values is None
    assert {t.dtype for t in (batch.input_ids, batch.attention_mask, batch.position_ids)} == {torch.long}


@pytest.mark.parametrize("fixture", ["tiny", "narrow"])
@pytest.mark.parametrize("batch", ["c", "d"])
def test_pad_left_matches_model_fixtures(fixture, batch):
    reference = json.loads((FIXTURES / fixture / "reference.json").read_text())
    inputs = reference["inputs"][batch]
    ids, mask, pos = pad_left(inputs["unpadded_rows"], reference["special_tokens"]["<|endoftext|>"])
    assert ids.tolist() == inputs["input_ids"]
    assert mask.tolist() == inputs["attention_mask"]
    assert pos.tolist() == inputs["position_ids"]


def test_build_batch_stacks_images_of_image_rows_in_order(tok):
    """Rows: gray image, text only, gradient image -> pixel_values (2, 3, S, S) = [gray, gradient]."""
    b, a, b2 = CASES["b_image_text"], CASES["a_text_single_turn"], CASES["b2_image_only"]
    conversations = [with_images(b2["conversation"]), a["conversation"], with_images(b["conversation"])]
    batch = build_batch(tok, conversations, image_size=56)
    rows = [b2["ids"], a["ids"], b["ids"]]
    width = max(map(len, rows))
    assert batch.input_ids.tolist() == [[151329] * (width - len(r)) + r for r in rows]
    assert batch.attention_mask.tolist() == [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    assert batch.position_ids.tolist() == [[0] * (width - len(r)) + list(range(len(r))) for r in rows]
    assert torch.equal(batch.pixel_values, torch.stack([fixture_pixels(b2), fixture_pixels(b)]))


def test_build_inputs_image_path_and_size(tok):
    path = FIXTURES / "images" / "gradient_rgb_97x61.png"
    inputs = build_inputs(tok, [{"role": "user", "content": "描述这张图片", "image": str(path)}], image_size=112)
    assert inputs.input_ids.tolist() == [CASES["b_image_text"]["ids"]]
    assert torch.equal(inputs.pixel_values[0], load_file(FIXTURES / "images" / "gradient_rgb_97x61.S112.safetensors")
                       ["pixel_values"])


def test_model_inputs_to_keeps_none():
    moved = ModelInputs(torch.ones(1, 3, dtype=torch.long), None).to("cpu")
    assert moved.pixel_values is None and moved.input_ids.tolist() == [[1, 1, 1]]


def gray(level: int) -> Image.Image:
    return Image.new("L", (8, 8), level)


def test_build_inputs_stacks_every_image_in_reading_order(tok):
    """Two images in turn 1 (a list), one in turn 3: three blocks, pixel_values in the same order."""
    images = [gray(0), gray(128), gray(255)]
    messages = [{"role": "user", "content": "a", "image": images[:2]}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c", "image": images[2]}]
    inputs = build_inputs(tok, messages, image_size=56)
    boi = tok.special_ids["<|begin_of_image|>"]
    assert inputs.input_ids[0].tolist().count(boi) == 3
    assert torch.equal(inputs.pixel_values, torch.stack([load_image(im, 56) for im in images]))
    assert len({float(p.mean()) for p in inputs.pixel_values}) == 3  # three different images, so order is checked


def test_build_batch_takes_images_row_by_row(tok):
    images = [gray(10), gray(90), gray(200)]
    conversations = [[{"role": "user", "content": "x", "image": images[0]},
                      {"role": "user", "content": "y", "image": images[1]}],
                     [{"role": "user", "content": "text only"}],
                     [{"role": "user", "content": "z", "image": [images[2]]}]]
    batch = build_batch(tok, conversations, image_size=56)
    boi = tok.special_ids["<|begin_of_image|>"]
    assert (batch.input_ids == boi).sum(1).tolist() == [2, 0, 1]
    assert torch.equal(batch.pixel_values, torch.stack([load_image(im, 56) for im in images]))


@pytest.mark.parametrize("falsy", ["", None, False])
def test_falsy_image_means_no_image(tok, falsy):
    case = CASES["a_text_single_turn"]
    conversation = [{**case["conversation"][0], "image": falsy}]
    inputs = build_inputs(tok, conversation, image_size=56)
    assert inputs.input_ids.tolist() == [case["ids"]] and inputs.pixel_values is None
    batch = build_batch(tok, [conversation, with_images(CASES["b_image_text"]["conversation"])], image_size=56)
    assert batch.pixel_values.shape[0] == 1


@pytest.mark.parametrize("conversations", [[], {"role": "user", "content": "hi"}])
def test_build_batch_rejects_non_batches(tok, conversations):
    with pytest.raises(TokenizerError, match="non-empty list of conversations"):
        build_batch(tok, conversations, image_size=56)
