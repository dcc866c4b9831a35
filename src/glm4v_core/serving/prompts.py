"""OpenAI messages -> the model's prompt: roles, text parts, images (data: and file:// URLs), the
prompt's token ids and pixels (processing/chat.py's build_inputs, as `glm4v generate` uses), the
token budget. Runs in a worker thread of the server (image decoding is CPU work), never on the model.

A message's images go before its text, one placeholder block each, in the order of its parts (the
prompt format's rule: it has no interleaving inside a message); its text parts are joined with a
newline. Every refusal is a RequestError naming the field (`messages[1].content[0].image_url`).
"""
from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import torch
from PIL import Image, UnidentifiedImageError

from glm4v_core.errors import GLM4VError
from glm4v_core.generation.sampling import Sampling
from glm4v_core.model.splice import ImageBlock, spliced_length
from glm4v_core.processing.chat import build_inputs
from glm4v_core.processing.image import MAX_IMAGE_PIXELS, PILLOW_FILE_ERRORS
from glm4v_core.serving.protocol import ChatRequest, ImagePart, RequestError, TextPart

# OpenAI role names that are another name of one of the prompt format's roles
ROLE_ALIASES = {"developer": "system"}
# data:[<media type>][;name=value]*[;base64],<data> (RFC 2397); only base64 data is taken
DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(;[\w.+-]+=[\w.+-]+)*(?P<b64>;base64)?,(?P<data>.*)",
                      re.DOTALL)


@dataclass(frozen=True)
class Limits:
    """What the server allows a request, from its command line."""

    default_max_tokens: int = 1024      # for a request without max_tokens (and at most the room left)
    local_images: Path | None = None    # file:// URLs are read only under this folder (None: refused)


@dataclass
class Prompt:
    """A checked request, ready for the batcher."""

    input_ids: list[int]
    images: list[torch.Tensor]   # (3, S, S) each, in the order of their placeholder blocks
    slots: int                   # cache slots of the spliced prompt (text tokens + 2 + patches per image)
    max_tokens: int
    sampling: Sampling
    seed: int | None
    stop: tuple[str, ...]


def prompt_roles(tokenizer) -> tuple[str, ...]:
    """The roles the tokenizer's chat template takes (processing/chat_template.py): the server's too."""
    return tuple(tokenizer.template.roles)


def sampling_of(request: ChatRequest) -> Sampling:
    """OpenAI's temperature (default 1) and top_p (default 1): temperature 0 is greedy decoding, and so is
    top_p 0 (the nucleus of mass 0 is the most likely token alone)."""
    temperature = 1.0 if request.temperature is None else request.temperature
    top_p = 1.0 if request.top_p is None else request.top_p
    if temperature == 0 or top_p == 0:
        return Sampling()
    return Sampling(do_sample=True, temperature=temperature, top_p=top_p)


def build_prompt(request: ChatRequest, model, tokenizer, limits: Limits) -> Prompt:
    """Everything a request can be refused for, before it reaches the model."""
    config = model.config
    messages = conversation(request, tokenizer, config, limits)
    try:
        # a text-only model has no image size, and no images reach here (conversation refuses them)
        inputs = build_inputs(tokenizer, messages, config.vision.image_size if config.has_vision else 1)
    except GLM4VError as e:  # a message the format refuses, or an image mode with no RGB meaning
        raise RequestError(f"messages: {e}", param="messages") from None
    images = [] if inputs.pixel_values is None else list(inputs.pixel_values)
    slots = inputs.input_ids.shape[1] if not images else spliced_length(inputs.input_ids,
                                                                         ImageBlock.from_config(config))
    room = config.context_length - slots
    limit = request.token_limit()
    if room < 1 or (limit is not None and limit > room):
        asked = f"max_tokens {limit}" if limit is not None else "at least 1 new token"
        raise RequestError(f"the prompt takes {slots} of the model's {config.context_length} context slots "
                           f"({len(images)} image(s)); with {asked} it does not fit (at most {max(room, 0)} new "
                           "tokens)", param="max_tokens" if limit is not None and room >= 1 else "messages",
                           code="context_length_exceeded")
    max_tokens = limit if limit is not None else min(limits.default_max_tokens, room)
    try:
        model.check_inputs(inputs.input_ids, inputs.pixel_values, None, max_tokens)  # the model's own checks
    except GLM4VError as e:
        raise RequestError(f"messages: {e}", param="messages") from None
    return Prompt(inputs.input_ids[0].tolist(), images, slots, max_tokens, sampling_of(request), request.seed,
                  request.stop_strings())


def conversation(request: ChatRequest, tokenizer, config, limits: Limits) -> list[dict]:
    """The request's messages in the project's form: {"role", "content", "image": [PIL images]}."""
    roles = prompt_roles(tokenizer)
    count = sum(isinstance(p, ImagePart) for m in request.messages if isinstance(m.content, list) for p in m.content)
    if count and not config.has_vision:
        raise RequestError(f"the request holds {count} image(s), but this model is a text-only GLM-4",
                           param="messages")
    if count:  # refused before any image is decoded
        rows = ImageBlock.from_config(config).rows
        if count * rows > config.context_length:
            raise RequestError(f"the request holds {count} images; each takes {rows} context slots, so at most "
                               f"{config.context_length // rows} fit the model's context of "
                               f"{config.context_length}", param="messages", code="too_many_images")
    out = []
    for i, m in enumerate(request.messages):
        role = ROLE_ALIASES.get(m.role, m.role)
        if role not in roles:
            raise RequestError(f"messages[{i}].role {m.role!r} is not a role of this model's prompt format; "
                               f"it takes {', '.join(roles)}", param=f"messages[{i}].role")
        if m.content is None and role != "assistant":
            raise RequestError(f"messages[{i}].content is required for role {m.role!r}",
                               param=f"messages[{i}].content")
        parts = [m.content or ""] if not isinstance(m.content, list) else m.content
        text = "\n".join(p.text if isinstance(p, TextPart) else p for p in parts if not isinstance(p, ImagePart))
        images = [open_image(p.image_url.url, f"messages[{i}].content[{j}].image_url", limits)
                  for j, p in enumerate(parts) if isinstance(p, ImagePart)]
        out.append({"role": role, "content": text, **({"image": images} if images else {})})
    return out


def open_image(url: str, where: str, limits: Limits) -> Image.Image:
    """A data: URL (base64) or, under --allow-local-images, a file:// URL -> a decoded PIL image."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_image(data_url_bytes(url, where), where)
    if scheme == "file":
        return decode_image(local_file_bytes(url, where, limits.local_images), where)
    if scheme in ("http", "https"):
        raise RequestError(f"{where}: remote image URLs are not fetched by this server; send the image inline "
                           "as a data: URL (data:image/png;base64,...)", param=where, code="remote_images_refused")
    raise RequestError(f"{where}: expected a data: URL (data:image/png;base64,...) or a file:// URL, got "
                       f"{url[:40]!r}", param=where)


def data_url_bytes(url: str, where: str) -> bytes:
    match = DATA_URL.fullmatch(url)
    if match is None or not match["b64"]:
        raise RequestError(f"{where}: a data: URL must read data:<media type>;base64,<data>, got {url[:40]!r}",
                           param=where)
    try:
        return base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"{where}: the data: URL's base64 data is invalid ({e})", param=where) from None


def local_file_bytes(url: str, where: str, root: Path | None) -> bytes:
    if root is None:
        raise RequestError(f"{where}: file:// URLs are refused (the server reads local images only when "
                           "started with --allow-local-images DIR); send a data: URL", param=where)
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise RequestError(f"{where}: a file:// URL names a file of this machine (file:///path), got host "
                           f"{parts.netloc!r}", param=where)
    path = Path(url2pathname(unquote(parts.path)))
    try:
        inside = path.is_absolute() and path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        inside = False
    if not inside:
        raise RequestError(f"{where}: {path} is not under the folder --allow-local-images allows", param=where)
    try:
        return path.resolve().read_bytes()
    except OSError as e:
        raise RequestError(f"{where}: cannot read {path}: {e.strerror or e}", param=where) from None


def decode_image(data: bytes, where: str) -> Image.Image:
    """Bytes -> a fully decoded PIL image; Pillow's decompression-bomb guards are errors, not warnings."""
    if not data:
        raise RequestError(f"{where}: the image is empty (0 bytes)", param=where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # the header only
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:  # refused before any pixel is decoded
                raise RequestError(f"{where}: the image is {width}x{height} pixels, over the {MAX_IMAGE_PIXELS} "
                                   "this server decodes", param=where)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RequestError(f"{where}: the image is over Pillow's decompression-bomb limit: {e}", param=where) from None
    except UnidentifiedImageError:
        raise RequestError(f"{where}: not an image Pillow can read", param=where) from None
    except PILLOW_FILE_ERRORS as e:
        raise RequestError(f"{where}: cannot decode the image: {e}", param=where) from None
    return image
