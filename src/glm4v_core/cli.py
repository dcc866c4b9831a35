"""The `glm4v` command: `generate` (one prompt, streamed), `chat` (multi-turn REPL), `parity`.

    glm4v generate [--checkpoint DIR] [--image PATH ...] "Describe this image."
    glm4v generate --image a.jpg --image b.jpg "Which is brighter?"
    glm4v chat [--checkpoint DIR] [--image PATH ...]   (then `/image PATH` attaches one to the next turn)
    glm4v parity [...]                      (the arguments of python -m glm4v_core.parity)
    glm4v make-reference --checkpoint DIR --out REF [...]   (record the checkpoint's own HF code)
    glm4v finetune --data F --out DIR [...] (the arguments of glm4v finetune)

Without --checkpoint the bundled tiny fixture runs (random weights: the text is gibberish, but
every stage of the pipeline runs in seconds). The answer goes to stdout as it is generated;
time to first token and decode tokens/s go to stderr.

Tokenizer: --tokenizer FILE, else DIR/tokenizer.model (real GLM-4V checkpoints ship it), else,
for the test fixtures, the repository's real GLM-4 vocabulary cut to the checkpoint's size: its
first `pad_token_id` BPE ranks (256 single bytes, then merges in rank order, itself a valid BPE
vocabulary), so the special tokens land at the fixture's ids (vocab - 223 + offset).
"""
from __future__ import annotations

import argparse
import io
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import torch

from glm4v_conversion import __version__
from glm4v_conversion.files import os_reason
from glm4v_conversion.streams import WriteCounter, quiet_broken_pipe
from glm4v_core.checkpoint import DTYPES, check_device, load_model, resolve_checkpoint
from glm4v_core.config import BUNDLED_CHECKPOINT, GLM4VConfig
from glm4v_core.errors import REFUSED, CLIError
from glm4v_core.generation.sampling import Sampling
from glm4v_core.generation.streaming import GenerationStats, TextDeltas, stream_text
from glm4v_core.model.splice import ImageBlock, InputError, spliced_length
from glm4v_core.processing.chat import build_inputs
from glm4v_core.processing.image import load_image
from glm4v_core.processing.tokenizer import Tokenizer, resolve_tokenizer

EXIT_WORDS = ("exit", "quit", "/exit", "/quit")
CHAT_COMMANDS = """in-chat commands (typed as a message):
  /image PATH        attach an image to your next message (repeat for several)
  /exit, /quit       end the session (so do exit, quit, an empty line and end of input)
  Ctrl-C             during an answer: cancel it (the session goes on); at the prompt: quit"""
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm4v", description="GLM-4V-9B inference (glm4v-core).",
                                     epilog="exit status: 0 on success, 1 for a refused input or a failure (the "
                                            "message says which), 2 for a usage error, 130 on Ctrl-C.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{generate,chat,parity,make-reference,finetune}")
    gen = commands.add_parser("generate", help="answer one prompt, streaming the text",
                              description="Answer one prompt; the text streams to stdout, the timings to stderr.")
    gen.add_argument("prompt", help="the user message")
    gen.add_argument("--tp", type=int, default=1, metavar="N",
                     help="tensor-parallel over N ranks: N GPUs with NCCL (CPU processes with gloo without CUDA), "
                          "spawned here or the ranks of torchrun; N must divide the model's query heads and KV "
                          "groups (default: %(default)s, one process)")
    chat = commands.add_parser("chat", help="multi-turn chat on stdin (an empty line, exit, quit, /exit, /quit "
                                            "or EOF ends it; /image PATH attaches an image)",
                               description="Multi-turn chat: one user message per line of stdin, the answers "
                                           "streamed to stdout.",
                               epilog=CHAT_COMMANDS, formatter_class=argparse.RawDescriptionHelpFormatter)
    for p in (gen, chat):
        add_model_arguments(p)
        add_sampling_arguments(p)
        p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands.add_parser("parity", help="compare with the HF reference fixtures (see glm4v parity --help)",
                        add_help=False)
    commands.add_parser("make-reference", add_help=False,
                        help="record a parity reference with the checkpoint's own HF code "
                             "(see glm4v make-reference --help)")
    commands.add_parser("finetune", help="LoRA / full fine-tuning on a JSONL (see glm4v finetune --help)",
                        add_help=False)
    return parser


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, default=None,
                   help=f"checkpoint folder (HF or native layout) (default: the bundled tiny fixture "
                        f"{BUNDLED_CHECKPOINT}: random weights, gibberish, but it runs in seconds)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer.model rank file (default: CHECKPOINT/tokenizer.model, or for a test fixture "
                        "without one, the repository's GLM-4 vocabulary cut to the fixture's size)")
    p.add_argument("--image", type=Path, action="append", default=[],
                   help="an image for the (first) user message; repeat for several, in order "
                        "(in chat, `/image PATH` attaches one to the next message) (default: none)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="model dtype; auto = bfloat16 on CUDA, float32 on CPU (bfloat16 on CPU decodes on "
                        "oneDNN-packed weights, up to about 2x faster) (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="tokens to generate at most per answer (default: %(default)s)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (torch.compile; a CUDA graph on CUDA): faster decoding after "
                        "a one-time compile, reported separately (default: off)")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding (default: off)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="softmax temperature, with --do-sample; without it the decoding is greedy and 0 is its "
                        "spelling (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0,
                   help="keep the k most likely tokens, with --do-sample; 0 = all (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling mass, with --do-sample; 1 = off (default: %(default)s)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="CTRL-style penalty, greedy or sampled; 1 = off (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None,
                   help=f"seed the sampler for reproducible output, 0 .. {MAX_SEED} (default: none, a fresh "
                        "draw each run; 0 under --tp)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (repeatable); the stop ids always apply (default: none)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = f"glm4v {argv[0]}" if argv[:1] in (["parity"], ["make-reference"], ["finetune"]) else "glm4v"
    stdout: WriteCounter | None = None
    try:
        with quiet_broken_pipe() as stdout:
            if stdout.stream is not None:
                stdout.stream = NamedWriteFailures(stdout.stream)
            return _main(argv, stdout)
    except SystemExit as e:  # quiet_broken_pipe ended the command: a reader that left stays quiet, else say why
        reason = lost_output(stdout)
        if reason is None or e.code not in (0, 1, None):
            raise
        print(f"{prog}: error: {reason}", file=sys.stderr)
        return 1


class NamedWriteFailures:
    """The real stdout, inside quiet_broken_pipe's WriteCounter: a write that fails for another reason than a
    reader that went away (`> /dev/full`, an I/O error) is remembered, then raised as a BrokenPipeError, so
    the guard ends the command (and points fd 1 at /dev/null for the interpreter's last flush); `main`
    then names the reason."""

    def __init__(self, stream: TextIO):
        self.stream, self.error = stream, None

    def write(self, text: str) -> int:
        return self._call(self.stream.write, text)

    def flush(self) -> None:
        self._call(self.stream.flush)

    def _call(self, method, *args):
        try:
            return method(*args)
        except BrokenPipeError:
            raise
        except OSError as e:
            self.error = e
            raise BrokenPipeError(e.errno, e.strerror) from e

    def __getattr__(self, name: str):  # fileno, isatty, encoding, ...: the real stream's
        return getattr(self.stream, name)


STDOUT_CLOSED = "the output could not be written: stdout is closed"


def lost_output(stdout: WriteCounter | None) -> str | None:
    """Why the command's output could not be written, or None (written, or a reader that left: `| head`)."""
    if stdout is None:
        return None
    if stdout.stream is None:
        return STDOUT_CLOSED if stdout.failed else None
    error = getattr(stdout.stream, "error", None)
    return None if error is None else f"the output could not be written to stdout: {os_reason(error)}"


def _main(argv: list[str], stdout: WriteCounter) -> int:
    if argv[:1] == ["parity"]:  # every further argument belongs to the parity tool
        from glm4v_core.parity import cli as parity
        return parity.main(argv[1:], prog="glm4v parity")
    if argv[:1] == ["make-reference"]:  # likewise; transformers is imported only inside this command
        from glm4v_core.parity import make_reference_cli
        return make_reference_cli.main(argv[1:])
    if argv[:1] == ["finetune"]:  # every further argument belongs to the fine-tuning tool
        from glm4v_core.training import cli as finetune
        return finetune.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if stdout.stream is None:  # `>&-`: say so now, not after loading the weights
            raise CLIError(STDOUT_CLOSED)
        check_arguments(args)
        if args.command == "generate" and args.tp > 1:  # spawned here, or under torchrun (N processes)
            from glm4v_core.transforms import distributed  # lazy: see glm4v_core.transforms
            check_inputs(args)  # a bad file, flag or --tp degree fails here, before any rank starts
            device_type = torch.device(args.device).type if args.device else None  # None: cuda if there is one
            return distributed.run_ranks(generate_on_rank, args.tp, args, device_type=device_type)
        session = Session.open(args)
        if args.command == "generate":
            return session.generate(args.prompt, stdout, sys.stderr)
        return session.chat(sys.stdin, stdout, sys.stderr)
    except REFUSED as e:  # every refused input is a GLM4VError / ConversionError with a one-line text
        print(f"glm4v: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nglm4v: interrupted", file=sys.stderr)
        return 130


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits


def check_arguments(args: argparse.Namespace) -> None:
    """The command line's own checks, all before any file is read. `--temperature 0` without
    --do-sample means greedy decoding (the temperature is then unused and set to its neutral 1);
    other sampling values without --do-sample are ignored, with one warning line."""
    if args.command == "generate" and not args.prompt.strip():
        raise CLIError('the prompt is empty; give the question as an argument, '
                       'e.g. glm4v generate "Describe this image."')
    if getattr(args, "tp", 1) < 1:
        raise CLIError(f"--tp must be >= 1 (the number of tensor-parallel ranks), got {args.tp}")
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise CLIError(f"--seed must be in 0 .. {MAX_SEED} (2**64 - 1), got {args.seed}")
    for flag in ("temperature", "top_p", "repetition_penalty"):
        value = getattr(args, flag)
        if not math.isfinite(value):
            raise CLIError(f"--{flag.replace('_', '-')} must be a finite number, got {value}")
    if args.temperature == 0 and not args.do_sample:
        args.temperature = 1.0
    if args.temperature <= 0 and args.do_sample:
        raise CLIError(f"--temperature must be > 0 with --do-sample, got {args.temperature} "
                       "(leave out --do-sample for greedy decoding)")
    Sampling(args.do_sample, args.temperature, args.top_k, args.top_p, args.repetition_penalty)  # checks the flags
    if not args.do_sample:
        warn_unused_sampling_flags(args)
    if any(not text for text in args.stop):
        raise CLIError("--stop needs a non-empty text")
    if args.device is not None:
        check_device(args.device)


def warn_unused_sampling_flags(args: argparse.Namespace) -> None:
    """Greedy decoding uses neither a temperature nor top-k / top-p: say once that the given ones are
    ignored (as transformers does), and decode greedily."""
    ignored = [f"--{flag.replace('_', '-')} {value:g}" if isinstance(value, float) else f"--top-k {value}"
               for flag, value, neutral in (("temperature", args.temperature, 1.0), ("top_k", args.top_k, 0),
                                            ("top_p", args.top_p, 1.0))
               if value != neutral]
    if ignored:
        verb = "is" if len(ignored) == 1 else "are"
        print(f"glm4v: warning: {', '.join(ignored)} {verb} ignored in greedy decoding (add --do-sample to sample)",
              file=sys.stderr, flush=True)
    args.temperature, args.top_k, args.top_p = 1.0, 0, 1.0


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

    def __init__(self, model, tokenizer: Tokenizer, images: Sequence[str], args: argparse.Namespace):
        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.pending_images = list(images)  # attached to the next user message, in order

    @classmethod
    def open(cls, args: argparse.Namespace) -> Session:
        """Everything that can fail on bad input (files, sizes, flags) fails before the weights load."""
        checkpoint, _, tokenizer, images = check_inputs(args)
        device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        # bf16 on CPU: the products run on oneDNN-packed weights (about 2x faster decoding, eager or compiled);
        # not under --tp, whose shards replace the weights
        model = load_model(checkpoint, dtype=dtype, device=device, pack_cpu=getattr(args, "tp", 1) == 1)
        return cls(model, tokenizer, images, args)

    def generate(self, prompt: str, out: TextIO, err: TextIO) -> int:
        self.answer([self.user_message(prompt)], out, err)
        return 0

    def chat(self, lines: TextIO, out: TextIO, err: TextIO) -> int:
        """One user line per turn; the history (images included) is re-encoded each turn.

        `/image PATH` attaches an image to the next user message. Ctrl-C during an answer cancels
        it (the partial answer stays in the history); Ctrl-C anywhere else ends the session."""
        messages: list[dict] = []
        while True:
            if lines.isatty():
                print("user> ", end="", file=err, flush=True)
            line = lines.readline()
            text = line.strip()
            if not text or text.lower() in EXIT_WORDS:  # EOF reads as ""
                return 0
            if text.split(maxsplit=1)[0] == "/image":
                self.attach(text[len("/image"):].strip().strip("\"'"), err)
                continue
            turn = [*messages, self.user_message(text)]
            try:
                reply = self.answer(turn, out, err, cancellable=True)
            except InputError as e:  # e.g. the history outgrew the context: say so, keep the session
                print(f"glm4v: error: {e}; this message was dropped (with its images)", file=err, flush=True)
                continue
            messages = [*turn, {"role": "assistant", "content": reply}]

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

    def answer(self, messages: list[dict], out: TextIO, err: TextIO, cancellable: bool = False) -> str:
        """Stream the reply to `out`, the stats line to `err`; return the reply text.

        cancellable: Ctrl-C ends this answer (the text so far is returned) instead of the program."""
        inputs = build_inputs(self.tokenizer, messages, self.model.config.vision.image_size)
        a = self.args
        generator = None
        if a.seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(a.seed)
        stats = GenerationStats()
        pieces, cancelled = [], False
        sampling = Sampling(a.do_sample, a.temperature, a.top_k, a.top_p, a.repetition_penalty)
        stream = stream_text(self.model, self.tokenizer, inputs.input_ids, inputs.pixel_values,
                             max_new_tokens=a.max_new_tokens, sampling=sampling, stop_strings=a.stop,
                             generator=generator, stats=stats, compile=a.compile)
        try:
            for delta in stream:
                pieces.append(delta)
                out.write(delta)
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


if __name__ == "__main__":
    sys.exit(main())
