"""The OpenAI chat-completions wire format: the request schema (pydantic), the error body, and the
response and chunk objects. Nothing here knows the model.

The schema is strict on purpose: an unknown field, or a known one we cannot honour (n > 1, a
non-zero presence penalty, logprobs), is a 400, never silently ignored. Field names, ranges and
defaults follow the OpenAI API; docs/serving.md lists them.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from glm4v_core.errors import GLM4VError

MAX_STOP_STRINGS = 4  # the OpenAI API's limit
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits


class RequestError(GLM4VError):
    """A request the server refuses; `status`, `type`, `param` and `code` make the OpenAI error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.type, self.code = status, param, type, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


class Strict(BaseModel):
    # strict: "1" is not 1 and 1.0 is not an int; forbid: a typo'd field is named, not dropped
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImageURL(Strict):
    url: str
    detail: Literal["auto", "low", "high"] = "auto"  # accepted for compatibility: every image is resized alike


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


def _part_type(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return {"text": "text part", "image_url": "image part"}.get(kind)


Part = Annotated[Annotated[TextPart, Tag("text part")] | Annotated[ImagePart, Tag("image part")],
                 Discriminator(_part_type, custom_error_type="part_type",
                               custom_error_message="a content part needs \"type\": \"text\" or \"image_url\"")]


class Message(Strict):
    role: str  # checked against the prompt format's roles (prompts.py), not a fixed list here
    content: str | list[Part] | None = None  # None: an assistant turn without text


class StreamOptions(Strict):
    include_usage: bool = False


class ChatRequest(Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    temperature: float | None = Field(None, ge=0, le=2)   # None: 1, as OpenAI; 0: greedy
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # accepted at their neutral values only: anything else would change the answer in a way we cannot
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    user: str | None = None  # an end-user id for the caller's logs; it never changes the answer

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def stop_strings(self) -> tuple[str, ...]:
        stops = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise RequestError(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings, got {list(stops)!r:.80}",
                               param="stop")
        return stops


def parse_request(body: bytes) -> ChatRequest:
    """The request body -> a checked ChatRequest, or a RequestError naming the first bad field."""
    try:
        request = ChatRequest.model_validate_json(body)
    except ValidationError as e:
        raise RequestError(describe(e), param=_param(e)) from None
    if request.n not in (None, 1):
        raise RequestError(f"n must be 1 (this server returns one choice per request), got {request.n}", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name) not in (None, 0):
            raise RequestError(f"{name} is not supported (only 0), got {getattr(request, name)}", param=name)
    if request.logprobs:
        raise RequestError("logprobs are not supported (only false)", param="logprobs")
    if request.max_tokens is not None and request.max_completion_tokens is not None \
            and request.max_tokens != request.max_completion_tokens:
        raise RequestError(f"max_tokens {request.max_tokens} and max_completion_tokens "
                           f"{request.max_completion_tokens} disagree; give one", param="max_completion_tokens")
    request.stop_strings()
    return request


# pydantic names union branches inside the location ('str', 'list[...]', our part tags): not fields
_BRANCHES = ("str", "text part", "image part")


def _location(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in _BRANCHES and "[" not in part:
            out += f".{part}" if out else part
    return out


def _param(e: ValidationError) -> str | None:
    return _location(_deepest(e)["loc"]) or None


def _deepest(e: ValidationError) -> dict:
    """The most specific of the errors (a union reports one per branch; the deepest says most)."""
    return max(e.errors(include_url=False), key=lambda err: len(err["loc"]))


def describe(e: ValidationError) -> str:
    """One line for a pydantic error: where, what, and the value found."""
    err = _deepest(e)
    if err["type"] == "json_invalid":
        return f"the request body is not valid JSON: {err['msg'].removeprefix('Invalid JSON: ')}"
    where = _location(err["loc"])
    if not where:
        return f"the request body must be a JSON object, got {type(err['input']).__name__}"
    if err["type"] == "missing":
        return f"{where} is required"
    if err["type"] == "extra_forbidden":
        return f"{where} is not a supported field of a chat completion request"
    same = [x for x in e.errors(include_url=False) if _location(x["loc"]) == where]
    if len(same) > 1 and where.endswith("content"):
        return f"{where} must be a string or a list of content parts, got {_shown(err['input'])}"
    return f"{where}: {err['msg'][0].lower()}{err['msg'][1:]}, got {_shown(err['input'])}"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- responses -------------------------------------------------------------------------------------

def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(id: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int) -> dict:
    """The `chat.completion` object of a non-streamed answer."""
    return {"id": id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(id: str, model: str, delta: dict | None, finish_reason: str | None = None,
          usage_record: dict | None = None) -> dict:
    """One `chat.completion.chunk`; delta None is the usage-only chunk (no choices) that ends a stream."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish_reason}]
    record = {"id": id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
              "choices": choices}
    if usage_record is not None or delta is None:
        record["usage"] = usage_record
    return record


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "glm4v-core"}
