"""`--help`, `--version` and usage errors answer without torch; `glm4v finetune --help` documents every
flag; `glm4v chat` shows its commands, answers unknown ones, survives a bad /image and shows no raw
control character or special token."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest

from glm4v_conversion import __version__
from glm4v_core import cli
from glm4v_core.training import cli as training_cli

WRAPPER = """import sys
from glm4v_core.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("TORCH-IMPORTED" if "torch" in sys.modules else "NO-TORCH", code, file=sys.stderr)
"""


def run_wrapped(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WRAPPER, *argv], capture_output=True, text=True, timeout=60)


def in_process(capsys, argv: list[str]) -> tuple[object, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["--version"], 0), (["generate", "--help"], 0),
                                        (["chat", "--help"], 0), (["finetune", "--help"], 0),
                                        (["finetune", "--version"], 0), (["generate", "--version"], 0),
                                        (["bogus"], 2), (["generate"], 2), (["chat", "--top-k", "x"], 2),
                                        (["finetune", "--data", "x.jsonl"], 2)])
def test_help_version_and_usage_errors_import_no_torch(capsys, argv, code):
    proc = run_wrapped(argv)
    *err_lines, last = proc.stderr.splitlines()
    assert last == f"NO-TORCH {code}", proc.stderr
    want_code, want_out, want_err = in_process(capsys, argv)  # the same text as in-process
    assert want_code == code and proc.stdout == want_out
    assert "\n".join(err_lines) == want_err.rstrip("\n")


def test_finetune_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["finetune", "--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"glm4v finetune {__version__}\n"


def test_every_finetune_flag_has_help_and_a_default(capsys):
    parser = training_cli.build_parser()
    formatter = parser._get_formatter()
    flags = [a for a in parser._actions if a.option_strings and a.dest not in ("help", "version")]
    assert len(flags) >= 30
    for action in flags:
        text = formatter._expand_help(action) if action.help else ""
        assert text and ("(default: " in text or "(required)" in text), action.option_strings
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 0.0001)", "(default: cosine)", "(default: skip)", "(default: off)"):
        assert default in text, default


def drive_chat(stdin: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glm4v_core", "chat", "--max-new-tokens", "3", *flags],
                          input=stdin, capture_output=True, text=True, timeout=120)


def test_chat_banner_help_unknown_command_and_a_bad_image(tmp_path):
    proc = drive_chat(f"/help\n/frobnicate now\n/image {tmp_path / 'missing.png'}\nhello\n")
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.splitlines()
    assert err[0].startswith("glm4v chat:") and all(w in err[0] for w in ("/image PATH", "/help", "/exit"))
    assert "  /help              list these commands" in err
    assert "glm4v: unknown command /frobnicate; /help lists them" in err
    assert any(line.startswith("glm4v: error:") and "missing.png" in line for line in err), proc.stderr
    assert sum("time to first token" in line for line in err) == 1  # only `hello` reached the model
    assert proc.stdout.count("\n") == 1 and "Traceback" not in proc.stderr


def test_chat_shows_no_raw_control_character_or_special_token(capsys, monkeypatch):
    answers = []

    def stream(model, tokenizer, input_ids, pixel_values=None, **kwargs):
        answers.append(tokenizer.decode(input_ids[0].tolist()))
        yield from ["a\x1b[31mb", "<|user|>", "\x07\tc\r", "\x9bd\n", "é"]

    monkeypatch.setattr(cli, "stream_text", stream)
    monkeypatch.setattr(sys, "stdin", io.StringIO("one\ntwo\n"))
    assert cli.main(["chat"]) == 0
    out = capsys.readouterr().out
    r = "\N{REPLACEMENT CHARACTER}"
    assert out == f"a{r}[31mb{r}{r}\tc{r}{r}d\né\n" * 2
    assert "a\x1b[31mb<|user|>\x07\tc\r\x9bd\né" in answers[1]  # the history keeps the text as generated
