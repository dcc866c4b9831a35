"""`glm4v serve` under load: throughput and latency at 1, 4 and 16 concurrent clients, against the
same requests answered one at a time (a server with --max-batch 1, one client).

    python benchmarks/serve.py                       # CPU: the bundled demo checkpoint, fp32
    python benchmarks/serve.py --mid                 # + the mid-size random model of benchmarks/generate.py
    python benchmarks/serve.py --checkpoint DIR --dtype bfloat16 --device cuda

The server runs in this process (uvicorn in a thread, 127.0.0.1, a free port) over the real app:
HTTP, JSON, the queue, the model thread's batches. Each client thread sends its share of
--requests greedy requests back to back (prompts of different lengths, --max-tokens each), over
its own keep-alive connection. Per setting: wall time, requests/s, completion tokens/s (from
each answer's `usage`), latency p50 / p95 (send to last byte), and the batches the model thread ran.
On the random-weight demo a stop id can end an answer early; the token counts are the real ones.
"""
from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
import uvicorn

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402
from generate import mid_size_config, random_model  # noqa: E402  (benchmarks/generate.py)

from glm4v_core import BUNDLED_CHECKPOINT, GLM4VConfig, load_model, resolve_tokenizer  # noqa: E402
from glm4v_core.serving.app import Service, create_app  # noqa: E402
from glm4v_core.serving.batcher import Batcher  # noqa: E402

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge its form".split()


def prompts(n: int) -> list[str]:
    """n user messages of 4 to 19 words: a batch of them is left-padded, as real traffic is."""
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(4 + (i * 5) % 16)) for i in range(n)]


class Server:
    """The app on 127.0.0.1:<free port> under uvicorn in a thread."""

    def __init__(self, model, tokenizer, max_batch: int):
        self.batcher = Batcher(model, tokenizer, max_batch=max_batch, max_queue=1024)
        service = Service(model, tokenizer, "bench", self.batcher, timeout=3600)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()


def run(server: Server, texts: list[str], clients: int, max_tokens: int) -> dict:
    """Every text once, spread over `clients` threads; the numbers of this one setting."""
    latencies, tokens = [], []

    def client(share: list[str]) -> None:
        with httpx.Client(base_url=server.url, trust_env=False, timeout=3600) as http:
            for text in share:
                start = time.perf_counter()
                r = http.post("/v1/chat/completions", json={"model": "bench", "max_tokens": max_tokens,
                                                            "temperature": 0,
                                                            "messages": [{"role": "user", "content": text}]})
                r.raise_for_status()
                latencies.append(time.perf_counter() - start)
                tokens.append(r.json()["usage"]["completion_tokens"])

    server.batcher.batch_sizes.clear()
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client, texts[i::clients]) for i in range(clients)]:
            f.result()
    wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=20, method="inclusive")  # q[9] = p50, q[18] = p95
    batches = server.batcher.batch_sizes
    return {"clients": clients, "requests": len(latencies), "wall_s": wall, "requests_per_s": len(latencies) / wall,
            "completion_tokens": sum(tokens), "completion_tokens_per_s": sum(tokens) / wall,
            "latency_p50_s": q[9], "latency_p95_s": q[18], "batches": len(batches),
            "mean_batch": statistics.fmean(batches), "largest_batch": max(batches)}


def bench_model(label: str, model, tokenizer, args) -> dict:
    texts = prompts(args.requests)
    with Server(model, tokenizer, max_batch=1) as server:  # warm-up, then the one-at-a-time baseline
        run(server, texts[:2], 1, 2)
        sequential = run(server, texts, 1, args.max_tokens)
    rows = []
    with Server(model, tokenizer, max_batch=args.max_batch) as server:
        for clients in args.concurrency:
            rows.append(run(server, texts, clients, args.max_tokens))
    print(f"\n{label}: {args.requests} requests, max_tokens {args.max_tokens}, --max-batch {args.max_batch}")
    print(f"{'setting':<26}{'wall s':>8}{'req/s':>8}{'tok/s':>9}{'p50 s':>8}{'p95 s':>8}{'mean batch':>12}"
          f"{'x seq tok/s':>13}")
    for name, row in [("sequential (max-batch 1)", sequential), *((f"{r['clients']} clients", r) for r in rows)]:
        gain = row["completion_tokens_per_s"] / sequential["completion_tokens_per_s"]
        print(f"{name:<26}{row['wall_s']:>8.2f}{row['requests_per_s']:>8.2f}{row['completion_tokens_per_s']:>9.1f}"
              f"{row['latency_p50_s']:>8.3f}{row['latency_p95_s']:>8.3f}{row['mean_batch']:>12.2f}{gain:>13.2f}")
        row["tokens_per_s_vs_sequential"] = gain
    return {"model": label, "dtype": str(model.dtype).removeprefix("torch."), "sequential": sequential,
            "concurrent": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint folder (default: the bundled demo)")
    p.add_argument("--mid", action="store_true", help="also the mid-size random model (benchmarks/generate.py)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    checkpoint = args.checkpoint or BUNDLED_CHECKPOINT
    model = load_model(checkpoint, dtype=dtype, device=args.device)
    runs = [bench_model(f"checkpoint {checkpoint.name}", model,
                        resolve_tokenizer(None, checkpoint, model.config), args)]
    if args.mid:
        hf = mid_size_config()
        mid = random_model(hf, torch.device(args.device), dtype)
        # the bundled vocabulary cut to the mid config's size: its special ids land where the config says
        runs.append(bench_model("mid-size random (benchmarks/generate.py:mid_size_config)", mid,
                                resolve_tokenizer(None, BUNDLED_CHECKPOINT, GLM4VConfig.from_hf(hf)), args))
    write_result(f"serve_{'cpu' if args.device == 'cpu' else args.device.split(':')[0]}",
                 {"requests": args.requests, "max_tokens": args.max_tokens, "max_batch": args.max_batch,
                  "runs": runs}, args.out)


if __name__ == "__main__":
    main()
