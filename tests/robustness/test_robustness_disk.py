"""A full disk (issue #24): `glm4v-convert` (float and --quantize) and `glm4v make-reference` work out
the bytes they will write and refuse up front, naming the destination, the bytes needed and the bytes
free; a write that still runs out of room midway (ENOSPC, EDQUOT) is one named line with nothing
partial left, as is a `glm4v parity --plot / --html` file that cannot be written."""
from __future__ import annotations

import errno
import os
import re
import shutil
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.paths import FIXTURES, STANDIN

from glm4v_conversion import atomic
from glm4v_conversion import cli as convert_cli
from glm4v_conversion import convert as convert_module
from glm4v_conversion import quantize as quantize_module
from glm4v_conversion.atomic import DiskSpaceError, check_free_space, no_space_named
from glm4v_conversion.convert import convert
from glm4v_conversion.quantize import quantize_checkpoint
from glm4v_core import cli
from glm4v_core.config import BUNDLED_CHECKPOINT
from glm4v_core.parity import capture as parity_capture
from glm4v_core.parity import cli as parity_cli
from glm4v_core.parity import make_reference as parity_make_reference
from glm4v_core.parity import preflight
from glm4v_core.parity.capture import CaptureError
from glm4v_core.parity.run import run_parity

TINY = FIXTURES / "tiny"
IMAGE = FIXTURES / "images" / "gradient_rgb_97x61.png"
Usage = namedtuple("Usage", "total used free")
NEEDED = re.compile(r"needs .*, only .* are free \((\d+) vs (\d+) bytes\)")


def free_bytes(monkeypatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - free, free))


def needed_bytes(message: str) -> int:
    found = NEEDED.search(message)
    assert found, message
    return int(found.group(1))


def tree_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def full_disk_midway(code: int = errno.ENOSPC):
    """A writer that gets part of its bytes onto the disk, then fails as a full disk (or quota) does."""
    def write(path, *args, **kwargs):
        Path(path).write_bytes(b"\0" * 4096)
        raise OSError(code, os.strerror(code))
    return write


CONVERSIONS = {  # name -> (Python call, its module's writer, extra command-line flags)
    "float": (lambda dst: convert(TINY, dst), convert_module, []),
    "int8": (lambda dst: quantize_checkpoint(TINY, dst, "int8"), quantize_module, ["--quantize", "int8"]),
    "int4": (lambda dst: quantize_checkpoint(TINY, dst, "int4", 32), quantize_module,
             ["--quantize", "int4", "--group-size", "32"]),
}


# ---------------------------------------------------------------- the free-space helper

def test_check_free_space_refuses_one_byte_short_and_names_everything(tmp_path, monkeypatch):
    dst = tmp_path / "new" / "folder"
    free_bytes(monkeypatch, 1000)
    check_free_space(dst, 1000)  # exactly enough
    with pytest.raises(DiskSpaceError) as e:
        check_free_space(dst, 1001, "the thing")
    message = str(e.value)
    assert f"in {tmp_path} for {dst}: the thing needs 1.00 kB, only 1.00 kB are free (1001 vs 1000 bytes)" in message


def test_no_space_named_names_a_full_disk_and_keeps_other_errors(tmp_path):
    for code, words in ((errno.ENOSPC, "no space left"), (errno.EDQUOT, "disk quota exceeded")):
        with pytest.raises(DiskSpaceError, match=f"cannot write {tmp_path}: {words}"), no_space_named(tmp_path):
            raise OSError(code, os.strerror(code))
    with pytest.raises(OSError) as e, no_space_named(tmp_path):
        raise OSError(errno.EIO, "Input/output error")
    assert e.value.errno == errno.EIO  # not a full disk: not called one


# ---------------------------------------------------------------- glm4v-convert, float and --quantize

@pytest.mark.parametrize("kind", list(CONVERSIONS))
def test_conversion_checks_the_exact_space_up_front(kind, tmp_path, monkeypatch):
    run, _, _ = CONVERSIONS[kind]
    dst = tmp_path / "out" / "dst"
    free_bytes(monkeypatch, 0)
    with pytest.raises(DiskSpaceError, match=f"for {dst}: the output needs") as e:
        run(dst)
    needed = needed_bytes(str(e.value))
    assert not (tmp_path / "out").exists()  # nothing made, not even the folder for the lock
    free_bytes(monkeypatch, needed - 1)
    with pytest.raises(DiskSpaceError):
        run(dst)
    free_bytes(monkeypatch, needed)
    run(dst)
    written = tree_size(dst)
    assert written <= needed <= written + 200 * 1000, (written, needed)  # the estimate covers it, and not by much


@pytest.mark.parametrize("kind", list(CONVERSIONS))
def test_conversion_refused_for_space_is_one_line(kind, tmp_path, monkeypatch, capsys):
    _, _, flags = CONVERSIONS[kind]
    dst = tmp_path / "dst"
    free_bytes(monkeypatch, 1000)
    assert convert_cli.main([str(TINY), str(dst), "--no-progress", *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"glm4v-convert: error: not enough free disk space in {tmp_path} for {dst}: ")
    assert err.count("\n") == 1 and "1000 bytes)" in err, err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
@pytest.mark.parametrize("kind", list(CONVERSIONS))
def test_conversion_running_out_of_space_midway_leaves_nothing(kind, code, tmp_path, monkeypatch, capsys):
    run, module, flags = CONVERSIONS[kind]
    monkeypatch.setattr(module, "write_file", full_disk_midway(code))
    dst = tmp_path / "out" / "dst"
    with pytest.raises(DiskSpaceError, match=f"cannot write {dst}: .* midway .* nothing partial is left"):
        run(dst)
    assert not (tmp_path / "out").exists()
    assert convert_cli.main([str(TINY), str(dst), "--no-progress", *flags]) == 1
    err = capsys.readouterr().err
    words = "no space left on the device" if code == errno.ENOSPC else "disk quota exceeded"
    assert err == f"glm4v-convert: error: cannot write {dst}: {words} midway through the write; {dst} was not " \
                  "written and nothing partial is left\n", err
    assert not (tmp_path / "out").exists()


def test_replacing_with_force_keeps_the_old_folder_when_the_disk_fills(tmp_path, monkeypatch):
    dst = tmp_path / "dst"
    convert(TINY, dst)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    monkeypatch.setattr(convert_module, "write_file", full_disk_midway())
    with pytest.raises(DiskSpaceError):
        convert(TINY, dst, force=True)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before and os.listdir(tmp_path) == ["dst"]


# ---------------------------------------------------------------- glm4v make-reference

@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    """The tiny fixture plus the stand-in remote code make-reference runs."""
    folder = tmp_path_factory.mktemp("standin") / "ckpt"
    shutil.copytree(TINY, folder)
    for src in STANDIN.glob("*.py"):
        shutil.copy(src, folder / src.name)
    return folder


def make_reference(standin: Path, out: Path, *extra: str) -> list[str]:
    return ["make-reference", "--checkpoint", str(standin), "--out", str(out), "--trust-remote-code",
            "--image", str(IMAGE), "--prompt", "What is this?", "--prompt", "Hi", "--image", "none",
            "--max-new-tokens", "3", "--with-bf16", *extra]


def one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("glm4v make-reference: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_make_reference_estimates_what_it_writes(hf_modules, standin, tmp_path, monkeypatch, capsys):
    """The estimate is checked against a real recording: the final file, and the peak (spill + file)."""
    seen = {}
    real_bytes, real_check, real_finish = (preflight.reference_bytes, preflight.check_free_space,
                                           parity_capture.SpillWriter.finish)

    def reference_bytes(*args):
        seen["file"] = real_bytes(*args)
        return seen["file"]

    def check_free_space(dst, needed, *args):
        seen["peak"] = needed
        return real_check(dst, needed, *args)

    def finish(self, path, metadata):
        real_finish(self, path, metadata)
        seen["at the peak"] = tree_size(Path(path).parent)  # the spill is still there

    monkeypatch.setattr(preflight, "reference_bytes", reference_bytes)
    monkeypatch.setattr(preflight, "check_free_space", check_free_space)
    monkeypatch.setattr(parity_capture.SpillWriter, "finish", finish)
    out = tmp_path / "ref"
    assert cli.main(make_reference(standin, out)) == 0, capsys.readouterr().err
    written = (out / "reference.safetensors").stat().st_size
    assert written <= seen["file"] <= 1.05 * written + 8192, (written, seen)
    assert seen["at the peak"] + (out / "reference.json").stat().st_size <= seen["peak"] <= 2.2 * seen["at the peak"]
    assert "disk: ~" in capsys.readouterr().err


def test_make_reference_refuses_up_front_without_the_space(hf_modules, standin, tmp_path, monkeypatch, capsys):
    def forbidden(*args, **kwargs):
        raise AssertionError("the reference was loaded")
    monkeypatch.setattr(parity_make_reference, "load_reference", forbidden)
    free_bytes(monkeypatch, 5000)
    out = tmp_path / "new" / "ref"
    assert cli.main(make_reference(standin, out)) == 1
    message = one_error(capsys.readouterr().err)
    assert f"not enough free disk space in {tmp_path} for {out}: the recording" in message
    assert "5000 bytes)" in message and "--force" in message, message
    assert os.listdir(tmp_path) == []


def test_make_reference_force_runs_past_the_disk_estimate(hf_modules, standin, tmp_path, monkeypatch, capsys):
    loaded = []

    def stop_at_load(*args, **kwargs):
        loaded.append(1)
        raise CaptureError("stopped here by the test")
    monkeypatch.setattr(parity_make_reference, "load_reference", stop_at_load)
    monkeypatch.setattr(preflight, "available_cpu_memory", lambda: 10**12)  # the memory check passes anyway
    free_bytes(monkeypatch, 5000)
    assert cli.main(make_reference(standin, tmp_path / "ref", "--force")) == 1
    assert loaded and "stopped here by the test" in one_error(capsys.readouterr().err)


def spill_full_after(n: int, code: int):
    real = parity_capture.SpillWriter.append
    calls = []

    def append(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            (self.folder / "partial.bin").write_bytes(b"\0" * 4096)
            raise OSError(code, os.strerror(code))
        return real(self, *args, **kwargs)
    return append


def final_file_full(self, path, metadata):
    Path(path).write_bytes(b"\0" * 4096)  # a part of reference.safetensors is on disk
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


MIDWAY = {"spilling a capture (ENOSPC)": ("append", lambda: spill_full_after(4, errno.ENOSPC)),
          "spilling a capture (EDQUOT)": ("append", lambda: spill_full_after(4, errno.EDQUOT)),
          "writing reference.safetensors": ("finish", lambda: final_file_full)}


@pytest.mark.parametrize("existing", [False, True], ids=["new", "over-an-old-reference"])
@pytest.mark.parametrize("where", list(MIDWAY))
def test_make_reference_running_out_of_space_midway_leaves_nothing(hf_modules, standin, tmp_path, monkeypatch, capsys,
                                                                   where, existing):
    parent, out = tmp_path / "new", tmp_path / "new" / "ref"
    if existing:
        assert cli.main(make_reference(standin, out)) == 0
        before = {p.name: p.read_bytes() for p in out.iterdir()}
    attribute, replacement = MIDWAY[where]
    monkeypatch.setattr(parity_capture.SpillWriter, attribute, replacement())
    capsys.readouterr()
    assert cli.main(make_reference(standin, out, "--overwrite")) == 1
    message = one_error(capsys.readouterr().err)
    assert f"cannot write {out}: " in message and "midway" in message and "nothing partial is left" in message
    if existing:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before and os.listdir(parent) == ["ref"]
    else:
        assert not parent.exists()


# ---------------------------------------------------------------- glm4v parity --plot / --html

@pytest.fixture(scope="module")
def reports():
    return run_parity(BUNDLED_CHECKPOINT, BUNDLED_CHECKPOINT / "reference.safetensors", torch.float32, "cpu")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
@pytest.mark.parametrize("flag", ["--plot", "--html"])
def test_a_report_file_the_disk_cannot_hold_is_named_and_left_as_it_was(reports, flag, code, tmp_path, monkeypatch,
                                                                        capsys):
    real = Path.write_bytes

    def full_midway(self, data):
        if self.name.endswith(".tmp"):  # atomic.staged_file's hidden sibling: half of it, then a full disk
            real(self, data[:len(data) // 2])
            raise OSError(code, os.strerror(code))
        return real(self, data)
    monkeypatch.setattr(Path, "write_bytes", full_midway)
    path = tmp_path / "report"
    path.write_bytes(b"the previous report")
    args = SimpleNamespace(plot=path if flag == "--plot" else None, html=path if flag == "--html" else None)
    assert parity_cli.write_requested(reports, args, "bundled") is False
    words = "no space left on the device" if code == errno.ENOSPC else "disk quota exceeded"
    assert capsys.readouterr().err == f"glm4v parity: error: cannot write {flag} {path}: {words}\n"
    assert os.listdir(tmp_path) == ["report"] and path.read_bytes() == b"the previous report"


def test_the_atomic_write_removes_its_temporary_file_on_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_fsync", full_disk_midway())  # the bytes are in the hidden file, then ENOSPC
    with pytest.raises(OSError):
        atomic.write_file_atomically(tmp_path / "f", b"data")
    assert os.listdir(tmp_path) == []
