"""Helpers of the tests of `glm4v serve` (conftest.py has the fixtures). Servers: the app under
uvicorn in a thread of this process, on 127.0.0.1 and a port the OS picks, over the bundled demo
checkpoint (loaded once per session).

`GatedBatcher` holds the model thread until the test opens its gate: requests sent meanwhile wait
in the queue, so a test decides exactly which of them share a batch (or fill the queue).
"""
from __future__ import annotations

import base64
import io
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import uvicorn
from PIL import Image

import glm4v_core
from glm4v_core import BUNDLED_CHECKPOINT, resolve_tokenizer
from glm4v_core.generation.sampling import Sampling
from glm4v_core.generation.streaming import stream_text
from glm4v_core.processing.chat import build_inputs
from glm4v_core.serving.app import Service, create_app
from glm4v_core.serving.batcher import Batcher
from glm4v_core.serving.prompts import Limits

MODEL = "tiny"  # the demo checkpoint's folder name: the served model id


class Demo:
    def __init__(self):
        self.model = glm4v_core.load_model(BUNDLED_CHECKPOINT)
        self.tokenizer = resolve_tokenizer(None, BUNDLED_CHECKPOINT, self.model.config)

    def expected(self, messages: list[dict], max_tokens: int, stop=(), sampling=Sampling(), seed=None,
                 stats=None) -> str:
        """The answer of the Python API, as `glm4v generate` computes it (build_inputs + stream_text)."""
        import torch
        inputs = build_inputs(self.tokenizer, messages, self.model.config.vision.image_size)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        return "".join(stream_text(self.model, self.tokenizer, inputs.input_ids, inputs.pixel_values,
                                   max_new_tokens=max_tokens, sampling=sampling, stop_strings=list(stop),
                                   generator=generator, stats=stats))


class GatedBatcher(Batcher):
    """A Batcher whose model thread, once a job is queued, waits for `gate` before it takes a batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()

    def _next_batch(self):
        with self._lock:  # a job has come (or the end): now hold it at the gate, the queue filling behind it
            while not self._pending and not self._closing:
                self._lock.wait()
        self.gate.wait()
        return super()._next_batch()

    def wait_queued(self, n: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self._pending) < n:
            assert time.monotonic() < deadline, f"{len(self._pending)} requests queued, waited for {n}"
            time.sleep(0.01)


class Running:
    def __init__(self, url: str, service: Service):
        self.url, self.service = url, service

    @property
    def batcher(self):
        return self.service.batcher

    def client(self, **kwargs) -> httpx.Client:
        """A plain HTTP client that never uses a proxy from the environment."""
        return httpx.Client(base_url=self.url, trust_env=False, timeout=kwargs.pop("timeout", 60), **kwargs)

    def openai(self, **kwargs):
        import openai
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0,
                             http_client=httpx.Client(trust_env=False, timeout=kwargs.pop("timeout", 60)), **kwargs)


@contextmanager
def serving(demo: Demo, batcher_class=Batcher, max_batch: int = 8, max_queue: int = 64, timeout: float = 60.0,
            max_body_bytes: int = 1 << 20, limits: Limits | None = None):
    """The app on 127.0.0.1:<free port> under uvicorn in a thread, until the block ends."""
    batcher = batcher_class(demo.model, demo.tokenizer, max_batch, max_queue)
    service = Service(demo.model, demo.tokenizer, MODEL, batcher, limits or Limits(), max_body_bytes, timeout)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    try:
        yield Running(f"http://127.0.0.1:{sock.getsockname()[1]}", service)
    finally:
        if isinstance(batcher, GatedBatcher):
            batcher.gate.set()
        server.should_exit = True
        thread.join(30)
        sock.close()


def png_bytes(color, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}
