"""Tokenizer speed: vocabulary load time and encode/decode throughput, ours vs raw tiktoken.

    python benchmarks/tokenizer.py [--mb 1.0] [--repeats 5]

Text: ~1 MB of mixed English, Chinese, Python code and numbers, generated from a fixed seed, with
special-token text ('<|user|>' ...) sprinkled in so `encode` has to split on it. Throughput is UTF-8
input bytes per second, best of N runs, single thread. Baselines are raw tiktoken Encodings built the
reference's way (tiktoken's own rank-file reader): without special tokens for `encode_ordinary`, with
them (allowed_special="all") for `encode`; plus HF's approach (Python regex split on special text, then
BPE per piece) to show what native splitting saves. Target: our `encode` costs <= 1.5x raw
`encode_ordinary`. Last line: JSON, also written to benchmarks/results/tokenizer_cpu.json.
"""
from __future__ import annotations

import argparse
import platform
import random
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import tiktoken
import tiktoken.load

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_name, write_result  # noqa: E402

from glm4v_core.processing.tokenizer import PAT_STR, Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = ROOT / "tests" / "fixtures" / "tokenizer" / "tokenizer.model"
MAX_ENCODE_OVERHEAD = 1.5  # our encode (special-aware) vs raw encode_ordinary

ENGLISH = ("the model reads an image and answers questions about it with a short precise sentence while "
           "tokens flow through forty layers of attention and feed forward blocks quickly").split()
CHINESE = ("我们的模型可以理解图像并回答问题这是一个多模态大语言模型"
           "支持中文和英文对话智谱清华大学人工智能研究")
CODE = ["def forward(self, x: torch.Tensor) -> torch.Tensor:\n", "    return self.proj(F.gelu(x))\n",
        "for i in range(10):\n\tprint(f\"{i:03d}\", end='')\n", "if (a != b && c >= 0) { return -1; }\n",
        "    # shape: (B, T, C)\n", "x = {'key': [1, 2, 3], \"value\": None}\n"]
SPECIALS = ["<|user|>", "<|assistant|>", "<|system|>", "<|observation|>", "<|endoftext|>", "[gMASK]<sop>"]


def make_text(n_bytes: int, seed: int = 0) -> str:
    """Deterministic mixed text of about n_bytes UTF-8 bytes."""
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < n_bytes:
        kind = rng.random()
        if kind < 0.4:
            piece = " ".join(rng.choice(ENGLISH) for _ in range(rng.randint(5, 30))).capitalize() + ". "
        elif kind < 0.7:
            piece = "".join(rng.choice(CHINESE) for _ in range(rng.randint(5, 40))) + "。"
        elif kind < 0.9:
            piece = "".join(rng.choice(CODE) for _ in range(rng.randint(1, 4)))
        elif kind < 0.97:
            piece = f" {rng.randint(0, 10**6)} {rng.random():.5f} -{rng.randint(1, 99)}e{rng.randint(-9, 9)}\n"
        else:
            piece = rng.choice(SPECIALS) + "\n"
        parts.append(piece)
        size += len(piece.encode())
    return "".join(parts)


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def reference_encoding(special_tokens: dict[str, int]) -> tiktoken.Encoding:
    """Raw tiktoken built the way the reference tokenizer builds it (tiktoken's own file reader)."""
    ranks = tiktoken.load.load_tiktoken_bpe(str(VOCAB))
    return tiktoken.Encoding("raw", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=special_tokens)


def python_split_encode(raw: tiktoken.Encoding, special_ids: dict[str, int]) -> Callable[[str], list[int]]:
    """HF slow-tokenizer style: split on special text in Python, BPE each piece."""
    splitter = re.compile("(" + "|".join(map(re.escape, special_ids)) + ")")

    def encode(text: str) -> list[int]:
        ids: list[int] = []
        for part in splitter.split(text):
            ids += [special_ids[part]] if part in special_ids else raw.encode_ordinary(part)
        return ids
    return encode


def measure_load(repeats: int) -> dict[str, float]:
    start = time.perf_counter()
    Tokenizer.from_file(VOCAB)
    first = time.perf_counter() - start
    return {
        "ours_first_s": first,
        "ours_best_s": best_seconds(lambda: Tokenizer.from_file(VOCAB), repeats),
        "reference_style_best_s": best_seconds(lambda: reference_encoding({}), repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=1.0, help="text size in MB (10^6 bytes)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    load = measure_load(args.repeats)
    tok = Tokenizer.from_file(VOCAB)
    raw = reference_encoding({})
    raw_special = reference_encoding(tok.special_ids)  # ids checked against the reference in the tests
    split_encode = python_split_encode(raw, tok.special_ids)
    text = make_text(int(args.mb * 1e6))
    n_bytes = len(text.encode())
    ids = tok.encode(text)
    # Correctness first: every path must produce the same ids, or the timings compare nothing.
    assert ids == raw_special.encode(text, allowed_special="all") == split_encode(text)
    assert tok.encode_ordinary(text) == raw.encode_ordinary(text)
    assert tok.decode(ids) == text

    cases = [  # (operation, provider, fn)
        ("encode_ordinary", "raw tiktoken", lambda: raw.encode_ordinary(text)),
        ("encode_ordinary", "ours", lambda: tok.encode_ordinary(text)),
        ("encode (special)", "raw tiktoken", lambda: raw_special.encode(text, allowed_special="all")),
        ("encode (special)", "ours", lambda: tok.encode(text)),
        ("encode (special)", "python split", lambda: split_encode(text)),
        ("decode", "raw tiktoken", lambda: raw_special.decode(ids)),
        ("decode", "ours", lambda: tok.decode(ids)),
    ]
    rows = []
    for op, provider, fn in cases:
        seconds = best_seconds(fn, args.repeats)
        rows.append({"op": op, "provider": provider, "ms": seconds * 1e3, "mb_per_s": n_bytes / seconds / 1e6})
    ms = {(r["op"], r["provider"]): r["ms"] for r in rows}
    overhead = ms[("encode (special)", "ours")] / ms[("encode_ordinary", "raw tiktoken")]

    print(f"device: cpu ({cpu_name()}), python {platform.python_version()}, tiktoken {tiktoken.__version__}")
    print(f"text: {n_bytes} bytes, {len(text)} chars, {len(ids)} tokens; best of {args.repeats}, single thread")
    print(f"vocabulary load: ours {load['ours_first_s']:.3f} s first, {load['ours_best_s']:.3f} s best; "
          f"reference-style (tiktoken reader) {load['reference_style_best_s']:.3f} s best")
    print(f"{'op':<18} {'provider':<14} {'ms':>9} {'MB/s':>8}")
    for r in rows:
        print(f"{r['op']:<18} {r['provider']:<14} {r['ms']:>9.2f} {r['mb_per_s']:>8.2f}")
    verdict = "ok" if overhead <= MAX_ENCODE_OVERHEAD else "TOO SLOW"
    print(f"our encode / raw encode_ordinary = {overhead:.3f}x (limit {MAX_ENCODE_OVERHEAD}x): {verdict}")

    write_result("tokenizer_cpu", {
        "python": platform.python_version(), "tiktoken": tiktoken.__version__,
        "text_bytes": n_bytes, "text_tokens": len(ids), "repeats": args.repeats,
        "load": load, "rows": rows, "encode_overhead_vs_raw_ordinary": overhead,
        "encode_overhead_limit": MAX_ENCODE_OVERHEAD, "ok": overhead <= MAX_ENCODE_OVERHEAD,
    })


if __name__ == "__main__":
    main()
