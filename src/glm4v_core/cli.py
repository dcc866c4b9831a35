"""The `glm4v` command: `generate` (one prompt, streamed), `chat` (multi-turn REPL), `parity`.

    glm4v generate [--checkpoint DIR] [--image PATH ...] "Describe this image."
    glm4v generate --image a.jpg --image b.jpg "Which is brighter?"
    glm4v chat [--checkpoint DIR] [--image PATH ...]   (then `/image PATH` attaches one to the next turn)
    glm4v parity [...]                      (the arguments of python -m glm4v_core.parity)
    glm4v make-reference --checkpoint DIR --out REF [...]   (record the checkpoint's own HF code)
    glm4v finetune --data F --out DIR [...] (the arguments of glm4v finetune; --plan: its peak memory)
    glm4v memory [--checkpoint DIR|config.json] [--quantize int4] [--max-new-tokens N]   (generation's peak memory)
    glm4v adapter convert|merge ...          (LoRA adapters: glm4v <-> PEFT, or merged into a base)
    glm4v download ORG/NAME[@REVISION]      (into the Hugging Face cache; then --checkpoint ORG/NAME)

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
import contextlib
import importlib
import math
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from glm4v_conversion import __version__
from glm4v_conversion.streams import STDOUT_CLOSED, WriteCounter, named_stdout_failures
from glm4v_core.config import BUNDLED_CHECKPOINT
from glm4v_core.errors import REFUSED, CLIError
from glm4v_core.generation.chat_commands import CHAT_COMMANDS

# torch and the model: imported by the commands that run one (generation/cli.py), never for --help, --version
# or a usage error. The names stay reachable here (`cli.load_model`, `cli.stream_text`: tests replace them).
LIBRARY = {"torch": "torch", "load_model": "glm4v_core.checkpoint", "stream_text": "glm4v_core.generation.streaming"}
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # glm4v_core.checkpoint.DTYPES's keys (a test checks)
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits
# mirrors, so that --help needs no torch (a test checks each against the library)
CHAT_TEMPLATE_NAMES = ("glm4v", "glm4-chat")  # glm4v_core.processing.chat_template.TEMPLATES
PREFILL_CHUNK = 2048  # glm4v_core.model.glm4v.PREFILL_CHUNK


def __getattr__(name: str):
    if name in LIBRARY:
        return getattr(importlib.import_module(LIBRARY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm4v", description="GLM-4V-9B inference (glm4v-core).",
                                     epilog="exit status: 0 on success, 1 for a refused input or a failure (the "
                                            "message says which), 2 for a usage error, 130 on Ctrl-C.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{generate,chat,parity,make-reference,finetune,adapter,memory,serve,download}")
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
    commands.add_parser("memory", add_help=False, help="the predicted peak memory of generating with a checkpoint, "
                                                       "per component, no weight read (see glm4v memory --help)")
    commands.add_parser("adapter", help="convert LoRA adapters (glm4v <-> PEFT) or merge them into a base "
                                        "(see glm4v adapter --help)", add_help=False)
    commands.add_parser("serve", help="an OpenAI-compatible chat endpoint (see glm4v serve --help; the [serve] extra)",
                        add_help=False)
    commands.add_parser("download", add_help=False,
                        help="fetch a checkpoint from the Hugging Face Hub into its local cache, for --checkpoint "
                             "ORG/NAME (see glm4v download --help; the [download] extra)")
    return parser


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, default=None,
                   help=f"checkpoint: DIR (HF or native layout) or ORG/NAME[@REVISION] from the local Hugging Face "
                        f"cache (glm4v download) (default: the bundled tiny fixture "
                        f"{BUNDLED_CHECKPOINT}: random weights, gibberish, but it runs in seconds)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer.model rank file (default: CHECKPOINT/tokenizer.model, or for a test fixture "
                        "without one, the repository's GLM-4 vocabulary cut to the fixture's size)")
    p.add_argument("--image", type=Path, action="append", default=[],
                   help="an image for the (first) user message; repeat for several, in order "
                        "(in chat, `/image PATH` attaches one to the next message); GLM-4V checkpoints only, "
                        "a text-only GLM-4 refuses it (default: none)")
    p.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default="auto",
                   help="model (compute) dtype; auto = bfloat16 on CUDA, float32 on CPU but bfloat16 for a "
                        "quantized folder (its packed CPU kernels are fast with bf16 only); bfloat16 on CPU decodes "
                        "on oneDNN-packed weights, up to about 2x faster (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="tokens to generate at most per answer (default: %(default)s)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (torch.compile; a CUDA graph on CUDA): faster decoding after "
                        "a one-time compile; the compile and warm-up time is reported apart and the decode rate "
                        "counts only the warm steps after it (default: off)")
    p.add_argument("--adapter", type=Path, default=None, metavar="DIR|FILE",
                   help="LoRA adapters to apply to the loaded model: a PEFT adapter folder (peft, ms-swift, "
                        "LLaMA-Factory), a glm4v finetune --out folder or its adapter.safetensors (default: none)")
    p.add_argument("--chat-template", choices=["auto", *CHAT_TEMPLATE_NAMES], default="auto",
                   help="how messages become ids (docs/chat_templates.md); auto = the checkpoint's own: glm4v for "
                        "GLM-4V, glm4-chat for a text-only GLM-4 such as glm-4-9b-chat (default: %(default)s)")
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="a system message before the first user message (default: none)")
    p.add_argument("--tools", type=Path, default=None, metavar="FILE.json",
                   help="tool definitions for the system message: a JSON list in the glm-4-9b-chat format "
                        "(docs/chat_templates.md); glm4-chat template only (default: none)")
    p.add_argument("--prefill-chunk", type=non_negative_int, default=PREFILL_CHUNK, metavar="N",
                   help="prompt slots per prefill pass (bounds the prefill's activations; the tokens are the same); "
                        "0 = the whole prompt in one pass (default: %(default)s)")


def non_negative_int(text: str) -> int:
    """argparse type for --prefill-chunk: a bad value is a usage error (exit 2)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0 (prompt slots per pass; 0 = one pass), got {text!r}")
    return value


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
    own_prog = argv[:1] in (["parity"], ["make-reference"], ["finetune"], ["serve"], ["download"], ["adapter"],
                            ["memory"])
    prog = f"glm4v {argv[0]}" if own_prog else "glm4v"
    try:
        # a closed or failing stdout: one line, exit 1; our own warnings: one line each
        with named_stdout_failures(prog) as stdout, one_line_warnings(prog):
            return _main(argv, stdout)
    except SystemExit as e:  # the output was lost (named or a reader that left): the status, returned
        if e.code == 1:
            return 1
        raise
    except KeyboardInterrupt:  # every command's net: during the lazy imports (torch) or outside its own handler
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def one_line_warnings(prog: str) -> Iterator[None]:
    """glm4v-core's own warnings (e.g. quantized layers on a slower path) as one `prog: warning: ...` line
    each; any other warning as Python prints it."""
    with warnings.catch_warnings():  # restores the printer on exit
        default = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if category.__module__.startswith(("glm4v_core", "glm4v_conversion")):
                print(f"{prog}: warning: {message}", file=sys.stderr, flush=True)
            else:
                default(message, category, filename, lineno, file, line)
        warnings.showwarning = show
        yield


def _main(argv: list[str], stdout: WriteCounter) -> int:
    if argv[:1] == ["parity"]:  # every further argument belongs to the parity tool
        from glm4v_core.parity import cli as parity
        return parity.main(argv[1:], prog="glm4v parity")
    if argv[:1] == ["make-reference"]:  # likewise; transformers is imported only inside this command
        from glm4v_core.parity import make_reference_cli
        return make_reference_cli.main(argv[1:])
    if argv[:1] == ["memory"]:  # likewise; torch is imported after its parse
        from glm4v_core.training import memory_cli
        return memory_cli.main(argv[1:])
    if argv[:1] == ["finetune"]:  # every further argument belongs to the fine-tuning tool
        from glm4v_core.training import cli as finetune
        return finetune.main(argv[1:])
    if argv[:1] == ["adapter"]:  # likewise
        from glm4v_core.training import adapter_cli
        return adapter_cli.main(argv[1:])
    if argv[:1] == ["serve"]:  # likewise; the ASGI stack is imported only inside this command
        from glm4v_core.serving import cli as serve
        return serve.main(argv[1:])
    if argv[:1] == ["download"]:  # likewise; huggingface_hub is imported only inside this command
        from glm4v_core import download_cli
        return download_cli.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if stdout.stream is None:  # `>&-`: say so now, not after loading the weights
            raise CLIError(STDOUT_CLOSED)
        check_arguments(args)
        from glm4v_core.generation import (
            cli as session_cli,  # lazy: torch and the model load only for a command that runs one
        )
        library = sys.modules[__name__]  # torch, load_model, stream_text as named here (tests replace them)
        if args.command == "generate" and args.tp > 1:  # spawned here, or under torchrun (N processes)
            from glm4v_core.transforms import distributed  # lazy: see glm4v_core.transforms
            session_cli.check_inputs(args)  # a bad file, flag or --tp degree fails here, before any rank starts
            device_type = library.torch.device(args.device).type if args.device else None  # None: cuda if any
            return distributed.run_ranks(session_cli.generate_on_rank, args.tp, args, device_type=device_type)
        session = session_cli.Session.open(args, load=library.load_model, stream=library.stream_text)
        if args.command == "generate":
            return session.generate(args.prompt, stdout, sys.stderr)
        return session.chat(sys.stdin, stdout, sys.stderr)
    except REFUSED as e:  # every refused input is a GLM4VError / ConversionError with a one-line text
        print(f"glm4v: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nglm4v: interrupted", file=sys.stderr)
        return 130


def check_arguments(args: argparse.Namespace) -> None:
    """The command line's own checks, all before any file is read. `--temperature 0` without
    --do-sample means greedy decoding (the temperature is then unused and set to its neutral 1);
    other sampling values without --do-sample are ignored, with one warning line."""
    from glm4v_core.checkpoint import check_device  # lazy, as torch: after the parse, not for --help
    from glm4v_core.generation.sampling import Sampling
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


if __name__ == "__main__":
    sys.exit(main())
