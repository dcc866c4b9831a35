"""What `glm4v finetune` prints: a start line saying what is trained, a closing line naming the
files written, other lines through the progress bar, and the same lines under --fsdp 2."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tqdm
from helpers.paths import FIXTURES, ROOT

from glm4v_core import BUNDLED_CHECKPOINT
from glm4v_core.training import cli as training_cli

DATA = FIXTURES / "finetune"
ARGS = ["--data", str(DATA / "train.jsonl"), "--eval-data", str(DATA / "eval.jsonl"), "--max-steps", "2",
        "--batch-size", "2", "--eval-every", "1", "--save-every", "1", "--save-merged", "--no-progress"]
NUMBER = re.compile(r"\d+\.\d+")


def console(out: Path, *args: str) -> list[str]:
    argv = [sys.executable, "-m", "glm4v_core", "finetune", "--out", str(out), *ARGS, *args]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == ""
    return [line.replace(str(out), "OUT") for line in proc.stderr.splitlines() if line.strip()]


def test_one_process_and_fsdp_print_the_same_lines(tmp_path):
    one, two = console(tmp_path / "one"), console(tmp_path / "two", "--fsdp", "2")
    assert one[0] == (f"training LoRA adapters of rank 8 (alpha 16) on the decoder of {BUNDLED_CHECKPOINT}"
                      f": 3 samples of {DATA / 'train.jsonl'} (+ 1 held-out of {DATA / 'eval.jsonl'}), 2 steps, "
                      "into OUT")
    assert [NUMBER.sub("#", line) for line in one] == [
        one[0], "step 1: held-out loss # over 9 tokens", "step 2: held-out loss # over 9 tokens",
        "done at step 2: final loss #, held-out #; wrote OUT/loss.jsonl, OUT/checkpoints/step-000002, "
        "OUT/adapter.safetensors, OUT/merged, OUT/loss.png"]
    # rank 0 alone prints, the same lines; the numbers agree within the float rounding of the sharded sums
    assert [NUMBER.sub("#", line) for line in two] == [NUMBER.sub("#", line) for line in one]
    for a, b in zip(one, two, strict=True):
        assert [float(x) for x in NUMBER.findall(b)] == pytest.approx([float(x) for x in NUMBER.findall(a)], abs=2e-4)


def test_lines_during_training_go_through_the_progress_bar(tmp_path, monkeypatch, capsys):
    """A held-out loss printed while the bar is drawn goes through tqdm.write (the bar is cleared,
    the line printed, the bar redrawn below it): a plain print would land in the middle of the bar."""
    through_bar = []
    monkeypatch.setattr(tqdm.tqdm, "write", classmethod(lambda cls, s, file=None, end="\n", nolock=False:
                                                        through_bar.append(s)))
    args = ["--data", str(DATA / "train.jsonl"), "--eval-data", str(DATA / "eval.jsonl"), "--max-steps", "3",
            "--eval-every", "1", "--lora-rank", "0", "--train", "projector"]
    assert training_cli.main(["--out", str(tmp_path / "out"), *args]) == 0
    err = capsys.readouterr().err
    assert [NUMBER.sub("#", line) for line in through_bar] == [f"step {k}: held-out loss # over 9 tokens"
                                                                for k in (1, 2)]
    assert "training the full weights of the projector of " in err and "step 3: held-out loss" in err  # after the bar
    assert "OUT" not in err and f"{tmp_path / 'out' / 'model'}" in err.splitlines()[-1]
