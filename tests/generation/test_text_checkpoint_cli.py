"""`glm4v generate` / `glm4v chat` on a text-only GLM-4 (tests/fixtures/text_tiny, no vision_config):
the glm4-chat template by default, --image and /image refused, --system / --tools, --chat-template,
--prefill-chunk. Expected ids come from Tokenizer.apply_chat_template, expected tokens from glm4v_core.stream_tokens."""
from __future__ import annotations

import io
import json
import re
import sys

import pytest
import torch

import glm4v_core
from glm4v_core import cli
from glm4v_core.generation.streaming import stream_text
from glm4v_core.model.glm4v import PREFILL_CHUNK
from glm4v_core.processing.chat_template import TEMPLATES, checkpoint_template
from glm4v_core.processing.tokenizer import TokenizerError, check_tokenizer_fits, truncated_tokenizer

# "\n..." renders differently under the two templates (glm4v encodes "\n" and the content apart)
PROMPT = "\nWhat is 2 + 2?"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def text_dir(fixtures_dir):
    return fixtures_dir / "text_tiny"


def tokenizer(fixtures_dir, template: str):
    return truncated_tokenizer(fixtures_dir / "tokenizer" / "tokenizer.model", 801, template)


def run(capsys, argv, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def calls(monkeypatch):
    """Every streamed prompt (ids, pixels, the model's prefill_chunk, the tokenizer's template); the text
    still comes from the real stream_text."""
    seen = []

    def spy(model, tok, input_ids, pixel_values=None, **kwargs):
        seen.append(dict(ids=input_ids[0].tolist(), pixels=pixel_values, chunk=model.prefill_chunk,
                         template=tok.chat_template))
        yield from stream_text(model, tok, input_ids, pixel_values, **kwargs)

    monkeypatch.setattr(cli, "stream_text", spy)
    return seen


@pytest.fixture
def no_model_load(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the weights were loaded before the error was found")
    monkeypatch.setattr(cli, "load_model", forbidden)


def test_generate_on_a_text_checkpoint_is_the_python_api(capsys, calls, text_dir, fixtures_dir):
    rc, out, err = run(capsys, ["generate", "--checkpoint", str(text_dir), "--max-new-tokens", "10", PROMPT])
    assert rc == 0, err
    chat = tokenizer(fixtures_dir, "glm4-chat")
    messages = [{"role": "user", "content": PROMPT}]
    want_ids = chat.apply_chat_template(messages, add_generation_prompt=True)
    [call] = calls
    assert call["template"] == "glm4-chat" and call["pixels"] is None and call["chunk"] == PREFILL_CHUNK
    assert call["ids"] == want_ids
    assert want_ids != tokenizer(fixtures_dir, "glm4v").apply_chat_template(messages, add_generation_prompt=True)
    model = glm4v_core.load_model(text_dir)
    # the command chooses only ids its tokenizer can decode (the random weights like the embedding's padding
    # rows), so the library call is stream_tokens with that vocab_limit (generate() has none)
    steps = glm4v_core.stream_tokens(model, torch.tensor([want_ids]), max_new_tokens=10, vocab_limit=chat.vocab_size)
    tokens = [int(step.tokens[0]) for step in steps]
    stops = [i for i, t in enumerate(tokens) if t in model.config.eos_token_ids]
    assert out == chat.decode(tokens[:stops[0]] if stops else tokens) + "\n"
    assert f"0 image(s), spliced prompt {len(want_ids)} tokens" in err


def test_chat_template_flag_overrides_the_checkpoint(capsys, calls, text_dir, fixtures_dir):
    argv = ["generate", "--checkpoint", str(text_dir), "--max-new-tokens", "2", "--chat-template", "glm4v", PROMPT]
    rc, _, err = run(capsys, argv)
    assert rc == 0, err
    glm4v = tokenizer(fixtures_dir, "glm4v")
    assert calls[0]["ids"] == glm4v.apply_chat_template([{"role": "user", "content": PROMPT}], True)


def test_image_is_refused_on_a_text_checkpoint(capsys, text_dir, fixtures_dir, no_model_load):
    image = fixtures_dir / "images" / "gray_L_50x80.png"
    rc, out, err = run(capsys, ["generate", "--checkpoint", str(text_dir), "--image", str(image), "hi"])
    assert (rc, out) == (1, "")
    assert err == (f"glm4v: error: --image: {text_dir} is a text-only GLM-4 (no vision tower); drop --image\n")


def test_system_and_tools_open_the_prompt(capsys, calls, text_dir, fixtures_dir, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER, {"type": "python"}]))
    argv = ["generate", "--checkpoint", str(text_dir), "--max-new-tokens", "2", "--system", "Be brief.",
            "--tools", str(tools), "Weather in Paris?"]
    rc, _, err = run(capsys, argv)
    assert rc == 0, err
    system = {"role": "system", "content": "Be brief.", "tools": [WEATHER, {"type": "python"}]}
    chat = tokenizer(fixtures_dir, "glm4-chat")
    user = {"role": "user", "content": "Weather in Paris?"}
    assert calls[0]["ids"] == chat.apply_chat_template([system, user], add_generation_prompt=True)
    rc, _, err = run(capsys, argv[:5] + ["--system", "Be brief.", "Weather in Paris?"])  # no --tools
    assert rc == 0, err
    assert calls[1]["ids"] == chat.apply_chat_template([{"role": "system", "content": "Be brief."}, user], True)


def test_system_goes_with_the_glm4v_template_too(capsys, calls, fixtures_dir):
    rc, _, err = run(capsys, ["generate", "--max-new-tokens", "2", "--system", "Be brief.", "hi"])
    assert rc == 0, err
    glm4v = tokenizer(fixtures_dir, "glm4v")
    want = glm4v.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                                     add_generation_prompt=True)
    assert calls[0]["ids"] == want and calls[0]["template"] == "glm4v"


@pytest.mark.parametrize("content, message", [
    (None, r"--tools: .*missing\.json.*; expected a JSON list of tool definitions \(docs/chat_templates.md\)$"),
    ("{not json", r"--tools: .*not valid JSON.*; expected a JSON list of tool definitions"),
    ('{"type": "python"}', r"--tools .*tools.json: expected a JSON list of tool definitions .*got a JSON dict$"),
    ('[{"type": "search"}]', r"--tools .*tools.json: tool 0 must be a dict whose 'type' is one of"),
    ('[{"type": "function", "function": {}}]', r"--tools .*: tool 0: a function tool needs 'function'"),
])
def test_bad_tools_files_are_refused(capsys, tmp_path, text_dir, no_model_load, content, message):
    path = tmp_path / ("missing.json" if content is None else "tools.json")
    if content is not None:
        path.write_text(content)
    rc, out, err = run(capsys, ["generate", "--checkpoint", str(text_dir), "--tools", str(path), "hi"])
    assert (rc, out) == (1, "")
    assert err.count("\n") == 1 and err.startswith("glm4v: error: ")
    assert re.search(message, err.strip().removeprefix("glm4v: error: ")), err


@pytest.mark.parametrize("argv", [[], ["--checkpoint", "TEXT", "--chat-template", "glm4v"]])
def test_tools_need_the_glm4_chat_template(capsys, tmp_path, text_dir, no_model_load, argv):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))
    argv = [str(text_dir) if a == "TEXT" else a for a in argv]
    rc, _, err = run(capsys, ["generate", *argv, "--tools", str(tools), "hi"])
    assert rc == 1
    assert err == ("glm4v: error: --tools: the glm4v chat template takes no tools (only glm4-chat does: a text-only "
                   "GLM-4, or --chat-template glm4-chat); drop --tools\n")


def test_chat_refuses_image_on_a_text_checkpoint_and_goes_on(capsys, monkeypatch, calls, text_dir, fixtures_dir):
    image = fixtures_dir / "images" / "gray_L_50x80.png"
    rc, out, err = run(capsys, ["chat", "--checkpoint", str(text_dir), "--max-new-tokens", "2", "--system", "S."],
                       stdin=f"/image {image}\nhello\n", monkeypatch=monkeypatch)
    assert rc == 0, err
    assert f"glm4v: error: /image: {text_dir} is a text-only GLM-4 (no vision tower); drop /image\n" in err
    [call] = calls
    chat = tokenizer(fixtures_dir, "glm4-chat")
    assert call["pixels"] is None
    assert call["ids"] == chat.apply_chat_template([{"role": "system", "content": "S."},
                                                    {"role": "user", "content": "hello"}], True)


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_prefill_chunk_gives_the_same_tokens(capsys, monkeypatch, calls, text_dir, command):
    outs = []
    for chunk in ("3", "0"):
        argv = ["--checkpoint", str(text_dir), "--max-new-tokens", "8", "--prefill-chunk", chunk]
        argv = ["generate", *argv, PROMPT] if command == "generate" else ["chat", *argv]
        rc, out, err = run(capsys, argv, stdin="Tell me a long story about cats.\n", monkeypatch=monkeypatch)
        assert rc == 0, err
        outs.append(out)
    assert [c["chunk"] for c in calls] == [3, None]
    assert len(calls[0]["ids"]) > 3  # the prompt really is cut into chunks
    assert outs[0] == outs[1]


@pytest.mark.parametrize("value", ["-1", "x"])
def test_negative_prefill_chunk_is_a_usage_error(capsys, value):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--prefill-chunk", value, "hi"])
    assert e.value.code == 2
    assert f"argument --prefill-chunk: expected an int >= 0 (prompt slots per pass; 0 = one pass), got '{value}'" \
        in capsys.readouterr().err


def test_the_torch_free_mirrors_are_the_librarys():
    assert cli.CHAT_TEMPLATE_NAMES == tuple(TEMPLATES)
    assert cli.PREFILL_CHUNK == PREFILL_CHUNK


def test_a_text_config_without_tokenizer_config_gets_glm4_chat(tmp_path, text_dir, fixtures_dir):
    assert checkpoint_template(text_dir) == "glm4-chat"
    assert checkpoint_template(tmp_path) == "glm4v"  # no config.json at all: as before
    config = glm4v_core.GLM4VConfig.from_json(text_dir / "config.json")
    check_tokenizer_fits(tokenizer(fixtures_dir, "glm4-chat"), config)  # no boi / eoi ids to compare
    with pytest.raises(TokenizerError, match="pad_token_id"):  # the pad id still is compared
        check_tokenizer_fits(truncated_tokenizer(fixtures_dir / "tokenizer" / "tokenizer.model", 800), config)
