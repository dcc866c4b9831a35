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
        self.stream, self.written = stream, 0

    def write(self, text: str) -> int:
        if self.stream is None:  # Python started with fd 1 closed
            raise BrokenPipeError("stdout is closed")
        n = self.stream.write(text)
        self.stream.flush()
        self.written += len(text)
        return n

    def flush(self) -> None:
        if self.stream is not None:
            self.stream.flush()

    def isatty(self) -> bool:
        return self.stream is not None and self.stream.isatty()


@contextmanager
def quiet_broken_pipe() -> Iterator[WriteCounter]:
    """Run a command's body; a BrokenPipeError on stdout becomes SystemExit(0 or 1), silently."""
    out = WriteCounter(sys.stdout)
    try:
        yield out
    except BrokenPipeError:
        _silence_stdout()
        raise SystemExit(0 if out.written else 1) from None
    except SystemExit as e:  # argparse's --help and --version print inside this block too
        if e.code in (0, None):
            try:
                if sys.stdout is None:
                    raise BrokenPipeError
                sys.stdout.flush()
            except BrokenPipeError:
                _silence_stdout()
                raise SystemExit(1) from None
        raise


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null so the interpreter's final flush of stdout cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        if sys.stdout is not None:
            os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
