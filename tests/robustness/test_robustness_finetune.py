"""`glm4v finetune` refuses what it cannot honour before it writes anything, and stops cleanly.

- --out is checked completely up front: a folder holding a previous run's files is refused unless
  --resume continues that run; a file, a dangling link or a place that cannot be written is
  refused; the user's files are left exactly as they were.
- One writer per --out: the run holds the destination lock the converter takes; a second run
  (or a glm4v-convert) on the same folder is refused, naming the other process.
- Numbers that mean nothing (non-finite, negative, a LoRA rank above the layer it wraps) are
  refused before training; a non-finite loss or gradient stops the run without applying that
  step, keeps the last finite state as a checkpoint, and loss.jsonl stays strict JSON.
- SIGTERM and SIGHUP stop the command as Ctrl-C does (checkpoint saved, exit 143 / 129), with
  real processes, and --resume continues from there.
- Any other error during training (out of memory, a named error, in a step or the held-out
  evaluation) saves the last completed step first, when the state in memory is one, and is one
  line naming that checkpoint; --resume continues the curve exactly.
- What a SIGKILLed write leaves (a hidden staging folder or file) is removed and reported by the
  next run on that folder, never a look-alike of the user's; --resume never picks it.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers.paths import FIXTURES, ROOT
from safetensors.torch import load_file

from glm4v_core.errors import GLM4VError
from glm4v_core.model.glm4v import GLM4V
from glm4v_core.training import cli as training_cli
from glm4v_core.training import trainer as training_trainer
from glm4v_core.training.config import FinetuneConfig, FinetuneError
from glm4v_core.training.state import read_log

DATA = FIXTURES / "finetune" / "train.jsonl"
EVAL = FIXTURES / "finetune" / "eval.jsonl"
TINY = FIXTURES / "tiny"
WAIT_S = 120  # bound on every wait for a subprocess
# steps of a run a test stops with a signal: many minutes of steps, yet few enough that its
# checkpoints (~400 KB every 10 steps) fit the free-space check on a nearly full disk
LONG_RUN = "5000"


def finetune(out: Path, *args: str, data: Path = DATA) -> int:
    return training_cli.main(["--data", str(data), "--out", str(out), "--no-progress", *args])


def snapshot(folder: Path) -> dict:
    """Every path under `folder` (itself included) with its kind, bytes and mtime."""
    if not (folder.exists() or folder.is_symlink()):
        return {}
    found = {}
    for path in [folder, *sorted(folder.rglob("*"))] if folder.is_dir() else [folder]:
        st = path.lstat()
        data = path.read_bytes() if path.is_file() and not path.is_symlink() else None
        found[str(path)] = (st.st_mode, st.st_mtime_ns, data)
    return found


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("glm4v finetune: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture
def no_training(monkeypatch):
    """A refusal must come before the first step: a step taken is a failure."""
    def refuse(self):
        raise AssertionError("a training step ran before the refusal")
    monkeypatch.setattr(training_trainer.Trainer, "train_step", refuse)


def strict_json_lines(path: Path) -> list[dict]:
    def refuse(token):
        raise AssertionError(f"{path} holds the non-JSON token {token}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines() if line.strip()]


# -- 1. --out checked completely before anything is written --------------------------------------

def _previous_run(out: Path) -> None:
    out.mkdir()
    (out / "loss.jsonl").write_text('{"step": 1, "loss": 2.5}\n')


def _only_checkpoints_folder(out: Path) -> None:
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "notes.txt").write_text("mine")


def _adapter(out: Path) -> None:
    out.mkdir()
    (out / "adapter.safetensors").write_bytes(b"someone's adapter")


def _merged_folder(out: Path) -> None:
    (out / "merged").mkdir(parents=True)
    (out / "merged" / "photo.jpg").write_bytes(b"not a checkpoint")


def _model_file(out: Path) -> None:
    out.mkdir()
    (out / "model").write_text("a file named model")


def _out_is_a_file(out: Path) -> None:
    out.write_text("a file, not a folder")


def _out_is_a_dangling_link(out: Path) -> None:
    out.symlink_to(out.parent / "nowhere")


def _parent_is_a_file(out: Path) -> None:
    out.parent.write_text("x")


OUT_CASES = {  # name: (make the case, the --out to pass relative to tmp, extra args, words in the message)
    "old loss.jsonl": (_previous_run, "out", [], ["loss.jsonl", "previous run", "choose another --out"]),
    "checkpoints/": (_only_checkpoints_folder, "out", [], ["checkpoints", "previous run"]),
    "adapter.safetensors": (_adapter, "out", [], ["adapter.safetensors", "previous run"]),
    "merged/ not a checkpoint": (_merged_folder, "out", ["--save-merged"], ["merged", "previous run"]),
    "model is a file": (_model_file, "out", ["--lora-rank", "0"], ["model", "previous run"]),
    "out is a file": (_out_is_a_file, "out", [], ["is a file, not a folder"]),
    "out is a dangling link": (_out_is_a_dangling_link, "out", [], ["dangling symbolic link"]),
    "a file above out": (_parent_is_a_file, "file/out", [], ["is a file", "cannot hold"]),
}


@pytest.mark.parametrize("case", list(OUT_CASES))
def test_out_is_refused_up_front_and_left_untouched(tmp_path, capsys, no_training, case):
    make, out_name, extra, words = OUT_CASES[case]
    out = tmp_path / out_name
    make(out)
    before = snapshot(tmp_path)
    assert finetune(out, "--max-steps", "1", *extra) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "--out" in line and all(w in line for w in words), line
    assert snapshot(tmp_path) == before  # nothing emptied, replaced, created or removed


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permissions")
def test_out_without_write_permission_is_refused_up_front(tmp_path, capsys, no_training):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert finetune(locked / "out", "--max-steps", "1") == 1
        assert "no permission to write" in one_error_line(capsys.readouterr().err)
    finally:
        locked.chmod(0o700)


def test_out_on_a_file_system_without_storage_is_refused_up_front(capsys, no_training):
    assert finetune(Path("/proc/glm4v-finetune-out"), "--max-steps", "1") == 1
    line = one_error_line(capsys.readouterr().err)
    assert "--out /proc/glm4v-finetune-out" in line and "cannot" in line, line


def test_unrelated_files_in_out_are_kept_and_resume_elsewhere_needs_a_fresh_out(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.txt").write_text("my notes")  # not a run's file: allowed, kept
    assert finetune(out, "--max-steps", "2", "--save-every", "1") == 0
    assert (out / "README.txt").read_text() == "my notes"
    other = tmp_path / "other"
    _previous_run(other)
    before = snapshot(other)
    # resuming `out`'s checkpoint into a folder that holds another run's files: refused
    assert finetune(other, "--max-steps", "2", "--save-every", "1", "--resume",
                    str(out / "checkpoints" / "step-000001")) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "--out" in line and "loss.jsonl" in line and "--resume" in line, line
    assert snapshot(other) == before
    # resuming in place continues the run
    assert finetune(out, "--max-steps", "2", "--save-every", "1", "--resume",
                    str(out / "checkpoints" / "step-000001")) == 0
    assert [r["step"] for r in read_log(out / "loss.jsonl")[0]] == [1, 2]


# -- 2. one writer per --out ----------------------------------------------------------------------

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from glm4v_conversion.atomic import destination_lock
    with destination_lock(Path(sys.argv[1]).resolve()):
        print("locked", flush=True)
        time.sleep(120)
""")


def start_finetune(out: Path, *args: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "glm4v_core", "finetune", "--data", str(DATA), "--out", str(out), "--no-progress",
            *args]
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, what: str) -> None:
    end = time.monotonic() + WAIT_S
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            out, err = proc.communicate(timeout=WAIT_S)
            pytest.fail(f"{what} never appeared: rc={proc.returncode}\n{err[-3000:]}")
        time.sleep(0.02)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=WAIT_S)
        pytest.fail(f"the run did not stop on {signal.Signals(sig).name}:\n{err[-3000:]}")
    return proc.returncode, err


@pytest.mark.parametrize("holder", ["a running glm4v finetune", "a glm4v-convert's lock"])
def test_a_second_run_on_the_same_out_is_refused_naming_the_first(tmp_path, capsys, no_training, holder):
    out = tmp_path / "out"
    if holder == "a running glm4v finetune":
        first = start_finetune(out, "--max-steps", LONG_RUN, "--save-every", "10")
        wait_for(out / "checkpoints" / "step-000010", first, "the first run's checkpoint")
        lock = tmp_path / ".out.lock"
        assert lock.read_text().strip() == str(first.pid)  # held for the whole run, not only while saving
        first.send_signal(signal.SIGSTOP)  # paused (still holding the lock): its own writes must not race the snapshot
    else:
        first = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
        assert first.stdout.readline().strip() == "locked"
    try:
        before = snapshot(out)
        assert finetune(out, "--max-steps", "1") == 1
        line = one_error_line(capsys.readouterr().err)
        assert f"pid {first.pid}" in line and "another process" in line and "--out" in line, line
        assert snapshot(out) == before
    finally:
        first.send_signal(signal.SIGCONT)
        first.terminate()
        first.communicate(timeout=WAIT_S)
    if holder == "a running glm4v finetune":
        assert first.returncode == 143
        assert not (tmp_path / ".out.lock").exists()  # given back when the run ends


# -- 3. numbers that mean nothing ------------------------------------------------------------------

BAD_NUMBERS = [
    (["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "-0.001"], "--lr"),
    (["--lora-alpha", "nan"], "--lora-alpha"), (["--lora-alpha", "inf"], "--lora-alpha"),
    (["--lora-alpha", "0"], "--lora-alpha"), (["--lora-alpha", "-16"], "--lora-alpha"),
    (["--lora-dropout", "1"], "--lora-dropout"), (["--lora-dropout", "-0.1"], "--lora-dropout"),
    (["--lora-dropout", "nan"], "--lora-dropout"),
    (["--max-grad-norm", "nan"], "--max-grad-norm"), (["--max-grad-norm", "-1"], "--max-grad-norm"),
    (["--max-grad-norm", "inf"], "--max-grad-norm"),
    (["--weight-decay", "nan"], "--weight-decay"), (["--weight-decay", "-0.01"], "--weight-decay"),
    (["--weight-decay", "inf"], "--weight-decay"),
    (["--max-length", "0"], "--max-length"), (["--max-length", "-5"], "--max-length"),
    # the k and v parts of the decoder's fused qkv have 64 outputs in the tiny model
    (["--lora-rank", "65"], "--lora-rank 65"),
    (["--lora-rank", "129", "--lora-shared-fused"], "--lora-rank 129"),  # shared: qkv 128 in, 256 out
    (["--lora-rank", "129", "--train", "projector"], "--lora-rank 129"),
]


@pytest.mark.parametrize("args,flag", BAD_NUMBERS, ids=[" ".join(a) for a, _ in BAD_NUMBERS])
def test_meaningless_numbers_are_refused_before_anything_is_written(tmp_path, capsys, no_training, args, flag):
    out = tmp_path / "out"
    assert finetune(out, "--max-steps", "1", *args) == 1
    line = one_error_line(capsys.readouterr().err)
    assert flag in line and args[1] in line, line
    assert not out.exists() and os.listdir(tmp_path) == []


def test_the_python_api_refuses_them_too(tmp_path):
    with pytest.raises(FinetuneError, match="--lr"):
        FinetuneConfig(data=DATA, out=tmp_path / "o", lr=float("nan"))
    with pytest.raises(FinetuneError, match="--lora-rank 65"):
        training_trainer.Trainer(FinetuneConfig(data=DATA, out=tmp_path / "o", lora_rank=65))
    assert os.listdir(tmp_path) == []


def test_the_largest_rank_that_fits_is_accepted(tmp_path):
    assert finetune(tmp_path / "out", "--max-steps", "1", "--lora-rank", "64") == 0


class InfiniteGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def poison(monkeypatch, what: str, at_call: int, training: bool = True) -> None:
    """GLM4V's loss turns non-finite (or its gradient infinite) from its `at_call`-th call on."""
    real, calls = GLM4V.forward, []

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if out.loss is not None and self.training == training:
            calls.append(1)
            if len(calls) >= at_call:
                out.loss = {"nan": lambda x: x * math.nan, "inf": lambda x: x * math.inf,
                            "gradient": InfiniteGradient.apply}[what](out.loss)
        return out
    monkeypatch.setattr(GLM4V, "forward", forward)


@pytest.mark.parametrize("what,save_every,extra", [("nan", "0", []), ("inf", "2", []),
                                                   ("gradient", "0", []), ("nan", "0", ["--lora-rank", "0"])],
                         ids=["nan loss", "inf loss, checkpoint already there", "inf gradient", "nan, full"])
def test_a_non_finite_step_stops_the_run_keeping_the_last_finite_state(tmp_path, capsys, monkeypatch, what,
                                                                       save_every, extra):
    out = tmp_path / "out"
    args = ["--max-steps", "4", "--lr", "1e-2", "--save-every", save_every, *extra]
    poison(monkeypatch, what, at_call=3)  # step 3's forward (one micro-batch per step)
    assert finetune(out, *args) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "step 3" in line and ("gradient" if what == "gradient" else f"loss is {what}") in line, line
    assert "not applied" in line and "step-000002" in line and f"--resume {out}" in line, line
    records = strict_json_lines(out / "loss.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    trained = load_file(out / "checkpoints" / "step-000002" / "trainable.safetensors")
    assert all(torch.isfinite(t).all() for t in trained.values())
    assert not (out / "adapter.safetensors").exists() and not (out / "model").exists()
    monkeypatch.undo()  # the cause gone, the run continues from the kept state
    assert finetune(out, *args, "--resume", str(out)) == 0
    assert [r["step"] for r in strict_json_lines(out / "loss.jsonl")] == [1, 2, 3, 4]


def test_a_non_finite_held_out_loss_is_logged_as_strict_json(tmp_path, monkeypatch, capsys):
    poison(monkeypatch, "nan", at_call=1, training=False)
    out = tmp_path / "out"
    assert finetune(out, "--max-steps", "2", "--eval-data", str(EVAL)) == 0
    evals = [r for r in strict_json_lines(out / "loss.jsonl") if "eval_loss" in r]
    assert evals == [{"step": 2, "eval_loss": "nan", "eval_tokens": evals[0]["eval_tokens"]}]
    assert math.isnan(read_log(out / "loss.jsonl")[1][0]["eval_loss"])  # read back as a float
    assert "held-out loss nan" in capsys.readouterr().err


def test_the_python_api_raises_a_finetune_error_for_a_non_finite_step(tmp_path, monkeypatch):
    poison(monkeypatch, "nan", at_call=1)
    trainer = training_trainer.Trainer(FinetuneConfig(data=DATA, out=tmp_path / "out", max_steps=2, progress=False))
    with pytest.raises(FinetuneError, match=r"step 1: the training loss is nan.*step-000000"):
        trainer.run()
    assert [r["step"] for r in strict_json_lines(tmp_path / "out" / "loss.jsonl")] == []


# -- 4. SIGTERM / SIGHUP stop like Ctrl-C ----------------------------------------------------------

SIGNALS = [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "stopped by SIGTERM"),
           (signal.SIGHUP, 129, "stopped by SIGHUP")]


def checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))


@pytest.mark.parametrize("sig,code,words", SIGNALS, ids=[s.name for s, _, _ in SIGNALS])
def test_a_signal_saves_a_checkpoint_and_resume_continues(tmp_path, sig, code, words):
    out = tmp_path / "out"
    args = ["--max-steps", LONG_RUN, "--save-every", "10", "--lr", "1e-3"]
    proc = start_finetune(out, *args)
    wait_for(out / "checkpoints" / "step-000010", proc, "the first checkpoint")
    rc, err = stop(proc, sig)
    assert rc == code and words in err and f"--resume {out}" in err and "Traceback" not in err, err
    steps = [r["step"] for r in read_log(out / "loss.jsonl")[0]]
    last = checkpoints(out)[-1]
    assert steps == list(range(1, last + 1)) and last >= 10  # the log ends at the saved step
    assert f"step-{last:06d}" in err
    assert not (tmp_path / ".out.lock").exists()

    resumed = start_finetune(out, *args, "--resume", str(out))
    wait_for(out / "checkpoints" / f"step-{(last // 10 + 1) * 10:06d}", resumed, "a checkpoint after the resume")
    rc, err = stop(resumed, signal.SIGTERM)
    assert rc == 143 and f"resumed from {out / 'checkpoints' / f'step-{last:06d}'} at step {last}" in err, err
    steps = [r["step"] for r in read_log(out / "loss.jsonl")[0]]
    assert steps == list(range(1, checkpoints(out)[-1] + 1))


def test_sighup_stays_ignored_under_nohup(tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "glm4v_core", "finetune", "--data", str(DATA), "--out", str(out), "--no-progress",
            "--max-steps", LONG_RUN, "--save-every", "10"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    wait_for(out / "checkpoints" / "step-000010", proc, "the first checkpoint")
    proc.send_signal(signal.SIGHUP)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=2)  # still running: the hangup was ignored, as nohup asked
    rc, err = stop(proc, signal.SIGTERM)
    assert rc == 143, err


# -- 5. any other error during training keeps the last completed step -----------------------------

class Refused(GLM4VError):
    """Stands for any named error a step can meet (a label, a file, a device)."""


OOM = "CUDA out of memory. Tried to allocate 2.00 GiB.\nGPU 0 has a total capacity of 79.1 GiB"
ARGS = ["--max-steps", "4", "--lr", "1e-2", "--eval-data", str(EVAL)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict]:
    """The reference curve: the same run with nothing going wrong."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert finetune(out, *ARGS) == 0
    return strict_json_lines(out / "loss.jsonl")


def fail_collate(monkeypatch, at_call: int, error: Exception) -> None:
    """The trainer's `at_call`-th batch (one per step here; the held-out set is one more) raises."""
    real, calls = training_trainer.collate, []

    def collate(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            raise error
        return real(*args, **kwargs)
    monkeypatch.setattr(training_trainer, "collate", collate)


def fail_update(monkeypatch, at_call: int) -> None:
    real, calls = torch.optim.AdamW.step, []

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            raise RuntimeError(OOM)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)


ERRORS = {  # case: (make it fail, extra args, words in the line, the checkpoints left, the log's steps)
    "out of memory in step 3": (lambda mp: fail_collate(mp, 3, RuntimeError(OOM)), [],
                                ["step 3 failed: RuntimeError: CUDA out of memory", "saved the last completed step 2",
                                 "step-000002"], ["step-000002"], [1, 2]),
    "a named error in step 2, step 1 saved": (lambda mp: fail_collate(mp, 2, Refused("bad label in record 7")),
                                              ["--save-every", "1"],
                                              ["step 2 failed: Refused: bad label in record 7", "step-000001"],
                                              ["step-000001"], [1]),
    "the held-out evaluation": (lambda mp: fail_collate(mp, 3, RuntimeError(OOM)), ["--eval-every", "2"],
                                ["held-out evaluation at step 2 failed: RuntimeError", "step-000002"],
                                ["step-000002"], [1, 2]),
    "step 1: nothing to save": (lambda mp: fail_collate(mp, 1, RuntimeError(OOM)), [],
                                ["step 1 failed", "no step had completed, so no checkpoint was written"], [], []),
    "the update of step 2": (lambda mp: fail_update(mp, 2), ["--save-every", "1"],
                             ["applying step 2 failed", "no checkpoint was written", "not a whole step",
                              "the latest is", "step-000001"], ["step-000001"], [1]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_an_error_during_training_saves_the_last_completed_step(tmp_path, capsys, monkeypatch, uninterrupted, case):
    make, extra, words, kept, steps = ERRORS[case]
    out = tmp_path / "out"
    make(monkeypatch)
    assert finetune(out, *ARGS, *extra) == 1
    line = one_error_line(capsys.readouterr().err)
    assert all(w in line for w in words), line
    assert [r["step"] for r in strict_json_lines(out / "loss.jsonl") if "loss" in r] == steps
    found = sorted(p.name for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").exists() else []
    assert found == kept
    assert not (out / "adapter.safetensors").exists()
    monkeypatch.undo()
    if not kept:
        return
    assert f"--resume {out}" in line, line
    assert finetune(out, *ARGS, *extra, "--resume", str(out)) == 0  # the cause gone, the run continues
    resumed = [r for r in strict_json_lines(out / "loss.jsonl") if "loss" in r]
    reference = [r for r in uninterrupted if "loss" in r]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]  # bit for bit on CPU


# -- 6. a killed checkpoint write is cleaned up by the next run -------------------------------------

# `glm4v finetune` that SIGKILLs itself while it writes the file whose path matches argv[1]: half of
# the file written, then no clean-up can run (what a power cut or the OOM killer leaves).
KILLED_WRITE = textwrap.dedent("""
    import os, re, signal, sys
    from glm4v_core.transforms import adapter_files as lora
    from glm4v_core.training.cli import main
    real = lora.save_file
    def save_file(tensors, filename, metadata=None):
        if re.search(sys.argv[1], str(filename)):
            with open(filename, "wb") as f:
                f.write(b"half a safetensors file")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(tensors, filename, metadata=metadata)
    lora.save_file = save_file
    sys.exit(main(sys.argv[2:]))
""")

KILLS = {  # case: (the file being written when killed, what is left, the step a resume continues from)
    "mid checkpoint": (r"\.step-000002\.partial-[0-9a-f]{8}/\.optimizer", r"checkpoints/\.step-000002\.partial-", 1),
    "mid adapter file": (r"/\.adapter\.safetensors\.[0-9a-f]{8}\.tmp$", r"\.adapter\.safetensors\.[0-9a-f]{8}\.tmp", 3),
    "mid first checkpoint": (r"\.step-000001\.partial-", r"checkpoints/\.step-000001\.partial-", None),
}


def run_killed(out: Path, pattern: str, *args: str) -> None:
    argv = [sys.executable, "-c", KILLED_WRITE, pattern, "--data", str(DATA), "--out", str(out), "--no-progress", *args]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


@pytest.mark.parametrize("case", list(KILLS))
def test_leftovers_of_a_killed_write_are_removed_by_the_next_run(tmp_path, capsys, case):
    pattern, left, resumes_at = KILLS[case]
    out = tmp_path / "out"
    args = ["--max-steps", "3", "--save-every", "1", "--lr", "1e-2"]
    run_killed(out, pattern, *args)
    leftovers = [str(p.relative_to(out)) for p in out.rglob(".*")]
    assert any(re.fullmatch(left + ".*", n) for n in leftovers), leftovers
    # what looks like ours but is not: kept
    (out / "checkpoints" / ".step-000009.partial-deadbeef").mkdir()
    (out / "checkpoints" / ".step-000009.partial-deadbeef" / "photo.jpg").write_bytes(b"mine")
    (out / ".notes.0123abcd.tmp").write_text("mine")
    mine = snapshot(out / "checkpoints" / ".step-000009.partial-deadbeef") | snapshot(out / ".notes.0123abcd.tmp")
    code = finetune(out, *args, "--resume", str(out))
    err = capsys.readouterr().err
    if resumes_at is None:  # nothing complete to resume: refused, naming the unfinished write
        assert code == 1
        line = one_error_line(err)
        assert "no checkpoint there" in line and ".step-000001.partial-" in line and "killed" in line, line
        return
    assert code == 0, err
    removed = [line for line in err.splitlines() if line.startswith("removed ")]
    assert len(removed) == 1 and "earlier run that was killed" in removed[0] and re.search(left, removed[0]), err
    assert f"resumed from {out / 'checkpoints' / f'step-{resumes_at:06d}'} at step {resumes_at}" in err, err
    hidden = sorted(str(p.relative_to(out)) for p in out.rglob(".*"))
    assert hidden == [".notes.0123abcd.tmp", "checkpoints/.step-000009.partial-deadbeef"], hidden
    assert snapshot(out / "checkpoints" / ".step-000009.partial-deadbeef") | snapshot(out / ".notes.0123abcd.tmp") \
        == mine
    assert [r["step"] for r in strict_json_lines(out / "loss.jsonl")] == [1, 2, 3]
    assert (out / "adapter.safetensors").is_file()
