"""The command: refused flags in one line (exit 1, 2 for usage), and a real `python -m glm4v_core.serving`
process with --adapter that drains a streamed answer on SIGTERM and exits 0."""
from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

import glm4v_core
from glm4v_core import BUNDLED_CHECKPOINT
from glm4v_core.generation.loop import GenerationStats
from glm4v_core.serving import cli
from glm4v_core.transforms.adapter_files import load_adapters, save_adapters
from glm4v_core.transforms.lora import LoRAConfig, adapter_state, add_lora


def refused(capsys, *argv) -> str:
    assert cli.main(list(argv)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("glm4v serve: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_flags_are_refused_in_one_line(capsys, tmp_path):
    assert "--max-batch must be >= 1, got 0" in refused(capsys, "--max-batch", "0")
    assert "--max-queue must be >= 1" in refused(capsys, "--max-queue", "-1")
    assert "--port must be in 0 .. 65535" in refused(capsys, "--port", "70000")
    assert "--timeout must be a number of seconds > 0, got nan" in refused(capsys, "--timeout", "nan")
    (tmp_path / "file").write_text("x")
    assert "is not a folder" in refused(capsys, "--allow-local-images", str(tmp_path / "file"))
    assert "not a checkpoint folder" in refused(capsys, "--checkpoint", str(tmp_path))
    assert "does not exist" in refused(capsys, "--adapter", str(tmp_path / "missing.safetensors"))
    assert "has no adapter.safetensors" in refused(capsys, "--adapter", str(tmp_path))
    assert "--adapter" in refused(capsys, "--adapter", str(tmp_path / "file"))  # not an adapter file
    with pytest.raises(SystemExit) as usage:
        cli.main(["--no-such-flag"])
    assert usage.value.code == 2


def test_a_port_in_use_is_refused_before_the_weights_load(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        err = refused(capsys, "--port", str(taken.getsockname()[1]))
    assert "cannot listen on --host 127.0.0.1 --port" in err


@pytest.fixture
def adapter_run(tmp_path):
    """A finetune-like OUT folder with random (non-zero) adapters, and the model that has them loaded."""
    model = glm4v_core.load_model(BUNDLED_CHECKPOINT)
    add_lora(model, LoRAConfig(rank=2, alpha=4.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in adapter_state(model).values():
            tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.5)
    (tmp_path / "out").mkdir()
    save_adapters(model, tmp_path / "out" / "adapter.safetensors")
    fresh = glm4v_core.load_model(BUNDLED_CHECKPOINT)
    load_adapters(fresh, tmp_path / "out" / "adapter.safetensors")
    return tmp_path / "out", fresh


def expected_answer(model, text: str, max_tokens: int) -> tuple[str, int]:
    tokenizer = glm4v_core.resolve_tokenizer(None, BUNDLED_CHECKPOINT, model.config)
    inputs = glm4v_core.build_inputs(tokenizer, [{"role": "user", "content": text}], model.config.vision.image_size)
    stats = GenerationStats()
    answer = "".join(glm4v_core.stream_text(model, tokenizer, inputs.input_ids, max_new_tokens=max_tokens,
                                            stats=stats))
    return answer, stats.new_tokens


def start_server(*args: str) -> tuple[subprocess.Popen, str, queue.Queue]:
    """`python -m glm4v_core.serving --port 0 ...`; returns the process, its URL and its stderr lines."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "glm4v_core.serving", "--port", "0", *args], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            assert proc.poll() is None, f"the server exited with {proc.returncode}"
            continue
        if "listening on http://127.0.0.1:" in line:
            return proc, line.split("listening on ")[1].split("/v1")[0], lines
    proc.kill()
    raise AssertionError("the server did not say where it listens within 120 s")


def test_sigterm_drains_the_answer_in_flight_and_exits_0(adapter_run):
    out, model = adapter_run
    text, max_tokens = "Tell me a story", 120
    want, n = expected_answer(model, text, max_tokens)
    assert n == max_tokens and want != expected_answer(glm4v_core.load_model(BUNDLED_CHECKPOINT), text, 120)[0]
    proc, url, lines = start_server("--adapter", str(out), "--timeout", "60")
    try:
        body = {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                "temperature": 0, "stream": True}
        pieces, after_signal = [], 0
        with httpx.Client(trust_env=False, timeout=60) as client, \
                client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                delta = json.loads(line[6:])["choices"][0]["delta"]
                if pieces and not after_signal:
                    proc.send_signal(signal.SIGTERM)  # the answer is in flight: its first text has come
                after_signal += bool(pieces)
                pieces.append(delta.get("content") or "")
        assert "".join(pieces) == want and after_signal > 1
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.ConnectError):  # it took no new connection after draining
            httpx.get(f"{url}/v1/models", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = "".join(lines.queue)
    assert "200 prompt" in log and f"completion {max_tokens} tokens" in log and "stopped" in log, log
