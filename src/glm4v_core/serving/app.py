"""The HTTP face of `glm4v serve`: a FastAPI app with the OpenAI routes.

    GET  /v1/models, /v1/models/{id}   the one model served
    POST /v1/chat/completions          an answer, whole or streamed as server-sent events
    GET  /health                       200 once the model is loaded (for scripts that wait for it)

A request is read (at most max_body_bytes), checked (protocol.py, then prompts.py in a worker
thread: images are decoded there), and queued for the model thread (batcher.py). Its answer
comes back as events through an asyncio queue; the handler waits for them at most until the
request's deadline (--timeout), and a client that disconnects cancels its job. Every refusal is an
OpenAI error body with a 4xx status; one log line per request names its id, status, tokens and
latency.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from glm4v_core.errors import GLM4VError
from glm4v_core.serving import protocol
from glm4v_core.serving.batcher import (
    Batcher,
    Delta,
    Event,
    Failed,
    Finished,
    Job,
    QueueFullError,
    ServerClosingError,
)
from glm4v_core.serving.prompts import Limits, build_prompt
from glm4v_core.serving.protocol import RequestError

log = logging.getLogger("glm4v.serve")


@dataclass
class Service:
    """What the routes share: the model, its tokenizer and name, the batcher and the limits."""

    model: object
    tokenizer: object
    name: str
    batcher: Batcher
    limits: Limits = Limits()
    max_body_bytes: int = 64 * 2**20
    timeout: float = 600.0  # seconds from arrival to the last token


class ClientGone(GLM4VError):
    """The client closed the connection; its job is cancelled."""


def create_app(service: Service) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.batcher.start()
        yield
        # uvicorn has already drained the requests (or cancelled them past --timeout): the batch left
        # ends within a step or two, as its rows are cancelled
        await asyncio.to_thread(service.batcher.close, min(service.timeout, 30.0))

    app = FastAPI(title="glm4v serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    created = int(time.time())

    @app.exception_handler(RequestError)
    async def refused(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)  # unknown routes and methods answer in the same format
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        error = RequestError(f"{request.method} {request.url.path}: {e.detail}", e.status_code)
        return JSONResponse(error.body(), status_code=e.status_code)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [protocol.model_card(service.name, created)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        if name != service.name:
            raise unknown_model(name, service.name)
        return protocol.model_card(service.name, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await Completion(service, request).respond()

    return app


def unknown_model(name: str, served: str) -> RequestError:
    return RequestError(f"model {name!r} is not served here; this server serves {served!r}", 404, param="model",
                        code="model_not_found")


class Completion:
    """One chat-completion request, from its body to its last byte and its log line."""

    def __init__(self, service: Service, request: Request):
        self.service, self.request = service, request
        self.id = protocol.new_id()
        self.start = time.perf_counter()
        self.deadline = asyncio.get_running_loop().time() + service.timeout
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.job: Job | None = None
        self.prompt_tokens = self.completion_tokens = self.batch = 0

    async def respond(self) -> Response:
        try:
            chat = await self.accept()
            # until a response starts, this task watches for a client that leaves (then Starlette's
            # StreamingResponse does, and cancels the stream)
            watcher = asyncio.create_task(self.watch_disconnect())
            try:
                first = await self.next_event()  # before the status is sent: a failure is a proper 4xx / 5xx
                if not chat.stream:
                    return await self.whole(first)
            finally:
                watcher.cancel()
            include_usage = chat.stream_options is not None and chat.stream_options.include_usage
            return StreamingResponse(self.stream(first, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        except RequestError as e:
            self.cancel()
            self.log(e.status)
            raise
        except Exception as e:  # a bug: logged with its traceback, answered in the API's format
            self.cancel()
            log.exception("%s failed", self.id)
            self.log(500)
            return JSONResponse(as_request_error(e).body(), status_code=500)

    async def accept(self) -> protocol.ChatRequest:
        """Read, check and queue the request."""
        chat = protocol.parse_request(await self.read_body())
        if chat.model != self.service.name:
            raise unknown_model(chat.model, self.service.name)
        s = self.service
        try:
            prompt = await run_in_threadpool(build_prompt, chat, s.model, s.tokenizer, s.limits)
        except GLM4VError as e:  # a check below the request's own (a sampling setting, a message)
            raise as_request_error(e) from None
        self.prompt_tokens = prompt.slots
        loop = asyncio.get_running_loop()
        self.job = Job(prompt, deliver=lambda event: deliver(loop, self.events, event))
        try:
            s.batcher.submit(self.job)
        except QueueFullError as e:
            raise RequestError(str(e), 429, type="rate_limit_error", code="queue_full") from None
        except ServerClosingError as e:
            raise RequestError(str(e), 503, type="server_error", code="shutting_down") from None
        return chat

    async def read_body(self) -> bytes:
        limit = self.service.max_body_bytes
        declared = self.request.headers.get("content-length", "")
        too_big = RequestError(f"the request body is over --max-body-bytes {limit}", 413, code="body_too_large")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        body = bytearray()
        async for piece in self.request.stream():
            body += piece
            if len(body) > limit:
                raise too_big
        return bytes(body)

    async def next_event(self) -> Event:
        """The job's next event; past the deadline, a 504 (and the job is cancelled)."""
        remaining = self.deadline - asyncio.get_running_loop().time()
        try:
            event = await asyncio.wait_for(self.events.get(), max(remaining, 0.0))
        except TimeoutError:
            self.cancel()
            raise RequestError(f"the request ran past --timeout {self.service.timeout:g} s", 504, type="timeout",
                               code="timeout") from None
        if isinstance(event, Failed):
            raise as_request_error(event.error)
        return event

    async def watch_disconnect(self) -> None:
        """A client that leaves cancels its job (and wakes the handler, which would wait for events in vain)."""
        while (await self.request.receive())["type"] != "http.disconnect":
            pass
        self.cancel()
        self.events.put_nowait(Failed(ClientGone("the client disconnected")))

    async def whole(self, event: Event) -> JSONResponse:
        pieces = []
        while isinstance(event, Delta):
            pieces.append(event.text)
            event = await self.next_event()
        self.finished(event)
        self.log(200)
        return JSONResponse(protocol.completion(self.id, self.service.name, "".join(pieces), event.reason,
                                                self.prompt_tokens, self.completion_tokens))

    async def stream(self, event: Event, include_usage: bool):
        """Server-sent events: a role chunk, one chunk per text delta, a finish chunk, [DONE]. The status is
        200 once the first chunk is out: a later failure is an `error` event (the OpenAI client raises it)."""
        status, name = 200, self.service.name
        try:
            yield sse(protocol.chunk(self.id, name, {"role": "assistant", "content": ""}))
            try:
                while isinstance(event, Delta):
                    yield sse(protocol.chunk(self.id, name, {"content": event.text}))
                    event = await self.next_event()
                self.finished(event)
                yield sse(protocol.chunk(self.id, name, {}, event.reason))
                if include_usage:
                    usage = protocol.usage(self.prompt_tokens, self.completion_tokens)
                    yield sse(protocol.chunk(self.id, name, None, usage_record=usage))
            except RequestError as e:
                status = e.status
                yield sse(e.body())
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects (Starlette cancels this generator)
            self.cancel()
            self.log(status)

    def finished(self, event: Finished) -> None:
        self.completion_tokens, self.batch = event.tokens, event.batch

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()

    def log(self, status: int) -> None:
        log.info("%s %d prompt %d completion %d tokens %.3f s batch %d", self.id, status, self.prompt_tokens,
                 self.completion_tokens, time.perf_counter() - self.start, self.batch)


def deliver(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, event: Event) -> None:
    """From the model thread to a request's queue on the event loop (gone at shutdown: dropped)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(events.put_nowait, event)


def as_request_error(error: Exception) -> RequestError:
    if isinstance(error, RequestError):
        return error
    if isinstance(error, ClientGone):  # nobody reads this answer; 499 is for the log line
        return RequestError(str(error), 499, code="client_gone")
    if isinstance(error, ServerClosingError):
        return RequestError(str(error), 503, type="server_error", code="shutting_down")
    if isinstance(error, GLM4VError):  # the request's inputs, found out by the model's own checks
        return RequestError(str(error), 400)
    return RequestError(f"the server failed on this request: {type(error).__name__}: {error}", 500,
                        type="server_error")


def sse(record: dict) -> str:
    return f"data: {json.dumps(record, ensure_ascii=False)}\n\n"
