"""Publishing a folder all at once: write into a hidden sibling, rename it into place when complete.

A failure or Ctrl-C inside `staging` removes the sibling, so readers never see a half-written
folder. An existing destination (the converter's --force) is swapped out with Linux's
renameat2(RENAME_EXCHANGE) where available, else by two renames that put it back on failure.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staging(dst: Path) -> Iterator[Path]:
    """A hidden sibling folder that becomes `dst` only if the block completes; removed otherwise."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not tempfile.mkdtemp: its 0700 mode would stick to the published folder
    try:
        yield tmp
        _publish(tmp, dst)
    except BaseException:  # KeyboardInterrupt included: never leave a half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, dst: Path) -> None:
    """Rename `tmp` to `dst`; an existing `dst` is swapped out atomically where the OS can, then removed."""
    if not (dst.exists() or dst.is_symlink()):
        os.rename(tmp, dst)
    elif _exchange(tmp, dst):
        shutil.rmtree(tmp)  # tmp now holds the old dst
    else:  # two renames; if the second fails the old dst is put back
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(dst, old)
        try:
            os.rename(tmp, dst)
        except BaseException:
            os.rename(old, dst)
            raise
        shutil.rmtree(old)
    _fsync_dir(dst.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Linux renameat2(RENAME_EXCHANGE): swap two paths in one step. False where unavailable."""
    if not sys.platform.startswith("linux") or not b.is_dir() or b.is_symlink():
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, rename_exchange = -100, 2
        return libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
    except (AttributeError, OSError):
        return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
