"""Helpers for the tests/test_robustness_*.py files: special files, and a deadline so that a test
that would hang on a FIFO fails instead."""
from __future__ import annotations

import os
import signal
import socket
from contextlib import contextmanager
from pathlib import Path

import pytest

# Kinds of things that can sit where a regular file is expected, and the words the error must use.
SPECIAL_KINDS = {
    "fifo": "FIFO",
    "folder": "folder",
    "char_device": "character device",
    "socket": "socket",
    "symlink_loop": "symlink loop",
    "dangling_symlink": "not found",
}


def make_special(path: Path, kind: str) -> None:
    """Put a `kind` (see SPECIAL_KINDS) at `path`, replacing whatever is there."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "char_device":
        path.symlink_to("/dev/null")  # the link is followed: a character device
    elif kind == "socket":
        if len(os.fsencode(path)) > 100:
            pytest.skip("path too long for a unix socket")
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(os.fspath(path))
        sock.close()
    elif kind == "symlink_loop":
        path.symlink_to(path.name)  # points at itself
    elif kind == "dangling_symlink":
        path.symlink_to(path.name + ".missing")
    else:
        raise ValueError(kind)


class Hang(BaseException):
    """Raised by `deadline`; a BaseException so that no `except OSError/Exception` can swallow it."""


@contextmanager
def deadline(seconds: float = 3):
    """Fail (instead of hanging) if the block takes longer: SIGALRM interrupts a blocking open()."""
    def expired(signum, frame):
        raise Hang(f"still running after {seconds} s: something blocked")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def linked_copy(src: Path, dst: Path) -> Path:
    """A folder of symlinks to src's files (cheap, and proves linked checkpoints load)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).symlink_to(f.resolve())
    return dst
