"""stdout for the commands: output piped into `head` ends quietly; a closed or full stdout is named.

Without this, Python prints a BrokenPipeError traceback, and another one when it flushes stdout
at exit. `quiet_broken_pipe`'s rule: exit 0 if some output was written before the reader went
away (the usual `| head`), 1 if nothing could be written at all (e.g. `>&-`), never a traceback.
`named_stdout_failures(prog)` adds the reason, in one line on stderr, for the failures that are not
a reader that left: `>&-` (PROG: error: the output could not be written: stdout is closed) and
`> /dev/full` or an I/O error (PROG: error: the output could not be written to stdout: no space
left on the device), exit 1.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from .files import os_reason


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


STDOUT_CLOSED = "the output could not be written: stdout is closed"


@contextmanager
def named_stdout_failures(prog: str) -> Iterator[WriteCounter]:
    """quiet_broken_pipe, plus one line `PROG: error: ...` on stderr and exit 1 when stdout is closed or
    a write to it fails for another reason than a reader that went away (ENOSPC, EIO); a pipe closed
    early (`| head -c 1`) still ends quietly. Yields the WriteCounter that is sys.stdout in the block."""
    stdout: WriteCounter | None = None
    try:
        with quiet_broken_pipe() as stdout:
            if stdout.stream is not None:
                stdout.stream = NamedWriteFailures(stdout.stream)
            yield stdout
    except SystemExit as e:  # quiet_broken_pipe ended the command: a reader that left stays quiet, else say why
        reason = lost_output(stdout)
        if reason is None or e.code not in (0, 1, None):
            raise
        print(f"{prog}: error: {reason}", file=sys.stderr)
        raise SystemExit(1) from None


class NamedWriteFailures:
    """The real stdout, inside quiet_broken_pipe's WriteCounter: a write that fails for another reason than a
    reader that went away (`> /dev/full`, an I/O error) is remembered, then raised as a BrokenPipeError, so
    the guard ends the command (and points fd 1 at /dev/null for the interpreter's last flush);
    `named_stdout_failures` then names the reason."""

    def __init__(self, stream: TextIO):
        self.stream, self.error = stream, None

    def write(self, text: str) -> int:
        return self._call(self.stream.write, text)

    def flush(self) -> None:
        self._call(self.stream.flush)

    def _call(self, method, *args):
        try:
            return method(*args)
        except BrokenPipeError:
            raise
        except OSError as e:
            self.error = e
            raise BrokenPipeError(e.errno, e.strerror) from e

    def __getattr__(self, name: str):  # fileno, isatty, encoding, ...: the real stream's
        return getattr(self.stream, name)


def lost_output(stdout: WriteCounter | None) -> str | None:
    """Why the command's output could not be written, or None (written, or a reader that left: `| head`)."""
    if stdout is None:
        return None
    if stdout.stream is None:
        return STDOUT_CLOSED if stdout.failed else None
    error = getattr(stdout.stream, "error", None)
    return None if error is None else f"the output could not be written to stdout: {os_reason(error)}"
