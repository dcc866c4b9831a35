"""Publishing a folder all at once: write into a hidden sibling, rename it into place when complete.
`staged_file` / `write_file_atomically` do the same for one file (fsynced, then renamed over it).

A failure, Ctrl-C or SIGTERM/SIGHUP (the CLI turns those into exceptions) inside `staging`
removes the sibling, so readers never see a half-written folder. An existing destination (the
converter's --force) is swapped out with Linux's renameat2(RENAME_EXCHANGE) where available,
else by two renames that put it back on failure.

`check_free_space` refuses a write the destination's file system has no room for, before it starts;
`no_space_named` turns a write that still runs out of room midway (ENOSPC, EDQUOT) into a named error.
Both are for every glm4v writer, so the words are the same everywhere.

`destination_lock` keeps two writers off one destination: a lock file beside it, held with
flock (the kernel drops it when its process dies, even by SIGKILL) and holding the owner's pid
for the message the second writer gets. Whoever takes the lock removes the hidden siblings a
killed run left behind (no live writer can own them) and reports them with a warning.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConversionError
from .files import human_size, os_reason

try:
    import fcntl
except ImportError:  # not POSIX: no lock, the rest works
    fcntl = None


class LeftoversWarning(UserWarning):
    """Hidden folders of an earlier run that was killed were found and removed."""


def staging_prefix(dst: Path) -> str:
    return f".{dst.name}.partial-"


def _swap_prefix(dst: Path) -> str:
    return f".{dst.name}.old-"


@contextmanager
def destination_lock(dst: Path) -> Iterator[None]:
    """Hold `.<dst name>.lock` beside `dst` for the block; refuse if a live process holds it.

    Folders above `dst` are created here (so the lock has a place) and removed again if the
    block fails and they are still empty. A destination that cannot be written (read-only or
    virtual file system, no permission) is a ConversionError saying which."""
    lock = lock_file(dst)
    created: list[Path] = []
    try:
        try:
            _check_writable_file_system(dst)
            created += _make_parents(dst.parent)
            fd = _take_lock(lock, dst)
        except OSError as e:  # a read-only file system or no permission: not "no space"
            raise ConversionError(f"cannot write {dst}: {e.filename or dst.parent} {os_reason(e)}") from None
        try:
            _remove_leftovers(dst)
            yield
        finally:
            _unlink_quietly(lock)  # still held: nobody can take a lock on the unlinked inode and think it valid
            os.close(fd)
    except BaseException:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def lock_file(dst: Path) -> Path:
    """The lock file destination_lock holds for `dst`."""
    return dst.parent / f".{dst.name}.lock"


class DestinationBusyError(ConversionError):
    """A live process holds the destination's lock; `owner` is its pid as the lock file records it."""

    def __init__(self, dst: Path, lock: Path, owner: str):
        super().__init__(f"{dst} is being written by another glm4v-convert (pid {owner}; lock file {lock}); "
                         "wait for it to finish")
        self.lock, self.owner = lock, owner


def lock_owner(dst: Path) -> str | None:
    """The pid recorded by a live holder of `dst`'s lock, or None (no lock, a stale one, or unreadable:
    taking it will say so). Reads only; takes nothing."""
    if fcntl is None:
        return None
    try:
        fd = os.open(lock_file(dst), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def existing_folder(dst: Path) -> Path:
    """The nearest existing folder above `dst`: the file system the folders still to be made will be on."""
    place = Path(dst).parent
    while not place.exists():
        place = place.parent
    return place


def unwritable_file_system(dst: Path) -> str | None:
    """Why `dst` cannot be written because of its file system (read-only, or virtual like /proc and
    /sys: no storage blocks), checked on the nearest existing folder above it; None if it can."""
    place = existing_folder(dst)
    if not hasattr(os, "statvfs"):
        return None
    fs = os.statvfs(place)
    if fs.f_flag & getattr(os, "ST_RDONLY", 1):
        return f"{place} is on a read-only file system"
    if fs.f_blocks == 0:
        return f"{place} is on a virtual file system with no storage (such as /proc or /sys)"
    return None


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full disk, or the user's quota used up


class DiskSpaceError(ConversionError):
    """Too little room for a destination: found up front (bytes needed vs free), or a write that
    failed midway with ENOSPC / EDQUOT (the unfinished output is removed by then)."""


def free_space(dst: Path) -> tuple[Path, int]:
    """(the folder measured, its free bytes) for writing `dst`, which need not exist yet."""
    place = existing_folder(dst)
    return place, shutil.disk_usage(place).free


def check_free_space(dst: Path, needed: int, what: str = "the output", error: type[Exception] = DiskSpaceError,
                     hint: str = "free some space or choose another destination") -> None:
    """Refuse (as `error`) to start writing `needed` bytes for `dst` where fewer are free."""
    place, free = free_space(dst)
    if free < needed:
        raise error(f"not enough free disk space in {place} for {dst}: {what} needs {human_size(needed)}, only "
                    f"{human_size(free)} are free ({needed} vs {free} bytes); {hint}")


@contextmanager
def no_space_named(dst: Path, error: type[Exception] = DiskSpaceError) -> Iterator[None]:
    """An ENOSPC / EDQUOT raised in the block becomes `error` naming `dst`. Wrap the whole write,
    staging included: by the time the error arrives here the unfinished output is gone."""
    try:
        yield
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        raise error(f"cannot write {dst}: {os_reason(e)} midway through the write; {dst} was not written and "
                    "nothing partial is left") from None


def _check_writable_file_system(dst: Path) -> None:
    reason = unwritable_file_system(dst)
    if reason is not None:
        raise ConversionError(f"cannot write {dst}: {reason}")


def _make_parents(folder: Path) -> list[Path]:
    missing = []
    while not (folder.exists() or folder.is_symlink()):
        missing.append(folder)
        folder = folder.parent
    for f in reversed(missing):
        f.mkdir()
    return list(reversed(missing))


def _take_lock(lock: Path, dst: Path) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        if fcntl is None:
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise DestinationBusyError(dst, lock, owner) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder unlinked it between our open and flock: take the new one
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def _remove_leftovers(dst: Path) -> None:
    """Hidden staging/swap folders of `dst` can only be a dead run's: we hold the lock."""
    prefixes = (staging_prefix(dst), _swap_prefix(dst))
    found = sorted(p for p in dst.parent.iterdir() if p.name.startswith(prefixes))
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    if found:
        warnings.warn(f"removed {len(found)} unfinished folder(s) of an earlier interrupted run beside {dst}: "
                      f"{', '.join(p.name for p in found)}", LeftoversWarning, stacklevel=4)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


@contextmanager
def staging(dst: Path) -> Iterator[Path]:
    """A hidden sibling folder that becomes `dst` only if the block completes; removed otherwise."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f"{staging_prefix(dst)}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not tempfile.mkdtemp: its 0700 mode would stick to the published folder
    try:
        yield tmp
        _publish(tmp, dst)
    except BaseException:  # KeyboardInterrupt included: never leave a half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def staged_file(dst: Path) -> Iterator[Path]:
    """A hidden sibling path, unique to this call, for the block to write one file in; it becomes `dst`
    only if the block completes: flushed to disk (fsync), then renamed over `dst` (an existing file is
    replaced in one step). Removed on a failure or Ctrl-C, so readers never see a half-written file.
    The name ends in `.tmp`: a writer that picks the format from the name must be told it. The folder
    above `dst` must exist."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, dst)
        _fsync(dst.parent)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def write_file_atomically(dst: Path, data: bytes) -> None:
    """`dst` holds `data`, all of it or (on any failure) whatever it held before; see staged_file."""
    with staged_file(dst) as tmp:
        tmp.write_bytes(data)


def _publish(tmp: Path, dst: Path) -> None:
    """Rename `tmp` to `dst`; an existing `dst` is swapped out atomically where the OS can, then removed."""
    if not (dst.exists() or dst.is_symlink()):
        os.rename(tmp, dst)
    elif _exchange(tmp, dst):
        _remove_old(tmp, dst)  # tmp now holds the old dst
    else:  # two renames; if the second fails the old dst is put back
        old = dst.parent / f"{_swap_prefix(dst)}{uuid.uuid4().hex[:8]}"
        os.rename(dst, old)
        try:
            os.rename(tmp, dst)
        except BaseException:
            os.rename(old, dst)
            raise
        _remove_old(old, dst)
    _fsync(dst.parent)


def _remove_old(old: Path, dst: Path) -> None:
    """The new folder is in place: failing to delete the old one is worth a warning, not a failure."""
    try:
        if old.is_symlink() or not old.is_dir():
            old.unlink()
        else:
            shutil.rmtree(old)
    except OSError as e:
        warnings.warn(f"{dst} was written, but its previous version could not be removed from {old}: {e}",
                      stacklevel=4)


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


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's contents (a folder: its entries, e.g. a rename) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
