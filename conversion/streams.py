"""stdout for both commands: output piped into `head`, or a closed stdout, ends quietly.

Without this, Python prints a BrokenPipeError traceback, and another one when it flushes stdout
at exit. The rule: exit 0 if some output was written before the reader went away (the usual
`| head`), 1 if nothing could be written at all (e.g. `>&-`), never a traceback.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class WriteCounter:
    """A stdout wrapper that flushes each write (so a closed pipe shows at once, inside the guard)
    and remembers whether anything reached the reader."""

    def __init__(self, stream: TextIO | None):
        self.stream, self.written, self.failed = stream, 0, False

    def write(self, text: str) -> int:
        try:
            if self.stream is None:  # Python started with fd 1 closed
                raise BrokenPipeError("stdout is closed")
            n = self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError:
            self.failed = True  # remembered: argparse swallows the error when it prints --help
            raise
        self.written += len(text)
        return n

    def flush(self) -> None:
        if self.stream is not None:
            self.stream.flush()

    def isatty(self) -> bool:
        return self.stream is not None and self.stream.isatty()

    def __getattr__(self, name: str):  # encoding, fileno, ...: the real stream's
        return getattr(self.stream, name)


@contextmanager
def quiet_broken_pipe() -> Iterator[WriteCounter]:
    """Run a command's body; a BrokenPipeError on stdout becomes SystemExit(0 or 1), silently."""
    real = sys.stdout
    out = sys.stdout = WriteCounter(real)  # print() anywhere in the command goes through it
    try:
        yield out
    except BrokenPipeError:
        _silence_stdout(real)
        raise SystemExit(0 if out.written else 1) from None
    except SystemExit as e:  # argparse's --help and --version print inside this block too
        if e.code in (0, None) and out.failed and not out.written:
            _silence_stdout(real)
            raise SystemExit(1) from None
        raise
    finally:
        sys.stdout = real


def _silence_stdout(stream: TextIO | None) -> None:
    """Point fd 1 at /dev/null so the interpreter's final flush of stdout cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        if stream is not None:
            os.dup2(devnull, stream.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor behind it
        pass
