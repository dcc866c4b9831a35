"""Chat messages and the two GLM chat templates, rendered as pieces: template special tokens and text.

Two templates, chosen per tokenizer (docs/chat_templates.md):
- "glm4v": the glm-4v-9b tokenizer's Python `apply_chat_template` (images, no tools). Its text pieces are
  encoded one by one (metadata + "\\n", then the content), as that code does.
- "glm4-chat": the jinja `chat_template` of glm-4-9b-chat's tokenizer_config.json (text only, tools),
  written out as Python. transformers renders it with trim_blocks, so "{% if ... %}\\n\\n## " gives
  "\\n## "; the reference then tokenizes the whole string, so the text between two special tokens is
  one piece here. Every claim is pinned by tests/fixtures/tokenizer/chat_text_cases.json.
The tokenizer turns a `Special` piece into its id and encodes the text pieces (tokenizer.py).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from glm4v_conversion.files import read_json_object
from glm4v_core.errors import GLM4VError


class TokenizerError(GLM4VError):
    """A bad vocabulary file, message, template choice or token id; the text says which and where.

    Defined here, below tokenizer.py, so that both modules raise it without importing each other."""


ROLES = ("system", "user", "assistant", "observation")
PREFIX_TOKENS = ("[gMASK]", "<sop>")
# <|endoftext|> doubles as the image slot; the model swaps these 3 embeddings for the image's 1602.
# One block per image; the reference allows one image per conversation, we allow any number.
IMAGE_PLACEHOLDER = ("<|begin_of_image|>", "<|endoftext|>", "<|end_of_image|>")
MESSAGE_KEYS = ("role", "content", "metadata", "image", "tools")
TOOL_TYPES = ("function", "python", "simple_browser", "cogview")


class Message(NamedTuple):
    """One checked chat message; `images` holds what the caller passed (paths or PIL images), in order."""

    role: str
    content: str
    metadata: str
    images: tuple[Any, ...]
    tools: tuple[Mapping, ...] | None = None  # None: no 'tools' key; (): an empty list (still rendered)


# ---------------------------------------------------------------------------------------------
# Messages

def check_message(message: Any, index: int) -> Message:
    """Validate one chat message dict; `index` only serves the error text."""
    where = f"message {index}"
    if not isinstance(message, Mapping):
        raise TokenizerError(f"{where} must be a dict with 'role' and 'content', got {type(message).__name__}")
    unknown = sorted(set(message) - set(MESSAGE_KEYS))
    if unknown:  # a typo such as 'images' would otherwise silently drop the image
        raise TokenizerError(f"{where} has unsupported keys {unknown}; allowed: {list(MESSAGE_KEYS)}")
    role = message.get("role")
    if role not in ROLES:
        raise TokenizerError(f"{where} has unknown role {role!r}; expected one of {list(ROLES)}")
    content = _optional_str(message, "content", where)
    metadata = _optional_str(message, "metadata", where)
    tools = _tools(message.get("tools"), role, where)
    return Message(role, content, metadata, _images(message.get("image"), where), tools)


def _no_image(value: Any) -> bool:
    """The reference's `if image:` on the values it can meet; a PIL image or a tensor is never falsy here."""
    return value is None or value is False or (isinstance(value, (str, bytes, list, tuple)) and len(value) == 0)


def _images(value: Any, where: str) -> tuple[Any, ...]:
    """'image': one image or a list of them (placed before the text, in order); '', None, False = none."""
    if _no_image(value):
        return ()
    if not isinstance(value, (list, tuple)):
        return (value,)
    empty = [i for i, v in enumerate(value) if _no_image(v)]
    if empty:
        raise TokenizerError(f"{where}: 'image' list entry {empty[0]} is empty ({value[empty[0]]!r}); "
                             "give a path or a PIL image, or leave it out of the list")
    return tuple(value)


def _optional_str(message: Mapping, key: str, where: str) -> str:
    value = message.get(key)
    if value is None:  # the reference treats a missing or None field as ""
        return ""
    if not isinstance(value, str):
        hint = " (put an image under the 'image' key)" if key == "content" else ""
        raise TokenizerError(f"{where}: {key!r} must be a str, got {type(value).__name__}{hint}")
    return value


def _tools(value: Any, role: str, where: str) -> tuple[Mapping, ...] | None:
    """'tools': a list of {"type": one of TOOL_TYPES, ...}; a function also {"function": {"name": str, ...}}.

    Anything the template would drop or print wrongly (an unknown type, a nameless function, a value
    JSON cannot hold) is refused here rather than rendered."""
    if value is None:
        return None
    if role != "system":
        raise TokenizerError(f"{where}: 'tools' go on a system message, not on a {role!r} one")
    if not isinstance(value, (list, tuple)):
        raise TokenizerError(f"{where}: 'tools' must be a list of tool dicts, got {type(value).__name__}")
    for i, tool in enumerate(value):
        at = f"{where}: tool {i}"
        kind = tool.get("type") if isinstance(tool, Mapping) else None
        if kind not in TOOL_TYPES:
            raise TokenizerError(f"{at} must be a dict whose 'type' is one of {list(TOOL_TYPES)}, got {tool!r:.80}")
        if kind == "function":
            function = tool.get("function")
            if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
                raise TokenizerError(f"{at}: a function tool needs 'function': {{'name': str, ...}}")
            try:
                tool_json(function)
            except (TypeError, ValueError) as e:
                raise TokenizerError(f"{at}: 'function' cannot be written as JSON ({e})") from None
    return tuple(value)


def check_conversation(messages: Sequence[Mapping]) -> list[Message]:
    """Validate a whole conversation (any number of images, in any messages)."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TokenizerError(f"a conversation is a list of message dicts, got {type(messages).__name__}")
    return [check_message(m, i) for i, m in enumerate(messages)]


def conversation_images(messages: Sequence[Mapping]) -> list[Any]:
    """The conversation's images (paths or PIL images) in the order of their placeholder blocks."""
    return [image for m in check_conversation(messages) for image in m.images]


# ---------------------------------------------------------------------------------------------
# Templates

class Special(str):
    """A special token the template itself writes: always its id, whatever the message text holds."""


def render_glm4v(messages: Sequence[Message], add_generation_prompt: bool, add_special_tokens: bool) -> list[str]:
    """[gMASK]<sop> then, per message: <|role|> (metadata + "\\n") [one image block per image] (content)."""
    pieces = [Special(t) for t in PREFIX_TOKENS] if add_special_tokens else []
    for i, m in enumerate(messages):
        if m.tools is not None:
            raise TokenizerError(f"message {i}: 'tools' are rendered by the glm4-chat template only "
                                 "(the glm4v template has no tools block)")
        if not m.content and not m.images:
            continue  # the reference drops such a message entirely, role token included
        pieces += [Special(f"<|{m.role}|>"), m.metadata + "\n"]
        pieces += [Special(t) for t in IMAGE_PLACEHOLDER] * len(m.images)  # in the images' order, before the text
        pieces.append(m.content)
    if add_generation_prompt:
        pieces.append(Special("<|assistant|>"))  # no end-of-turn token exists in GLM-4's format
    return pieces


# ---------------------------------------------------------------------------------------------
# The glm4-chat template's fixed text: data the template writes, reproduced exactly (Chinese).

# <|system|> then this, then each tool's paragraph
TOOLS_PREAMBLE = (
    "\n"
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n"
    "\n"
    "# 可用工具"
)
# closes a function tool, after its JSON
FUNCTION_NOTE = (
    "\n"
    "在调用上述函数时，请使用 Json 格式表示调用的参数。"
)
# the built-in tools' paragraphs, after "\n## NAME\n\n"
PYTHON = (
    "当你向 `python` 发送包含 Python 代码的消息时，该代码将会在一个有状态的 Jupyter notebook 环境中执行。\n"
    "`python` 返回代码执行的输出，或在执行 60 秒后返回超时。\n"
    "`/mnt/data` 将会持久化存储你的文件。在此会话中，`python` 无法访问互联网。"
    "不要使用 `python` 进行任何网络请求或者在线 API 调用，"
    "这些在线内容的访问将不会成功。"
)
SIMPLE_BROWSER = (
    "你可以使用 `simple_browser` 工具。该工具支持以下函数：\n"
    "`search(query: str, recency_days: int)`：使用搜索引擎进行查询并显示结果，"
    "可以使用 `recency_days` 参数控制搜索内容的时效性。\n"
    "`mclick(ids: list[int])`：获取一系列指定 id 的页面内容。"
    "每次调用时，须选择3-10个页面。选择多个角度的页面，同时尽可能选择可信任的信息来源。"
    "考虑到部分页面是无法加载的，你也可以多打开一些可能有用的页面而不用担心内容过多。\n"
    "`open_url(url: str)`：打开指定的 URL。\n"
    "\n"
    "使用 `【{引用 id}†{引用文本}】` 来引用内容。\n"
    "\n"
    "操作步骤：1. 使用 `search` 来获得信息列表; 2. 使用 `mclick` 来获取指定 ID 页面的内容; 3. 根据获得的内容进行回复。"
    "在回复中应当引用信息来源。\n"
    " 如果用户提供了 URL，也可以用 `open_url` 直接打开页面。\n"
    "如果初次搜索结果没有找到合适的信息，也可以再次使用 `search` 进行搜索。"
)
COGVIEW = (
    "如果用户的请求中包含了对图像的描述，你可以使用 `cogview` 来生成图像并展示给用户。"
    "你需要向 `cogview` 发送图像描述，规则：\n"
    "- 发送给 `cogview` 的消息必须使用英语。用户的中文描述必须完全翻译为英语。\n"
    "- 应当尽可能详细地描述图像生成的需求，需求描述约 100 英文单词。\n"
    "- 保持用户原始描述的意图。不要虚构内容或者没见过的人物。\n"
    "- 如无特殊说明，所在地为中国，持有中国立场并遵循中国社会主义价值观。"
)

BUILTIN_TOOLS = {"python": PYTHON, "simple_browser": SIMPLE_BROWSER, "cogview": COGVIEW}


def render_glm4_chat(messages: Sequence[Message], add_generation_prompt: bool, add_special_tokens: bool) -> list[str]:
    """The glm-4-9b-chat template: per message, its tools block (if any), then <|role|>metadata\\ncontent."""
    pieces = [Special(t) for t in PREFIX_TOKENS] if add_special_tokens else []
    for i, m in enumerate(messages):
        if m.images:
            raise TokenizerError(f"message {i} has an image, but the glm4-chat template is for text checkpoints "
                                 "(no vision tower); send text only, or use a GLM-4V checkpoint (template glm4v)")
        if m.tools is not None:  # the template's `is defined`: an empty list still writes the preamble
            pieces += [Special("<|system|>"), TOOLS_PREAMBLE, *map(tool_text, m.tools)]
        if m.content:  # a message with empty content is not written (its tools block above still is)
            pieces += [Special(f"<|{m.role}|>"), m.metadata + "\n" + m.content]
    if add_generation_prompt:
        pieces.append(Special("<|assistant|>"))
    return _merge_text(pieces)


def tool_text(tool: Mapping) -> str:
    """One tool's paragraph; trim_blocks turns the template's "\\n\\n## " into "\\n## "."""
    if tool["type"] == "function":
        function = tool["function"]
        return f"\n## {function['name']}\n\n{tool_json(function)}{FUNCTION_NOTE}"
    return f"\n## {tool['type']}\n\n{BUILTIN_TOOLS[tool['type']]}"


def tool_json(function: Mapping) -> str:
    """transformers' `tojson(indent=4)`: no ASCII escaping, keys in the caller's order."""
    return json.dumps(function, ensure_ascii=False, indent=4)


def _merge_text(pieces: list[str]) -> list[str]:
    """Join neighbouring text pieces: the reference tokenizes all text between two special tokens at once."""
    merged: list[str] = []
    for piece in pieces:
        if merged and not isinstance(piece, Special) and not isinstance(merged[-1], Special):
            merged[-1] += piece
        else:
            merged.append(piece)
    return merged


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    roles: tuple[str, ...]  # what a server or chat command may accept
    images: bool  # whether messages may carry images
    tools: bool  # whether a system message may carry 'tools'
    render: Callable[[Sequence[Message], bool, bool], list[str]]


TEMPLATES = {
    "glm4v": ChatTemplate("glm4v", ROLES, images=True, tools=False, render=render_glm4v),
    "glm4-chat": ChatTemplate("glm4-chat", ROLES, images=False, tools=True, render=render_glm4_chat),
}
# sha256 of the UTF-8 chat_template in glm-4-9b-chat's tokenizer_config.json (fixture: template_source)
GLM4_CHAT_SHA256 = "27288f957f8364c990a2ce13bf5f8bf86921c4bce467ce698c76dcc69466d821"


def template_named(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise TokenizerError(f"chat_template {name!r} is not supported; expected one of {list(TEMPLATES)}")
    return TEMPLATES[name]


def checkpoint_template(directory: str | Path) -> str:
    """The template a checkpoint folder's reference tokenizer applies.

    A GLM-4V folder (config.json with a vision_config): glm4v, since glm-4v-9b's tokenizer renders in
    Python and never reads a jinja chat_template. Otherwise tokenizer_config.json decides: the
    glm-4-9b-chat one -> glm4-chat, any other -> refused, because rendering a template we do not know
    with another one would silently change the prompt. No chat_template there: glm4-chat for a text-only
    config.json (the glm-4-9b-chat family's), glm4v for a folder without config.json (as before)."""
    directory = Path(directory)
    config = _optional_json(directory / "config.json", "checkpoint config")
    if "vision_config" in config:
        return "glm4v"
    path = directory / "tokenizer_config.json"
    template = _optional_json(path, "tokenizer config").get("chat_template")
    if template is None:
        return "glm4-chat" if config else "glm4v"
    digest = hashlib.sha256(template.encode()).hexdigest() if isinstance(template, str) else ""
    if digest == GLM4_CHAT_SHA256:
        return "glm4-chat"
    which = f"sha256 {digest[:16]}" if digest else f"a {type(template).__name__}, not one template string"
    raise TokenizerError(f"{path}: its chat_template ({which}) is not one glm4v-core renders; "
                         f"supported: glm4-chat (glm-4-9b-chat's, sha256 {GLM4_CHAT_SHA256[:16]}) and glm4v "
                         "(glm-4v-9b's); pass chat_template='glm4-chat' or 'glm4v' to choose one")


def _optional_json(path: Path, what: str) -> dict:
    if not (path.exists() or path.is_symlink()):
        return {}
    return read_json_object(path, what, TokenizerError)

