"""Opening the files a checkpoint, tokenizer or image is made of, without ever blocking or guessing.

A FIFO, socket, device or folder where a file is expected is refused by `os.stat` before any
`open` (opening a FIFO for reading blocks until someone writes to it), and the file is then
opened non-blocking and checked once more on its descriptor, so a path swapped in between
cannot hang us either. A symlink loop, a missing file and a permission problem each get their
own words. Errors are raised as the class the caller passes (each layer has its own ValueError
subclass), with the path and what was expected in the message.
"""
from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import BinaryIO

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def file_kind(mode: int) -> str:
    """'a regular file', 'a folder', 'a FIFO (named pipe)', ... for an st_mode."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def os_reason(e: OSError) -> str:
    """Short words for the OSError of a stat/open/mkdir, told apart by errno."""
    reasons = {errno.ENOENT: "not found", errno.ELOOP: "is a symlink loop (or too many levels of links)",
               errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
               errno.EROFS: "is on a read-only file system", errno.ENOSPC: "no space left on the device",
               errno.EDQUOT: "disk quota exceeded", errno.ENOTDIR: "a part of the path is not a folder",
               errno.ENAMETOOLONG: "the name is too long"}
    return reasons.get(e.errno, e.strerror or str(e))


def check_regular_file(path: str | Path, what: str, error: type[Exception]) -> os.stat_result:
    """stat `path` (following links) and refuse anything but a regular file, naming what it is."""
    return _check_kind(path, what, error, stat.S_ISREG, "a regular file")


def check_folder(path: str | Path, what: str, error: type[Exception]) -> None:
    """stat `path` (following links) and refuse anything but a folder, naming what it is."""
    _check_kind(path, what, error, stat.S_ISDIR, "a folder")


def _check_kind(path, what: str, error: type[Exception], is_kind, kind: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except OSError as e:
        raise error(f"{what} {path} {os_reason(e)}") from None
    if not is_kind(st.st_mode):
        raise error(f"{what} {path} is {file_kind(st.st_mode)}, not {kind}")
    return st


def open_regular(path: str | Path, what: str, error: type[Exception]) -> BinaryIO:
    """A binary file object for a regular file; never blocks on a FIFO or device."""
    check_regular_file(path, what, error)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(f"{what} {path} {os_reason(e)}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # replaced between the stat and the open
            raise error(f"{what} {path} is {file_kind(mode)}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# Config, index and provenance JSON and tokenizer vocabularies are kilobytes to a few MB: a bigger
# file is the wrong file (a weight shard passed as --tokenizer), refused before it is read into memory.
MAX_SMALL_FILE_BYTES = 256 * 10**6


def read_bytes(path: str | Path, what: str, error: type[Exception]) -> bytes:
    with open_regular(path, what, error) as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_SMALL_FILE_BYTES:
            raise error(f"{what} {path} is {human_size(size)}, more than such a file can be "
                        f"({human_size(MAX_SMALL_FILE_BYTES)} at most): is it the right file?")
        try:
            return f.read()
        except OSError as e:
            raise error(f"cannot read {what} {path}: {os_reason(e)}") from None


def read_text(path: str | Path, what: str, error: type[Exception]) -> str:
    """UTF-8 text of a regular file; undecodable bytes are an `error` naming the file."""
    try:
        return read_bytes(path, what, error).decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text ({e})") from None


def parse_json(text: str | bytes, where: str | Path, error: type[Exception]):
    """json.loads that names the file on any defect: bad syntax, nesting too deep for the parser,
    or a key given twice in one object (JSON parsers disagree on which one wins, so we refuse)."""
    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            twice = next(k for k in keys if keys.count(k) > 1)
            raise error(f"{where}: key {twice!r} appears twice in one JSON object")
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{where}: not valid JSON ({e})") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply to parse") from None


def read_json_object(path: str | Path, what: str, error: type[Exception], expected: str = "a JSON object") -> dict:
    """A small JSON file whose top level must be an object (a config, a state record), each defect an
    `error` naming the file; `expected` says what the object stands for."""
    data = parse_json(read_bytes(path, what, error), path, error)
    if not isinstance(data, dict):
        raise error(f"{path}: expected {expected}, got {type(data).__name__}")
    return data


def human_size(n: float) -> str:
    """Bytes in decimal units with three significant digits: 512 B, 6.55 kB, 1.23 MB, 19.2 GB."""
    if n < 1000:
        return f"{int(n)} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 999.5 or unit == "TB":
            return f"{n:.{2 if n < 9.995 else 1 if n < 99.95 else 0}f} {unit}"
    raise AssertionError("unreachable")
