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
from typing import TextIO

import torch

from glm4v_core.checkpoint import DTYPES, check_device, load_model, resolve_checkpoint
from glm4v_core.config import GLM4VConfig
from glm4v_core.errors import REFUSED, CLIError
from glm4v_core.generation.chat_commands import BANNER, CHAT_COMMANDS, COMMAND, EXIT_WORDS
from glm4v_core.generation.sampling import Sampling
from glm4v_core.generation.streaming import GenerationStats, TextDeltas, stream_text
from glm4v_core.model.splice import ImageBlock, spliced_length
from glm4v_core.processing.chat import build_inputs
from glm4v_core.processing.image import load_image
from glm4v_core.processing.tokenizer import SPECIAL_TOKENS, Tokenizer, resolve_tokenizer

# shown instead of a control character (other than newline and tab) or a special token in an answer
REPLACEMENT = "\N{REPLACEMENT CHARACTER}"
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
SPECIAL = re.compile("|".join(re.escape(t) for t in sorted(SPECIAL_TOKENS, key=len, reverse=True)))


def shown(text: str) -> str:
    """An answer as the chat shows it: every special token's text and every control character but newline
    and tab become U+FFFD (no terminal escape, no raw `<|user|>`). The history keeps the text as generated."""
    return CONTROL.sub(REPLACEMENT, SPECIAL.sub(REPLACEMENT, text))


def check_inputs(args: argparse.Namespace) -> tuple[Path, GLM4VConfig, Tokenizer, list[str]]:
    """Everything that can fail on bad input (files, sizes, flags, the --tp degree), before any weight loads:
    the checkpoint folder, its config, the tokenizer, the images."""
    checkpoint = resolve_checkpoint(args.checkpoint)
    config = GLM4VConfig.from_json(checkpoint / "config.json")
    if getattr(args, "tp", 1) > 1:
        from glm4v_core.parity.cli import check_tp_fits  # lazy, as the parity command itself; shared with it
        check_tp_fits(config, args.tp)
    tokenizer = resolve_tokenizer(args.tokenizer, checkpoint, config)
    images = [str(path) for path in args.image]
    for path in images:
        load_image(path, config.vision.image_size)  # an unreadable image fails now, not after the load
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    TextDeltas(tokenizer, args.stop)  # checks the stop strings
    return checkpoint, config, tokenizer, images


class Session:
    """A loaded model, its tokenizer, the sampling settings, and the images waiting for the next user turn."""

    def __init__(self, model, tokenizer: Tokenizer, images: Sequence[str], args: argparse.Namespace,
                 stream: Callable = stream_text):
        self.model, self.tokenizer, self.args, self.stream = model, tokenizer, args, stream
        self.pending_images = list(images)  # attached to the next user message, in order

    @classmethod
    def open(cls, args: argparse.Namespace, load: Callable = load_model, stream: Callable = stream_text) -> Session:
        """Everything that can fail on bad input (files, sizes, flags) fails before the weights load.
        load / stream: the loader and the streamer (the command passes its own names, which tests replace)."""
        checkpoint, _, tokenizer, images = check_inputs(args)
        device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        # bf16 on CPU: the products run on oneDNN-packed weights (about 2x faster decoding, eager or compiled);
        # not under --tp, whose shards replace the weights
        model = load(checkpoint, dtype=dtype, device=device, pack_cpu=getattr(args, "tp", 1) == 1)
        return cls(model, tokenizer, images, args, stream)

    def generate(self, prompt: str, out: TextIO, err: TextIO) -> int:
        self.answer([self.user_message(prompt)], out, err)
        return 0

    def chat(self, lines: TextIO, out: TextIO, err: TextIO) -> int:
        """One user line per turn; the history (images included) is re-encoded each turn.

        `/image PATH` attaches an image to the next user message, `/help` lists the commands, an unknown
        `/command` is answered. A refused turn (a bad image, a history past the context) is one error line
        and the session goes on. Ctrl-C during an answer cancels it (the partial answer stays in the
        history); Ctrl-C anywhere else ends the session."""
        messages: list[dict] = []
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
        inputs = build_inputs(self.tokenizer, messages, self.model.config.vision.image_size)
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
        slots = spliced_length(inputs.input_ids, ImageBlock.from_config(self.model.config))
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
