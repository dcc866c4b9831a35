"""Bad requests: each gets an OpenAI error body (one line naming the field and what is accepted) with a
4xx status, and the server answers the next good request as before."""
from __future__ import annotations

import json
import socket
import struct
import zlib

import pytest
from serve_helpers import MODEL, data_url, image_part, png_bytes, serving

LIMIT = 1 << 20  # --max-body-bytes of this module's server


def chat(content="Hi", **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **fields}


def raw(body: dict) -> bytes:
    return json.dumps(body).encode()


def part_url(url: str) -> dict:
    return chat([image_part(url), {"type": "text", "text": "What?"}])


# (case, request body bytes, status, words the message must hold, param)
CASES = [
    ("malformed JSON", b'{"model": "tiny", "messages": [', 400, "not valid JSON", None),
    ("empty body", b"", 400, "not valid JSON", None),
    ("not an object", b"[1, 2]", 400, "must be a JSON object", None),
    ("no messages", raw({"model": MODEL}), 400, "messages is required", "messages"),
    ("no model", raw({"messages": [{"role": "user", "content": "Hi"}]}), 400, "model is required", "model"),
    ("empty messages", raw({"model": MODEL, "messages": []}), 400, "at least 1 item", "messages"),
    ("unknown field", raw(chat(temprature=0)), 400, "temprature is not a supported field", "temprature"),
    ("temperature as text", raw(chat(temperature="0")), 400, "temperature", "temperature"),
    ("temperature too high", raw(chat(temperature=2.5)), 400, "less than or equal to 2", "temperature"),
    ("max_tokens 0", raw(chat(max_tokens=0)), 400, "greater than or equal to 1", "max_tokens"),
    ("max_tokens float", raw(chat(max_tokens=2.5)), 400, "valid integer", "max_tokens"),
    ("n 2", raw(chat(n=2)), 400, "n must be 1", "n"),
    ("logprobs", raw(chat(logprobs=True)), 400, "logprobs are not supported", "logprobs"),
    ("presence penalty", raw(chat(presence_penalty=0.5)), 400, "presence_penalty is not supported", "presence_penalty"),
    ("seed negative", raw(chat(seed=-1)), 400, "seed", "seed"),
    ("five stops", raw(chat(stop=["a", "b", "c", "d", "e"])), 400, "at most 4", "stop"),
    ("empty stop", raw(chat(stop="")), 400, "non-empty", "stop"),
    ("unknown role", raw({"model": MODEL, "messages": [{"role": "wizard", "content": "Hi"}]}), 400,
     "'wizard' is not a role of this model's prompt format; it takes system, user, assistant", "messages[0].role"),
    ("content a number", raw(chat(5)), 400, "must be a string or a list of content parts", "messages[0].content"),
    ("unknown part type", raw(chat([{"type": "audio", "audio": "x"}])), 400, '"type": "text" or "image_url"',
     "messages[0].content[0]"),
    ("text part without text", raw(chat([{"type": "text"}])), 400, "messages[0].content[0].text is required",
     "messages[0].content[0].text"),
    ("user content null", raw(chat(None)), 400, "content is required for role 'user'", "messages[0].content"),
    ("bad base64", raw(part_url("data:image/png;base64,@@@not base64@@@")), 400, "base64 data is invalid",
     "messages[0].content[0].image_url"),
    ("data URL not base64", raw(part_url("data:image/png,rawbytes")), 400, "must read data:<media type>;base64",
     "messages[0].content[0].image_url"),
    ("not an image", raw(part_url(data_url(b"these bytes are no image"))), 400, "not an image Pillow can read",
     "messages[0].content[0].image_url"),
    ("truncated image", raw(part_url(data_url(png_bytes("red")[:60]))), 400, "cannot decode the image",
     "messages[0].content[0].image_url"),
    ("empty image", raw(part_url("data:image/png;base64,")), 400, "the image is empty", None),
    ("remote URL", raw(part_url("https://example.com/cat.png")), 400, "remote image URLs are not fetched", None),
    ("file URL not allowed", raw(part_url("file:///etc/hostname")), 400, "--allow-local-images DIR", None),
    ("other URL scheme", raw(part_url("ftp://host/cat.png")), 400, "expected a data: URL", None),
    ("too many images", raw(chat([image_part("data:,")] * 1400)), 400, "1400 images; each takes 6 context slots",
     "messages"),
    ("prompt + max_tokens past the context", raw(chat(max_tokens=9000)), 400, "with max_tokens 9000 it does not fit",
     "max_tokens"),
    ("disagreeing limits", raw(chat(max_tokens=3, max_completion_tokens=4)), 400, "disagree", None),
    ("unknown model", raw({**chat(), "model": "gpt-4o"}), 404, "model 'gpt-4o' is not served here; this server "
     "serves 'tiny'", "model"),
    ("oversized body", raw(chat("x" * (LIMIT + 10))), 413, f"over --max-body-bytes {LIMIT}", None),
]


@pytest.fixture(scope="module")
def server(demo):
    with serving(demo, max_body_bytes=LIMIT) as running:
        yield running


@pytest.mark.parametrize(("body", "status", "words", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_request_is_one_line_openai_error_and_the_server_stays_up(server, body, status, words, param):
    with server.client() as client:
        response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert words in error["message"], error["message"]
        assert "\n" not in error["message"] and "Traceback" not in error["message"]
        assert error["type"] and (param is None or error["param"] == param), error
        good = client.post("/v1/chat/completions", json=chat())
        assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_a_declared_oversized_body_is_refused_before_it_is_read(server):
    """Content-Length over the limit: the answer comes without the body ever being sent."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {LIMIT + 1}\r\n\r\n".encode())
        head = sock.recv(65536).decode()
    assert head.startswith("HTTP/1.1 413") and "max-body-bytes" in head


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/v1/chat/completions", 405),
                                                        ("POST", "/v1/completions", 404)])
def test_other_routes_answer_in_the_same_error_format(server, method, path, status):
    with server.client() as client:
        response = client.request(method, path)
    assert response.status_code == status and path in response.json()["error"]["message"]


def test_a_huge_image_is_refused_before_its_pixels_are_decoded(server):
    """A tiny PNG whose header claims 9000 x 9000 pixels (81M, over MAX_IMAGE_PIXELS = 64M)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 9000, 9000, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    with server.client() as client:
        response = client.post("/v1/chat/completions", json=part_url(data_url(png)))
    assert response.status_code == 400 and "9000x9000 pixels" in response.json()["error"]["message"]


@pytest.mark.parametrize("where", ["request checks", "model thread"])
def test_a_server_bug_is_a_500_in_the_same_format_and_the_server_stays_up(server, monkeypatch, where):
    def broken(*args, **kwargs):
        raise RuntimeError("deliberately broken")

    target = "glm4v_core.serving.app.build_prompt" if where == "request checks" else \
        "glm4v_core.serving.batcher.stream_tokens"
    monkeypatch.setattr(target, broken)
    with server.client() as client:
        response = client.post("/v1/chat/completions", json=chat())
        assert response.status_code == 500
        assert "RuntimeError: deliberately broken" in response.json()["error"]["message"]
        monkeypatch.undo()
        assert client.post("/v1/chat/completions", json=chat()).status_code == 200
