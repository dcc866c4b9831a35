"""Messages: sizes in human units, a FIFO is not "missing", a read-only or virtual destination is not
"no disk space", the progress bar counts what it says; and the package imports lazily (importing
glm4v_core.config or glm4v_core.tokenizer does not import torch or triton)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple

import pytest

import glm4v_conversion.atomic as atomic
import glm4v_conversion.convert as convert_module
from glm4v_conversion import cli as convert_cli
from glm4v_conversion.convert import ConversionError, convert
from glm4v_conversion.files import human_size


@pytest.mark.parametrize("n,text", [(0, "0 B"), (1, "1 B"), (999, "999 B"), (1000, "1.00 kB"), (1_650_000, "1.65 MB"),
                                    (9_996, "10.0 kB"), (999_999, "1.00 MB"), (19_200_000_000, "19.2 GB"),
                                    (5 * 10**13, "50.0 TB")])
def test_human_size(n, text):
    assert human_size(n) == text


def test_convert_reports_sizes_in_human_units(fixtures_dir, tmp_path, capsys):
    assert convert_cli.main([str(fixtures_dir / "tiny"), str(tmp_path / "native"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "0.00 GB" not in out and " MB in " in out and "MB/s" in out, out


def test_not_enough_space_says_how_much_in_human_units(fixtures_dir, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 2000, 2000))
    with pytest.raises(ConversionError, match=r"needs 1\.\d\d MB, only 2.00 kB are free"):
        convert(fixtures_dir / "tiny", tmp_path / "native")


@pytest.mark.parametrize("code,words", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied"),
                                        (errno.EPERM, "operation not permitted")])
def test_unwritable_destination_is_not_called_a_full_disk(fixtures_dir, tmp_path, monkeypatch, code, words):
    def refuse(path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))
    monkeypatch.setattr(atomic, "_take_lock", refuse)
    with pytest.raises(ConversionError, match=f"cannot write .*{words}") as info:
        convert(fixtures_dir / "tiny", tmp_path / "a" / "native")
    assert "disk space" not in str(info.value)
    assert not (tmp_path / "a").exists()  # the folder made for the output is removed again


def test_read_only_file_system_is_named_before_writing(fixtures_dir, tmp_path, monkeypatch):
    real = os.statvfs

    class ReadOnly:
        def __init__(self, path):
            self.f_flag, self.f_blocks = real(path).f_flag | os.ST_RDONLY, 1
    monkeypatch.setattr(os, "statvfs", ReadOnly)
    with pytest.raises(ConversionError, match="is on a read-only file system"):
        convert(fixtures_dir / "tiny", tmp_path / "native")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_virtual_file_system_destination(fixtures_dir):
    with pytest.raises(ConversionError, match="virtual file system") as info:
        convert(fixtures_dir / "tiny", "/proc/glm4v-test/native")
    assert "disk space" not in str(info.value)


@pytest.mark.parametrize("to", ["native", "hf"])
def test_progress_bar_counts_what_it_says(fixtures_dir, tmp_path, monkeypatch, to):
    bars = []

    class Bar:
        def __init__(self, total, desc, **kwargs):
            self.total, self.desc, self.n = total, desc, 0
            bars.append(self)

        def update(self, n):
            self.n += n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(convert_module, "tqdm", Bar)
    src = fixtures_dir / "tiny"
    if to == "hf":
        convert(src, tmp_path / "native")
        src = tmp_path / "native"
    bars.clear()
    result = convert(src, tmp_path / "out", to=to, progress=True)
    (bar,) = bars
    written = sum((tmp_path / "out" / f).stat().st_size for f in result.files if f.endswith(".safetensors"))
    hashed = sum((fixtures_dir / "tiny" / f).stat().st_size for f in os.listdir(fixtures_dir / "tiny")
                 if f.startswith("model-")) if to == "native" else written  # hf: the outputs are verified
    assert bar.n == bar.total == written + hashed
    assert bar.desc == f"to {to}: write + sha256"  # it says it counts both


def test_fifo_is_not_reported_missing(tmp_path):
    from helpers.robustness import deadline

    from glm4v_core.processing.image import ImageError, load_image
    os.mkfifo(tmp_path / "x.png")
    with deadline(), pytest.raises(ImageError) as info:
        load_image(tmp_path / "x.png", 56)
    assert "FIFO" in str(info.value) and "not found" not in str(info.value) and "exist" not in str(info.value)


# --- lazy package imports ---------------------------------------------------------------------------

def _modules_after(code: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                          capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(done.stdout.splitlines()[-1]))


@pytest.mark.parametrize("module", ["glm4v_core.config", "glm4v_core", "glm4v_core.errors",
                                    "glm4v_core.processing.tokenizer",
                                    "glm4v_conversion.config_check",
                                    "glm4v_conversion.files"])
def test_light_imports_do_not_import_torch_or_triton(module):
    loaded = _modules_after(f"import {module}")
    assert module in loaded and not {"torch", "triton"} & loaded


def test_package_names_still_resolve_in_any_import_order():
    code = ("import glm4v_core.generation.loop, glm4v_core\n"
            "from glm4v_core import generate, stream_text, GLM4V, load_model, GLM4VConfig, InputError\n"
            "assert callable(generate) and generate.__module__ == 'glm4v_core.generation.loop', generate\n"
            "import glm4v_core as g\n"
            "assert g.generate is generate\n"
            "assert 'torch' in __import__('sys').modules")
    _modules_after(code)


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "no space left on the device"),
                                        (errno.EIO, "Input/output error"),
                                        (errno.EDQUOT, "disk quota exceeded")])
def test_write_error_midway_is_one_line_and_leaves_nothing(fixtures_dir, tmp_path, monkeypatch, capsys, code, words):
    def failing_write(path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))
    monkeypatch.setattr(convert_module, "write_file", failing_write)
    assert convert_cli.main([str(fixtures_dir / "tiny"), str(tmp_path / "native"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert words in err and "was not written" in err and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("dst", [".", "..", ""])
def test_destination_must_name_a_folder(fixtures_dir, tmp_path, monkeypatch, dst):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text("{}")  # looks like a checkpoint: --force must still not replace it
    with pytest.raises(ConversionError, match="DST must name the folder"):
        convert(fixtures_dir / "tiny", dst, force=True)
    assert os.listdir(tmp_path) == ["config.json"]
