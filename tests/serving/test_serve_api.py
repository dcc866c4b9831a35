"""`glm4v serve` through the official `openai` client: models, whole and streamed answers equal to
`glm4v generate` (the CLI and the Python API), several images, stop strings, limits, seeds, the
log line, and file:// images under --allow-local-images."""
from __future__ import annotations

import io
import logging
import os
from contextlib import redirect_stdout

import openai
import pytest
from PIL import Image
from serve_helpers import MODEL, data_url, image_part, png_bytes, serving

from glm4v_core import cli
from glm4v_core.generation.loop import GenerationStats
from glm4v_core.generation.sampling import Sampling
from glm4v_core.serving.prompts import Limits

RED, GRAY, BLUE = png_bytes("red"), png_bytes("gray", (30, 50)), png_bytes("blue", (64, 64))


def pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


# (OpenAI messages, the same conversation as glm4v_core messages)
CONVERSATIONS = {
    "text": ([{"role": "user", "content": "Hello"}], [{"role": "user", "content": "Hello"}]),
    "system_and_parts": ([{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": [{"type": "text", "text": "What is"},
                                                       {"type": "text", "text": "this?"}]}],
                         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is\nthis?"}]),
    "two_images_one_message": ([{"role": "user", "content": [{"type": "text", "text": "Which is brighter?"},
                                                             image_part(data_url(RED)), image_part(data_url(GRAY))]}],
                               [{"role": "user", "content": "Which is brighter?", "image": [pil(RED), pil(GRAY)]}]),
    "images_across_turns": ([{"role": "user", "content": [image_part(data_url(RED)), {"type": "text", "text": "A?"}]},
                             {"role": "assistant", "content": "The first."},
                             {"role": "user", "content": [image_part(data_url(BLUE, "image/jpeg")),
                                                          {"type": "text", "text": "And this?"}]}],
                            [{"role": "user", "content": "A?", "image": pil(RED)},
                             {"role": "assistant", "content": "The first."},
                             {"role": "user", "content": "And this?", "image": pil(BLUE)}]),
}


@pytest.fixture(scope="module")
def server(demo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("allowed")
    with serving(demo, limits=Limits(local_images=folder)) as running:
        running.allowed = folder
        yield running


def test_models_lists_the_one_served_model(server):
    client = server.openai()
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "glm4v-core"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    assert server.client().get("/health").json() == {"status": "ok"}


@pytest.mark.parametrize("case", sorted(CONVERSATIONS))
def test_greedy_answers_equal_the_python_api_whole_and_streamed(server, demo, case):
    messages, ours = CONVERSATIONS[case]
    want = demo.expected(ours, max_tokens=12)
    client = server.openai()
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert answer.choices[0].message.content == want
    assert answer.choices[0].message.role == "assistant"
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    usage = answer.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and usage.completion_tokens <= 12
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == answer.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == usage
    assert len({c.id for c in chunks}) == 1


def test_greedy_answer_equals_the_glm4v_generate_command(server, tmp_path):
    """The command line itself (in this process): `glm4v generate --image ... --max-new-tokens 10`."""
    (tmp_path / "a.png").write_bytes(RED)
    (tmp_path / "b.png").write_bytes(GRAY)
    out = io.StringIO()
    with redirect_stdout(out):
        status = cli.main(["generate", "--max-new-tokens", "10", "--image", str(tmp_path / "a.png"),
                           "--image", str(tmp_path / "b.png"), "Describe both."])
    assert status == 0
    parts = [image_part(data_url(RED)), image_part(data_url(GRAY)), {"type": "text", "text": "Describe both."}]
    answer = server.openai().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}],
                                                     max_completion_tokens=10, temperature=0)
    assert answer.choices[0].message.content + "\n" == out.getvalue()


def test_raw_stream_is_server_sent_events_ending_in_done(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0,
            "stream": True}
    with server.client().stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]" and '"chat.completion.chunk"' in events[0]


def test_max_tokens_ends_with_length_and_stop_strings_with_stop(server, demo):
    client = server.openai()
    messages = [{"role": "user", "content": "Tell me more"}]
    whole = demo.expected(messages, max_tokens=20)
    cut = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 5
    assert whole.startswith(cut.choices[0].message.content)
    stop = whole[6:9]
    assert stop and whole.find(stop) > 0
    stopped = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                             stop=[stop, "never appears"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == whole[:whole.find(stop)] == demo.expected(messages, 20, [stop])


def test_a_stop_id_ends_the_answer_with_stop_and_is_counted_not_shown(server, demo):
    messages = [{"role": "user", "content": "Hello"}]
    stats = GenerationStats()
    want = demo.expected(messages, 60, stats=stats)
    assert stats.new_tokens < 60  # alone, a stop id ends it
    answer = server.openai().chat.completions.create(model=MODEL, messages=messages, max_tokens=60, temperature=0)
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.content == want
    assert answer.usage.completion_tokens == stats.new_tokens


def test_a_seeded_sampled_answer_is_reproducible_and_equals_generate_with_that_seed(server, demo):
    client = server.openai()
    messages = [{"role": "user", "content": "Pick a word"}]
    kwargs = dict(model=MODEL, messages=messages, max_tokens=12, temperature=0.8, top_p=0.9, seed=3)
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    assert client.chat.completions.create(**kwargs).choices[0].message.content == first
    assert first == demo.expected(messages, 12, sampling=Sampling(True, 0.8, top_p=0.9), seed=3)
    assert first != demo.expected(messages, 12)  # it did sample


def test_one_log_line_per_request(server, caplog):
    with caplog.at_level(logging.INFO, logger="glm4v.serve"):
        answer = server.openai().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                         max_tokens=4, temperature=0)
    lines = [r.getMessage() for r in caplog.records if answer.id in r.getMessage()]
    assert len(lines) == 1, lines
    assert f"{answer.id} 200 prompt {answer.usage.prompt_tokens} completion 4 tokens" in lines[0]


def test_file_urls_are_read_only_under_the_allowed_folder(server, demo, tmp_path):
    inside = server.allowed / "photo one.png"
    inside.write_bytes(RED)
    outside = tmp_path / "secret.png"
    outside.write_bytes(RED)
    escape = server.allowed / "link.png"
    if not escape.is_symlink():
        os.symlink(outside, escape)
    client = server.openai()

    def ask(url):
        content = [image_part(url), {"type": "text", "text": "What?"}]
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                              max_tokens=6, temperature=0)

    assert ask(inside.as_uri()).choices[0].message.content == demo.expected(
        [{"role": "user", "content": "What?", "image": pil(RED)}], 6)
    for url in (outside.as_uri(), escape.as_uri()):
        with pytest.raises(openai.BadRequestError, match="not under the folder --allow-local-images allows"):
            ask(url)
