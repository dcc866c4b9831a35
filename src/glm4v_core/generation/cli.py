"""The loaded-model side of `glm4v generate` and `glm4v chat`: the input checks, the session, the chat loop.

`glm4v_core.cli` parses the command line without torch (so `--help`, `--version` and usage errors
answer at once) and imports this module only for a command that runs the model. The chat loop's
in-chat commands, its banner and how an answer is shown are documented in docs/generation.md.
"""
from __future__ import annotations

import argparse
import io
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple, TextIO

import torch

from glm4v_conversion.files import parse_json, read_bytes
from glm4v_conversion.quantize import quantized_scheme_of
from glm4v_core.checkpoint import DTYPES, build_meta_model, check_device, load_model, resolve_checkpoint
from glm4v_core.config import GLM4VConfig
from glm4v_core.errors import REFUSED, CLIError
from glm4v_core.generation.chat_commands import BANNER, CHAT_COMMANDS, COMMAND, EXIT_WORDS
from glm4v_core.generation.sampling import Sampling
from glm4v_core.generation.streaming import GenerationStats, TextDeltas, stream_text
from glm4v_core.model.splice import ImageBlock, spliced_length
from glm4v_core.processing.chat import build_inputs
from glm4v_core.processing.image import load_image
from glm4v_core.processing.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerError, check_message, resolve_tokenizer
from glm4v_core.transforms.adapter_files import check_adapters, load_adapters, resolve_adapter
from glm4v_core.transforms.lora import LoRAError

# shown instead of a control character (other than newline and tab) or a special token in an answer
REPLACEMENT = "\N{REPLACEMENT CHARACTER}"
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
SPECIAL = re.compile("|".join(re.escape(t) for t in sorted(SPECIAL_TOKENS, key=len, reverse=True)))


def shown(text: str) -> str:
    """An answer as the chat shows it: every special token's text and every control character but newline
    and tab become U+FFFD (no terminal escape, no raw `<|user|>`). The history keeps the text as generated."""
    return CONTROL.sub(REPLACEMENT, SPECIAL.sub(REPLACEMENT, text))


class Inputs(NamedTuple):
    """What check_inputs found usable: the folder, its config, the tokenizer, the images, the --adapter file,
    and the messages before the first user turn (--system / --tools: none or one system message)."""

    checkpoint: Path
    config: GLM4VConfig
    tokenizer: Tokenizer
    images: list[str]
    adapter: Path | None
    system: list[dict]


def check_inputs(args: argparse.Namespace) -> Inputs:
    """Everything that can fail on bad input (files, sizes, flags, the --tp degree), before any weight loads."""
    checkpoint = resolve_checkpoint(args.checkpoint)
    config = GLM4VConfig.from_json(checkpoint / "config.json")
    if getattr(args, "tp", 1) > 1:
        from glm4v_core.parity.cli import check_tp_fits  # lazy, as the parity command itself; shared with it
        check_tp_fits(config, args.tp)
    adapter = check_adapter_flag(getattr(args, "adapter", None), config, getattr(args, "tp", 1))
    tokenizer = resolve_tokenizer(args.tokenizer, checkpoint, config, getattr(args, "chat_template", "auto"))
    images = [str(path) for path in args.image]
    if images:
        check_takes_images("--image", checkpoint, config, tokenizer)
    for path in images:
        load_image(path, config.vision.image_size)  # an unreadable image fails now, not after the load
    system = system_messages(getattr(args, "system", None), getattr(args, "tools", None), tokenizer)
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    TextDeltas(tokenizer, args.stop)  # checks the stop strings
    return Inputs(checkpoint, config, tokenizer, images, adapter, system)


def check_takes_images(flag: str, checkpoint: Path, config: GLM4VConfig, tokenizer: Tokenizer) -> None:
    """--image / `/image`: the model needs a vision tower, the chat template image blocks."""
    if not config.has_vision:
        raise CLIError(f"{flag}: {checkpoint} is a text-only GLM-4 (no vision tower); drop {flag}")
    if not tokenizer.template.images:
        raise CLIError(f"{flag}: the {tokenizer.chat_template} chat template takes no images; drop {flag} "
                       "or use --chat-template glm4v")


def system_messages(text: str | None, tools: Path | None, tokenizer: Tokenizer) -> list[dict]:
    """--system TEXT and --tools FILE.json: the one system message that opens the conversation, or none."""
    if text is None and tools is None:
        return []
    if "system" not in tokenizer.chat_roles:
        raise CLIError(f"--system/--tools: the {tokenizer.chat_template} chat template takes no system message")
    message = {"role": "system", "content": text or ""}
    if tools is not None:
        if not tokenizer.template.tools:
            raise CLIError(f"--tools: the {tokenizer.chat_template} chat template takes no tools (only glm4-chat "
                           "does: a text-only GLM-4, or --chat-template glm4-chat); drop --tools")
        message["tools"] = load_tools(tools)
    try:
        check_message(message, 0)
    except TokenizerError as e:  # a tool entry the template cannot write
        raise CLIError(f"--tools {tools}: {str(e).removeprefix('message 0: ')}") from None
    return [message]


def load_tools(path: Path) -> list:
    """--tools FILE.json: a JSON list of tool definitions (docs/chat_templates.md)."""
    try:
        tools = parse_json(read_bytes(path, "tools file", CLIError), path, CLIError)
    except CLIError as e:
        raise CLIError(f"--tools: {e}; expected a JSON list of tool definitions (docs/chat_templates.md)") from None
    if not isinstance(tools, list):
        raise CLIError(f"--tools {path}: expected a JSON list of tool definitions (docs/chat_templates.md), "
                       f"got a JSON {type(tools).__name__}")
    return tools


def check_adapter_flag(path: Path | None, config: GLM4VConfig, tp: int = 1) -> Path | None:
    """--adapter DIR|FILE: the adapter file, checked against the model's shapes (a meta-device build: no
    weight is read); the command applies it after loading. (`glm4v parity` checks its --adapter alike.)"""
    if path is None:
        return None
    if tp > 1:
        raise CLIError(f"--adapter does not go with --tp {tp} (tensor parallel shards plain Linears, not "
                       "LoRA-wrapped ones); merge the adapters first (glm4v finetune --save-merged writes OUT/merged)")
    try:
        adapter = resolve_adapter(path)
        check_adapters(build_meta_model(config), adapter)
    except LoRAError as e:
        raise CLIError(f"--adapter {path}: {e}") from None
    return adapter


def auto_dtype(device: torch.device, checkpoint: Path) -> torch.dtype:
    """--dtype auto: bfloat16 on CUDA; on CPU float32, but bfloat16 for a weight-only quantized folder:
    PyTorch's packed int8 / int4 CPU kernels are vectorized for bf16 activations (4-16x the decode
    speed of fp32 ones on the demo's mid-size sibling, benchmarks/quant.py)."""
    if device.type == "cuda" or quantized_scheme_of(checkpoint) is not None:
        return torch.bfloat16
    return torch.float32


class Session:
    """A loaded model, its tokenizer, the sampling settings, and the images waiting for the next user turn."""

    def __init__(self, model, tokenizer: Tokenizer, images: Sequence[str], args: argparse.Namespace,
                 stream: Callable = stream_text, system: Sequence[dict] = (), checkpoint: Path | None = None):
        self.model, self.tokenizer, self.args, self.stream = model, tokenizer, args, stream
        self.pending_images = list(images)  # attached to the next user message, in order
        self.system = list(system)  # opens every conversation (--system / --tools)
        self.checkpoint = checkpoint or Path("the checkpoint")  # named in errors

    @classmethod
    def open(cls, args: argparse.Namespace, load: Callable = load_model, stream: Callable = stream_text) -> Session:
        """Everything that can fail on bad input (files, sizes, flags) fails before the weights load.
        load / stream: the loader and the streamer (the command passes its own names, which tests replace)."""
        checkpoint, _, tokenizer, images, adapter, system = check_inputs(args)
        device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = DTYPES.get(args.dtype) or auto_dtype(device, checkpoint)
        # bf16 on CPU: the products run on oneDNN-packed weights (about 2x faster decoding, eager or compiled);
        # not under --tp, whose shards replace the weights
        model = load(checkpoint, dtype=dtype, device=device, pack_cpu=getattr(args, "tp", 1) == 1)
        if adapter is not None:  # unmerged, as load_adapters leaves them: the packed base weights stay in use
            load_adapters(model, adapter)
        model.prefill_chunk = args.prefill_chunk or None  # 0: the whole prompt in one pass
        return cls(model, tokenizer, images, args, stream, system, checkpoint)

    def generate(self, prompt: str, out: TextIO, err: TextIO) -> int:
        self.answer([*self.system, self.user_message(prompt)], out, err)
        return 0

    def chat(self, lines: TextIO, out: TextIO, err: TextIO) -> int:
        """One user line per turn; the history (images included) is re-encoded each turn.

        `/image PATH` attaches an image to the next user message, `/help` lists the commands, an unknown
        `/command` is answered. A refused turn (a bad image, a history past the context) is one error line
        and the session goes on. Ctrl-C during an answer cancels it (the partial answer stays in the
        history); Ctrl-C anywhere else ends the session."""
        messages: list[dict] = list(self.system)
        print(BANNER, file=err, flush=True)
        while True:
            if lines.isatty():
                print("user> ", end="", file=err, flush=True)
            line = lines.readline()
            text = line.strip()
            if not text or text.lower() in EXIT_WORDS:  # EOF reads as ""
                return 0
            word = text.split(maxsplit=1)[0]
            if COMMAND.fullmatch(word):
                self.command(word, text[len(word):].strip(), err)
                continue
            turn = [*messages, self.user_message(text)]
            try:
                reply = self.answer(turn, out, err, cancellable=True, show=shown)
            except REFUSED as e:  # e.g. the history outgrew the context: say so, keep the session
                print(f"glm4v: error: {e}; this message was dropped (with its images)", file=err, flush=True)
                continue
            messages = [*turn, {"role": "assistant", "content": reply}]

    def command(self, word: str, rest: str, err: TextIO) -> None:
        """An in-chat command (the first word of the line, `/NAME`)."""
        if word == "/image":
            self.attach(rest.strip("\"'"), err)
        elif word == "/help":
            print(CHAT_COMMANDS, file=err, flush=True)
        else:
            print(f"glm4v: unknown command {word}; /help lists them", file=err, flush=True)

    def attach(self, path: str, err: TextIO) -> None:
        """`/image PATH`: check the image now, send it with the next user message."""
        if not path:
            print("glm4v: usage: /image PATH (attaches the image to your next message)", file=err, flush=True)
            return
        try:
            check_takes_images("/image", self.checkpoint, self.model.config, self.tokenizer)
            load_image(path, self.model.config.vision.image_size)
        except REFUSED as e:
            print(f"glm4v: error: {e}", file=err, flush=True)
            return
        self.pending_images.append(path)
        print(f"[image {path} attached to your next message ({len(self.pending_images)} waiting)]",
              file=err, flush=True)

    def user_message(self, text: str) -> dict:
        """The next user message; it takes every waiting image, before its text."""
        images, self.pending_images = self.pending_images, []
        return {"role": "user", "content": text, **({"image": images} if images else {})}

    def answer(self, messages: list[dict], out: TextIO, err: TextIO, cancellable: bool = False,
               show: Callable[[str], str] = str) -> str:
        """Stream the reply to `out` (each piece through `show`), the stats line to `err`; return the reply text.

        cancellable: Ctrl-C ends this answer (the text so far is returned) instead of the program."""
        config = self.model.config
        inputs = build_inputs(self.tokenizer, messages, config.vision.image_size if config.has_vision else None)
        a = self.args
        generator = None
        if a.seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(a.seed)
        stats = GenerationStats()
        pieces, cancelled = [], False
        sampling = Sampling(a.do_sample, a.temperature, a.top_k, a.top_p, a.repetition_penalty)
        stream = self.stream(self.model, self.tokenizer, inputs.input_ids, inputs.pixel_values,
                             max_new_tokens=a.max_new_tokens, sampling=sampling, stop_strings=a.stop,
                             generator=generator, stats=stats, compile=a.compile)
        try:
            for delta in stream:
                pieces.append(delta)
                out.write(show(delta))
                out.flush()
        except KeyboardInterrupt:
            if not cancellable:
                raise
            cancelled = True
        finally:
            stream.close()
        out.write("\n")
        out.flush()
        n_images = 0 if inputs.pixel_values is None else inputs.pixel_values.shape[0]
        slots = inputs.input_ids.shape[1]  # a text-only GLM-4: one cache slot per token
        if config.has_vision:
            slots = spliced_length(inputs.input_ids, ImageBlock.from_config(config))
        note = "answer cancelled (Ctrl-C again at the prompt quits); " if cancelled else ""
        print(f"[{note}{stats.summary()}; {n_images} image(s), spliced prompt {slots} tokens]", file=err, flush=True)
        return "".join(pieces)


def generate_on_rank(args: argparse.Namespace) -> int:
    """One rank of `glm4v generate --tp N`: its shard of the model, the same tokens as every other
    rank (the logits are gathered, the seed shared); rank 0 writes the answer."""
    from glm4v_core.transforms import distributed  # lazy: see glm4v_core.transforms
    args.device = str(distributed.init())
    session = Session.open(args)
    distributed.tensor_parallel(session.model, distributed.mesh(torch.device(args.device)))
    if args.seed is None:
        args.seed = 0  # sampling draws must agree across ranks
    out = (sys.stdout, sys.stderr) if distributed.is_rank0() else (io.StringIO(), io.StringIO())
    return session.generate(args.prompt, *out)
