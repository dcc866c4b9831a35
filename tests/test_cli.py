"""The `glm4v` command, run in-process through cli.main (and once as a real subprocess)."""
from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import glm4v_core
from glm4v_core import checkpoint, cli
from glm4v_core.generation.streaming import stream_text
from glm4v_core.parity import cli as parity_cli
from glm4v_core.processing import tokenizer as processing_tokenizer


@pytest.fixture(scope="module")
def tiny_tokenizer(fixtures_dir):
    return processing_tokenizer.truncated_tokenizer(fixtures_dir / "tokenizer" / "tokenizer.model", 801)


def run(capsys, argv, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_generate_on_the_bundled_checkpoint_streams_the_answer(capsys, tiny_tokenizer, fixtures_dir):
    rc, out, err = run(capsys, ["generate", "--max-new-tokens", "12", "Hello, who are you?"])
    assert rc == 0, err
    assert "time to first token" in err and "tok/s" in err
    # the same answer straight from the library, with the tokenizer the CLI builds for the fixture
    model = glm4v_core.load_model(fixtures_dir / "tiny")
    ids = torch.tensor([tiny_tokenizer.apply_chat_template([{"role": "user", "content": "Hello, who are you?"}],
                                                           add_generation_prompt=True)])
    want = "".join(stream_text(model, tiny_tokenizer, ids, max_new_tokens=12))
    assert out == want + "\n"


def test_bundled_tokenizer_is_the_real_vocabulary_cut_to_the_fixture(tiny_tokenizer, fixtures_dir):
    import json
    special = json.loads((fixtures_dir / "tiny" / "reference.json").read_text())["special_tokens"]
    assert {t: tiny_tokenizer.special_ids[t] for t in special} == special
    full = processing_tokenizer.Tokenizer.from_file(fixtures_dir / "tokenizer" / "tokenizer.model")
    text = "Hello, world! 你好"
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text
    assert all(i < 801 for i in tiny_tokenizer.encode(text))
    assert all(full.decode_bytes([i]) == tiny_tokenizer.decode_bytes([i]) for i in range(801))  # a prefix


def test_generate_with_image_and_sampling_flags(capsys, fixtures_dir):
    image = fixtures_dir / "images" / "gradient_rgb_97x61.png"
    argv = ["generate", "--image", str(image), "--max-new-tokens", "8", "--do-sample", "--top-k", "20",
            "--top-p", "0.9", "--temperature", "0.7", "--repetition-penalty", "1.1", "--seed", "3",
            "描述这张图片"]
    rc, out1, err = run(capsys, argv)
    assert rc == 0, err
    rc, out2, _ = run(capsys, argv)
    assert out1 == out2  # --seed makes sampling reproducible


def test_chat_keeps_history_and_the_image_in_the_first_turn(capsys, monkeypatch, fixtures_dir):
    calls = []

    def spy(model, tokenizer, input_ids, pixel_values=None, **kwargs):
        calls.append((input_ids[0].tolist(), pixel_values))
        yield f"answer {len(calls)}"

    monkeypatch.setattr(cli, "stream_text", spy)
    image = fixtures_dir / "images" / "gray_L_50x80.png"
    rc, out, err = run(capsys, ["chat", "--image", str(image)], stdin="first question\nsecond\n\nignored\n",
                       monkeypatch=monkeypatch)
    assert rc == 0, err
    assert out == "answer 1\nanswer 2\n"
    (first, pixels1), (second, pixels2) = calls
    assert second[:len(first)] == first  # turn 2 re-encodes turn 1, then the answer, then the new question
    tok = processing_tokenizer.truncated_tokenizer(fixtures_dir / "tokenizer" / "tokenizer.model", 801)
    assert tok.decode(second[len(first):]) == "\nanswer 1<|user|>\nsecond<|assistant|>"
    assert second.count(tok.special_ids["<|begin_of_image|>"]) == 1
    assert torch.equal(pixels1, pixels2) and pixels1.shape == (1, 3, 56, 56)  # the image stays in turn 1


@pytest.mark.parametrize("stdin", ["exit\nmore\n", "", "quit", "/exit\nmore\n", "/quit"])
def test_chat_ends_on_exit_or_eof(capsys, monkeypatch, stdin):
    monkeypatch.setattr(cli, "stream_text", lambda *a, **k: iter(["never"]))
    rc, out, _ = run(capsys, ["chat"], stdin=stdin, monkeypatch=monkeypatch)
    assert rc == 0 and out == ""


def test_chat_runs_the_model(capsys, monkeypatch):
    rc, out, err = run(capsys, ["chat", "--max-new-tokens", "5"], stdin="hi\nagain\n", monkeypatch=monkeypatch)
    assert rc == 0, err
    assert err.count("time to first token") == 2 and out.count("\n") >= 2


def test_parity_subcommand_forwards_its_arguments(monkeypatch):
    pass
    seen = []
    monkeypatch.setattr(parity_cli, "main", lambda argv=None, prog=None: seen.append(argv) or 7)
    assert cli.main(["parity", "--dtype", "bfloat16", "--json"]) == 7
    assert seen == [["--dtype", "bfloat16", "--json"]]


# -- errors: a clear message, exit code 1, before the weights are loaded ----------------------------

@pytest.fixture
def no_model_load(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the weights were loaded before the error was found")
    monkeypatch.setattr(cli, "load_model", forbidden)


def test_unreadable_image(capsys, tmp_path, no_model_load):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    rc, _, err = run(capsys, ["generate", "--image", str(bad), "hi"])
    assert rc == 1 and "glm4v: error:" in err and "broken.png" in err
    rc, _, err = run(capsys, ["generate", "--image", str(tmp_path / "missing.jpg"), "hi"])
    assert rc == 1 and "missing.jpg not found" in err


def test_empty_prompt(capsys, no_model_load):
    rc, _, err = run(capsys, ["generate", "  "])
    assert rc == 1 and "prompt is empty" in err


def test_missing_checkpoint(capsys, tmp_path, no_model_load):
    rc, _, err = run(capsys, ["generate", "--checkpoint", str(tmp_path), "hi"])
    assert rc == 1 and "no config.json" in err


def test_missing_bundled_checkpoint(capsys, tmp_path, monkeypatch, no_model_load):
    monkeypatch.setattr(checkpoint, "BUNDLED_CHECKPOINT", tmp_path / "gone")
    rc, _, err = run(capsys, ["generate", "hi"])
    assert rc == 1 and "bundled demo checkpoint" in err and "--checkpoint" in err


def test_tokenizer_that_does_not_fit_the_checkpoint(capsys, fixtures_dir, no_model_load):
    full = fixtures_dir / "tokenizer" / "tokenizer.model"  # real ids (151329+) vs the tiny fixture's (801+)
    rc, _, err = run(capsys, ["generate", "--tokenizer", str(full), "hi"])
    assert rc == 1 and "does not fit the checkpoint" in err and "151329" in err


def test_bad_max_new_tokens(capsys, no_model_load):
    rc, _, err = run(capsys, ["generate", "--max-new-tokens", "0", "hi"])
    assert rc == 1 and "--max-new-tokens" in err


def test_prompt_longer_than_the_context(capsys):
    rc, out, err = run(capsys, ["generate", "--max-new-tokens", "4", " ".join(["word"] * 9000)])
    assert rc == 1 and "context of 8192" in err and out == ""


def test_bad_sampling_flag(capsys, no_model_load):
    rc, _, err = run(capsys, ["generate", "--do-sample", "--temperature", "0", "hi"])
    assert rc == 1 and "temperature" in err


def test_console_script_in_a_subprocess(tmp_path):
    script = shutil.which("glm4v") or str(Path(sys.executable).parent / "glm4v")
    argv = [script] if Path(script).exists() else [sys.executable, "-m", "glm4v_core"]
    proc = subprocess.run([*argv, "generate", "--max-new-tokens", "6", "Hi"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "time to first token" in proc.stderr


@pytest.mark.parametrize("device, message", [("bogus", "unknown device 'bogus'"),
                                             ("cuda:7", "cuda:7")])
def test_bad_device(capsys, no_model_load, device, message):
    rc, _, err = run(capsys, ["generate", "--device", device, "hi"])
    assert rc == 1 and message in err and "Traceback" not in err


def test_empty_stop_string(capsys, no_model_load):
    rc, _, err = run(capsys, ["generate", "--stop", "", "hi"])
    assert rc == 1 and "--stop needs a non-empty text" in err


def test_chat_turn_error_keeps_the_session(capsys, monkeypatch):
    from glm4v_core.model.splice import InputError
    turns = []

    def answer_or_fail(model, tokenizer, input_ids, pixel_values=None, **kwargs):
        turns.append(input_ids[0].tolist())
        if len(turns) == 1:
            raise InputError("prompt of 9000 tokens exceeds the model's context")
        yield "fine"

    monkeypatch.setattr(cli, "stream_text", answer_or_fail)
    rc, out, err = run(capsys, ["chat"], stdin="too long\nshort\n", monkeypatch=monkeypatch)
    assert rc == 0 and out == "fine\n" and "exceeds the model's context" in err
    assert len(turns[1]) < len(turns[0])  # the failed turn did not stay in the history


def test_the_torch_free_choices_are_the_librarys():
    """The command modules name the choices without importing torch; they must stay the library's."""
    from glm4v_core.training import cli as training_cli
    from glm4v_core.training import config as training_config
    from glm4v_core.training import data as training_data
    assert cli.DTYPE_NAMES == tuple(checkpoint.DTYPES)
    assert training_cli.SCHEDULES == training_config.SCHEDULES
    assert training_cli.DTYPE_CHOICES == training_config.DTYPE_CHOICES
    assert training_cli.TRAIN_ON == training_data.TRAIN_ON
    assert training_cli.ON_BAD_RECORD == training_data.ON_BAD_RECORD


def test_chat_help_command_and_unknown_command_reach_no_model(capsys, monkeypatch):
    monkeypatch.setattr(cli, "stream_text", lambda *a, **k: iter(["never"]))
    rc, out, err = run(capsys, ["chat"], stdin="/help\n/nope\n", monkeypatch=monkeypatch)
    assert rc == 0 and out == ""
    assert "/image PATH" in err and "glm4v: unknown command /nope; /help lists them" in err
