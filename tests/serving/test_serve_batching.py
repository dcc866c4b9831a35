"""The model thread: requests queued while it is busy are batched; a row's greedy answer is the one it
gets alone; which requests may share a batch; the bounded queue (429); the per-request timeout (504);
a client that leaves cancels its job."""
from __future__ import annotations

import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from PIL import Image
from serve_helpers import MODEL, GatedBatcher, data_url, image_part, png_bytes, serving

from glm4v_core.generation.loop import GenerationStats


def ask(server, content, max_tokens=10, client_timeout=60, **kwargs):
    client = server.openai(timeout=client_timeout)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          max_tokens=max_tokens, **kwargs)


def run_together(server, requests: list[dict]) -> list:
    """Send every request while the model thread is held, then let it go: they queue, then batch."""
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(ask, server, **r) for r in requests]
        server.batcher.wait_queued(len(requests))
        server.batcher.gate.set()
        return [f.result(timeout=60) for f in futures]


def test_a_request_gets_the_same_greedy_answer_alone_and_among_others(demo):
    red = png_bytes("red")
    target = {"content": "Describe the weather today", "max_tokens": 12, "temperature": 0}
    others = [{"content": "Hi", "max_tokens": 16, "temperature": 0},                     # shorter: left padding
              {"content": [image_part(data_url(red)), {"type": "text", "text": "What is it?"}], "max_tokens": 6,
               "temperature": 0},                                                       # an image, fewer tokens
              {"content": "A much longer question, with many more words in it than the others", "max_tokens": 9,
               "temperature": 0},
              target]                                                                   # itself, twice
    with serving(demo, batcher_class=GatedBatcher) as server:
        server.batcher.gate.set()
        alone = ask(server, **target)
        server.batcher.gate.clear()  # the next jobs wait at the gate
        server.batcher.batch_sizes.clear()
        together = run_together(server, [target, *others])
        assert server.batcher.batch_sizes == [5]  # one batch of all five
    want = demo.expected([{"role": "user", "content": target["content"]}], 12)
    assert alone.choices[0].message.content == want
    for answer in (together[0], together[-1]):
        assert answer.choices[0].message.content == want
        assert answer.usage == alone.usage and answer.choices[0].finish_reason == alone.choices[0].finish_reason
    image_answer = demo.expected([{"role": "user", "content": "What is it?", "image": Image.open(io.BytesIO(red))}],
                                 6)
    assert together[2].choices[0].message.content == image_answer
    assert together[2].usage.completion_tokens <= 6  # its own max_tokens, not the batch's
    for request, answer in zip(others[:3:2], (together[1], together[3]), strict=True):
        assert answer.choices[0].message.content == demo.expected(
            [{"role": "user", "content": request["content"]}], request["max_tokens"])


def test_which_requests_share_a_batch(demo):
    """Greedy with greedy, unseeded sampling with the same settings; a seeded sampled request runs alone."""
    greedy = {"content": "Hi", "max_tokens": 3, "temperature": 0}
    sampled = {"content": "Hi", "max_tokens": 3, "temperature": 0.7}
    seeded = {**sampled, "seed": 1}
    with serving(demo, batcher_class=GatedBatcher) as server:
        run_together(server, [greedy, seeded, sampled, greedy, seeded, sampled, {**sampled, "temperature": 0.5}])
        sizes = server.batcher.batch_sizes
    assert sorted(sizes) == [1, 1, 1, 2, 2], sizes


def test_a_full_queue_answers_429_and_the_queued_requests_still_run(demo):
    request = {"content": "Hi", "max_tokens": 3, "temperature": 0}
    with ThreadPoolExecutor(2) as pool, serving(demo, batcher_class=GatedBatcher, max_queue=2) as server:
        queued = [pool.submit(ask, server, **request) for _ in range(2)]
        server.batcher.wait_queued(2)
        with pytest.raises(openai.RateLimitError, match="--max-queue 2"):
            ask(server, **request, client_timeout=10)
        server.batcher.gate.set()
        assert [f.result(timeout=60).choices[0].finish_reason for f in queued] == ["length", "length"]
        assert ask(server, **request).choices[0].finish_reason == "length"  # and it serves on


def test_a_request_past_its_timeout_is_answered_504(demo):
    with serving(demo, batcher_class=GatedBatcher, timeout=0.5) as server:
        start = time.monotonic()
        response = server.client(timeout=10).post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
        assert response.status_code == 504 and "--timeout 0.5 s" in response.json()["error"]["message"]
        assert time.monotonic() - start < 10
        assert server.batcher._pending[0].cancelled.is_set()  # never run once the gate opens


def test_a_client_that_disconnects_cancels_its_request(demo):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    with serving(demo, batcher_class=GatedBatcher) as server:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            server.client(timeout=0.5).post("/v1/chat/completions", json=body)
        job = server.batcher._pending[0]
        deadline = time.monotonic() + 10
        while not job.cancelled.is_set():
            assert time.monotonic() < deadline, "the disconnect did not cancel the job"
            time.sleep(0.01)
        server.batcher.gate.set()
        assert server.client().post("/v1/chat/completions", json=body).status_code == 200
        assert server.batcher.batch_sizes == [1]  # the cancelled job never ran


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_client_that_disconnects_mid_answer_stops_its_row(demo, stream):
    """The row of a client that left is not generated on: its batch ends far before max_tokens."""
    messages = [{"role": "user", "content": "a"}]
    stats = GenerationStats()
    demo.expected(messages, 500, stats=stats)
    assert stats.new_tokens == 500  # alone, its greedy answer runs to max_tokens: no stop id ends it early
    body = {"model": MODEL, "messages": messages, "max_tokens": 500, "temperature": 0, "stream": stream}
    with serving(demo) as server:
        ended, rows = threading.Event(), []
        real = server.batcher._run

        def watched(batch):
            rows.extend(batch)
            try:
                return real(batch)
            finally:
                ended.set()

        server.batcher._run = watched
        if stream:
            with server.client().stream("POST", "/v1/chat/completions", json=body) as response:
                next(response.iter_lines())  # the first chunk: the row is running; then the client leaves
        else:  # a raw connection, closed once the row has made a few tokens
            payload = json.dumps(body).encode()
            port = int(server.url.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                             b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
                deadline = time.monotonic() + 30
                while not (rows and rows[0].tokens >= 5):
                    assert time.monotonic() < deadline, "the row never started"
                    time.sleep(0.001)
        assert ended.wait(30)
    assert rows[0].job.cancelled.is_set() and 0 < rows[0].tokens < 300, rows[0].tokens
