"""`glm4v serve`: an OpenAI-compatible chat endpoint over one loaded model (docs/serving.md).

    glm4v serve --checkpoint DIR [--adapter OUT] [--host 127.0.0.1] [--port 8000] [--max-batch 8] ...
    python -m glm4v_core.serving ...            (the same command)

Listens on 127.0.0.1 unless told otherwise, prints where once it does, and logs one line per
request to stderr. Everything that can fail on bad input (flags, the checkpoint, the tokenizer,
the adapter, the address) fails before the weights load, in one line, exit 1 (2 for usage).
SIGTERM (or Ctrl-C) stops taking connections, lets the requests in flight finish for up to
--timeout seconds, and exits 0 (130 for Ctrl-C). Needs the `serve` extra (fastapi, uvicorn).
"""
from __future__ import annotations

import argparse
import math
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from glm4v_conversion import __version__
from glm4v_core.config import BUNDLED_CHECKPOINT
from glm4v_core.errors import REFUSED, CLIError

PROG = "glm4v serve"
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Serve the model over an OpenAI-compatible HTTP API "
                                "(/v1/chat/completions, /v1/models).",
                                epilog="exit status: 0 after SIGTERM, 1 for a refused input or a failure, 2 for a "
                                       "usage error, 130 on Ctrl-C.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help=f"checkpoint: DIR (HF or native layout) or ORG/NAME[@REVISION] from the local Hugging Face "
                        f"cache (glm4v download) (default: the bundled demo {BUNDLED_CHECKPOINT})")
    p.add_argument("--adapter", type=Path, default=None,
                   help="LoRA adapters: a PEFT adapter folder, a `glm4v finetune` OUT folder or its "
                        "adapter.safetensors (default: none)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer.model rank file (default: CHECKPOINT/tokenizer.model, as glm4v generate)")
    p.add_argument("--model-name", default=None,
                   help="the model id clients pass as `model` (default: ORG/NAME for a hub checkpoint, else the "
                        "checkpoint folder's name)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 exposes the server to the network (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one (default: %(default)s)")
    p.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default="auto",
                   help="model dtype; auto = bfloat16 on CUDA, float32 on CPU but bfloat16 for a quantized "
                        "folder (as glm4v generate) (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (torch.compile; a CUDA graph on CUDA) (default: off)")
    p.add_argument("--max-batch", type=int, default=8, metavar="N",
                   help="requests answered together in one batch at most (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests waiting for the model at most; more are answered 429 (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="seconds a request may take from arrival to its last token (504 past it); also the "
                        "longest SIGTERM waits for requests in flight (default: %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=64 * 2**20, metavar="N",
                   help="largest request body, images included; larger is answered 413 (default: %(default)s)")
    p.add_argument("--default-max-tokens", type=int, default=1024, metavar="N",
                   help="new tokens for a request without max_tokens, at most the room left in the context "
                        "(default: %(default)s)")
    p.add_argument("--allow-local-images", type=Path, default=None, metavar="DIR",
                   help="serve file:// image URLs of files under DIR (default: file:// URLs are refused); "
                        "remote http(s) image URLs are always refused")
    return p


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        check_arguments(args)
        return serve(args, prog)
    except REFUSED as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # while the weights load
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130


def check_arguments(args: argparse.Namespace) -> None:
    """The command line's own checks, before any file is read."""
    for flag, low in (("max_batch", 1), ("max_queue", 1), ("max_body_bytes", 1), ("default_max_tokens", 1)):
        if getattr(args, flag) < low:
            raise CLIError(f"--{flag.replace('_', '-')} must be >= {low}, got {getattr(args, flag)}")
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in 0 .. 65535 (0: a free port), got {args.port}")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise CLIError(f"--timeout must be a number of seconds > 0, got {args.timeout}")
    if args.allow_local_images is not None and not args.allow_local_images.is_dir():
        raise CLIError(f"--allow-local-images {args.allow_local_images} is not a folder")


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the weights load: a port in use fails at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise CLIError(f"cannot listen on --host {host} --port {port}: {e.strerror or e}") from None
    return sock


def serve(args: argparse.Namespace, prog: str) -> int:
    try:  # the optional extra: say how to get it instead of a traceback
        import uvicorn

        from glm4v_core.serving.app import Service, create_app
    except ImportError as e:
        raise CLIError(f"{prog} needs the serve extra ({e.name} is missing): pip install 'glm4v-core[serve]'") from None
    import logging

    import torch

    from glm4v_core.checkpoint import DTYPES, check_device, load_model, resolve_checkpoint
    from glm4v_core.config import GLM4VConfig
    from glm4v_core.hub import repo_id_of
    from glm4v_core.model.ops import pack_cpu_weights
    from glm4v_core.processing.tokenizer import resolve_tokenizer
    from glm4v_core.serving.batcher import Batcher
    from glm4v_core.serving.prompts import Limits
    from glm4v_core.transforms.adapter_files import load_adapters

    checkpoint = resolve_checkpoint(args.checkpoint)
    config = GLM4VConfig.from_json(checkpoint / "config.json")
    tokenizer = resolve_tokenizer(args.tokenizer, checkpoint, config)
    from glm4v_core.generation.cli import auto_dtype, check_adapter_flag  # as glm4v generate / chat
    adapter = check_adapter_flag(args.adapter, config)
    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES.get(args.dtype) or auto_dtype(device, checkpoint)
    sock = listen(args.host, args.port)
    model = load_model(checkpoint, dtype=dtype, device=device)
    if adapter is not None:  # unmerged, as glm4v generate applies them
        load_adapters(model, adapter)
    pack_cpu_weights(model)  # as glm4v generate: bf16 on CPU decodes on oneDNN-packed weights (else a no-op)
    name = args.model_name or repo_id_of(checkpoint) or checkpoint.resolve().name  # not a snapshot's hash
    batcher = Batcher(model, tokenizer, args.max_batch, args.max_queue, args.compile)
    limits = Limits(args.default_max_tokens, args.allow_local_images)
    service = Service(model, tokenizer, name, batcher, limits, args.max_body_bytes, args.timeout)

    logging.basicConfig(level=logging.INFO, format=f"{prog}: %(message)s", stream=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=math.ceil(args.timeout)))
    # uvicorn catches SIGTERM / SIGINT, drains, then raises the signal again for the handler it found:
    # these record it, so that the drained server exits 0 (SIGTERM) or 130 (Ctrl-C), not killed
    received: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, frame: received.append(number))
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"{prog}: listening on http://{shown}:{port}/v1 (model {name!r} on {device}, {str(dtype).split('.')[-1]}; "
          f"--max-batch {args.max_batch}, --max-queue {args.max_queue})", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    print(f"{prog}: stopped", file=sys.stderr, flush=True)
    return 130 if signal.SIGINT in received else 0
