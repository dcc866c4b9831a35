"""stdout failures, with real processes, for `glm4v-convert` and `python -m glm4v_core.parity`: a closed
stdout (`>&-`) and a full one (`> /dev/full`) are named in one line on stderr, exit 1; a pipe whose
reader leaves early (`| head -c 1`) ends quietly. glm4v_conversion.streams.named_stdout_failures."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

COMMANDS = {  # name -> (PROG in the message, argv after the interpreter)
    "convert --help": ("glm4v-convert", ["-m", "glm4v_conversion", "--help"]),
    "convert --version": ("glm4v-convert", ["-m", "glm4v_conversion", "--version"]),
    "convert tiny": ("glm4v-convert", ["-m", "glm4v_conversion", "{tiny}", "{dst}", "--no-progress"]),
    "parity --help": ("python -m glm4v_core.parity", ["-m", "glm4v_core.parity", "--help"]),
}
MESSAGES = {
    "closed": "error: the output could not be written: stdout is closed",
    "full": "error: the output could not be written to stdout: no space left on the device",
}


def run_with_stdout(argv: list[str], how: str, cwd) -> tuple[int, str]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    if how == "closed":  # `cmd >&-`: fd 1 not open at all
        done = subprocess.run(argv, stderr=subprocess.PIPE, text=True, timeout=120, env=env, cwd=cwd,
                              preexec_fn=lambda: os.close(1))
        return done.returncode, done.stderr
    if how == "full":  # `cmd > /dev/full`: every write fails with ENOSPC
        with open("/dev/full", "w") as full:
            done = subprocess.run(argv, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120, env=env, cwd=cwd)
        return done.returncode, done.stderr
    # `cmd | head -c 1`
    head = subprocess.Popen(["head", "-c", "1"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        done = subprocess.run(argv, stdout=head.stdin, stderr=subprocess.PIPE, text=True, timeout=120, env=env,
                              cwd=cwd)
    finally:
        head.stdin.close()
        head.wait(timeout=30)
    return done.returncode, done.stderr


@pytest.mark.parametrize("how", ["closed", "full", "head"])
@pytest.mark.parametrize("command", COMMANDS)
def test_unwritable_stdout_is_named_in_one_line(fixtures_dir, tmp_path, command, how):
    prog, args = COMMANDS[command]
    argv = [sys.executable, *(a.format(tiny=fixtures_dir / "tiny", dst=tmp_path / "native") for a in args)]
    rc, err = run_with_stdout(argv, how, tmp_path)
    assert "Traceback" not in err and "Exception ignored" not in err, err
    if how == "head":  # the reader took what it wanted and left: not an error
        assert rc == 0 and err == "", err
    else:
        assert rc == 1 and err == f"{prog}: {MESSAGES[how]}\n", err
    if command == "convert tiny":  # the files are complete either way; only the report was lost
        assert (tmp_path / "native" / "config.json").is_file()
