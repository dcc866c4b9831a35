"""`glm4v generate|chat|parity` flags: --tp values refused before any rank starts, --version and the
defaults in --help, sampling flags without --do-sample, and a stdout that cannot take the output."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from glm4v_conversion import __version__
from glm4v_core import cli
from glm4v_core.generation.sampling import Sampling
from glm4v_core.parity import run as parity_run
from glm4v_core.transforms import distributed


def run(capsys, argv):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def nothing_runs(monkeypatch):
    """No rank is started and no weights are loaded: the error has to come before."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a rank was started (or the weights loaded) before the error was found")
    monkeypatch.setattr(distributed, "run_ranks", forbidden)
    monkeypatch.setattr(cli, "load_model", forbidden)
    monkeypatch.setattr(parity_run, "load_model", forbidden)


# --- --tp: a number of ranks, and a degree the model's heads and KV groups can be split by -----------------

AT_LEAST_ONE = "--tp must be >= 1 (the number of tensor-parallel ranks), got "
TINY_HEADS = "--tp 3 cannot split the model: tensor-parallel degree 3 must divide the model's query heads"
TINY_GROUPS = "--tp 4 cannot split the model: tensor-parallel degree 4 must divide the model's KV groups"


@pytest.mark.parametrize("argv, words", [
    (["generate", "--tp", "0", "hi"], AT_LEAST_ONE + "0"),
    (["generate", "--tp", "-2", "hi"], AT_LEAST_ONE + "-2"),
    (["parity", "--tp", "0"], AT_LEAST_ONE + "0"),
    (["parity", "--tp", "-1"], AT_LEAST_ONE + "-1"),
    (["parity", "--grads", "--fsdp", "0"], "--fsdp must be >= 1 (the number of FSDP ranks), got 0"),
    (["generate", "--tp", "3", "hi"], TINY_HEADS + " (num_attention_heads) = 4; degrees that fit: 1, 2"),
    (["generate", "--tp", "4", "hi"], TINY_GROUPS + " (multi_query_group_num) = 2; degrees that fit: 1, 2"),
    (["parity", "--tp", "3"], TINY_HEADS),
    (["parity", "--tp", "4"], TINY_GROUPS),
])
def test_a_tp_degree_that_cannot_run_is_refused_before_any_rank_starts(capsys, nothing_runs, argv, words):
    rc, out, err = run(capsys, argv)
    prog = "glm4v parity" if argv[0] == "parity" else "glm4v"
    assert rc == 1 and err.startswith(f"{prog}: error: ") and words in err, err
    assert len(err.splitlines()) == 1 and out == ""


# --- --version, every default in --help, the in-chat commands -------------------------------------------------

@pytest.mark.parametrize("command", ["generate", "chat"])
def test_version_works_on_each_command(capsys, command):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"glm4v {command} {__version__}\n"


def subcommand(name: str):
    (commands,) = [a for a in cli.build_parser()._actions if a.dest == "command"]
    return commands.choices[name]


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_every_flag_shows_its_default_in_help(capsys, command):
    parser = subcommand(command)
    formatter = parser._get_formatter()
    flags = [a for a in parser._actions if a.option_strings and a.dest not in ("help", "version")]
    assert len(flags) >= 14
    for action in flags:
        assert "(default: " in formatter._expand_help(action), action.option_strings
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    for default in ("(default: 256)", "(default: 1.0)", "(default: auto)", "(default: off)"):
        assert default in text, default


@pytest.mark.parametrize("words", ["/image PATH", "/exit", "/quit"])
def test_chat_help_lists_the_in_chat_commands(capsys, words):
    with pytest.raises(SystemExit):
        cli.main(["chat", "--help"])
    assert words in capsys.readouterr().out


# --- sampling flags without --do-sample: one warning line, greedy decoding -------------------------------------

@pytest.mark.parametrize("flags, warned", [
    (["--temperature", "0.7"], "--temperature 0.7"),
    (["--top-k", "5"], "--top-k 5"),
    (["--top-p", "0.9"], "--top-p 0.9"),
    (["--temperature", "0.5", "--top-k", "3", "--top-p", "0.8"], "--temperature 0.5, --top-k 3, --top-p 0.8"),
    (["--temperature", "0", "--top-k", "2"], "--top-k 2"),  # 0 is the greedy spelling: not named
    (["--temperature", "0"], None),
    (["--temperature", "1"], None),
    ([], None),
    (["--do-sample", "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9"], None),
])
def test_sampling_flags_without_do_sample_warn_once_and_decode_greedily(capsys, monkeypatch, flags, warned):
    used = []

    def spy(model, tokenizer, input_ids, pixel_values=None, sampling=None, **kwargs):
        used.append(sampling)
        yield "x"

    monkeypatch.setattr(cli, "stream_text", spy)
    rc, out, err = run(capsys, ["generate", "--max-new-tokens", "2", *flags, "hi"])
    assert rc == 0 and out == "x\n", err
    warnings = [line for line in err.splitlines() if "warning" in line]
    if warned is None:
        assert warnings == []
    else:
        assert len(warnings) == 1, err
        assert warnings[0] == (f"glm4v: warning: {warned} {'is' if ',' not in warned else 'are'} ignored in greedy "
                               "decoding (add --do-sample to sample)")
        assert used == [Sampling()]  # greedy, as without the flags
    assert used[0].do_sample == ("--do-sample" in flags)


# --- a stdout that cannot take the output -----------------------------------------------------------------------

GLM4V = [sys.executable, "-m", "glm4v_core"]
ENV = {**os.environ, "TRITON_INTERPRET": "1"}


def _run(argv, how: str, tmp_path, stdin: str = "") -> subprocess.CompletedProcess:
    (tmp_path / "stdin").write_text(stdin)
    with open(tmp_path / "stdin") as lines:
        if how == "closed":  # `cmd >&-`
            return subprocess.run(argv, stdin=lines, stderr=subprocess.PIPE, text=True, timeout=120, env=ENV,
                                  cwd=tmp_path, preexec_fn=lambda: os.close(1))
        if how == "full":  # `cmd > /dev/full`: every write fails with ENOSPC
            with open("/dev/full", "w") as full:
                return subprocess.run(argv, stdin=lines, stdout=full, stderr=subprocess.PIPE, text=True,
                                      timeout=120, env=ENV, cwd=tmp_path)
        # `cmd | head -c 1`: the reader takes one byte and leaves
        proc = subprocess.Popen(argv, stdin=lines, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                                cwd=tmp_path)
        first = proc.stdout.read(1)
        proc.stdout.close()
        _, err = proc.communicate(timeout=120)
    assert len(first) == 1
    return subprocess.CompletedProcess(argv, proc.returncode, None, err.decode())


CLOSED = "the output could not be written: stdout is closed"
FULL = "the output could not be written to stdout: no space left on the device"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("argv, stdin, how, code, message", [
    (["generate", "--max-new-tokens", "3", "hi"], "", "closed", 1, f"glm4v: error: {CLOSED}"),
    (["chat", "--max-new-tokens", "3"], "hi\n", "closed", 1, f"glm4v: error: {CLOSED}"),
    (["parity"], "", "closed", 1, f"glm4v parity: error: {CLOSED}"),
    (["generate", "--max-new-tokens", "3", "hi"], "", "full", 1, f"glm4v: error: {FULL}"),
    (["chat", "--max-new-tokens", "3"], "hi\n", "full", 1, f"glm4v: error: {FULL}"),
    (["parity"], "", "full", 1, f"glm4v parity: error: {FULL}"),
    (["generate", "--max-new-tokens", "40", "--stop", "never", "hi"], "", "head", 0, None),
    (["chat", "--max-new-tokens", "40"], "hi\nagain\n", "head", 0, None),
])
def test_a_stdout_that_cannot_take_the_output(tmp_path, argv, stdin, how, code, message):
    done = _run([*GLM4V, *argv], how, tmp_path, stdin)
    err = done.stderr
    assert done.returncode == code, err
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err, err
    errors = [line for line in err.splitlines() if "error" in line]
    if message is None:  # the reader left: quiet
        assert errors == [], err
    else:
        assert errors == [message], err
        assert err.rstrip("\n").splitlines()[-1] == message  # the run ends with it
