"""Special files and links: a FIFO, device, socket, folder, symlink loop or dangling link where a file
is expected is refused by name (never opened for a blocking read); symlinked and looping
destinations of the converter give clean errors, and --force through a symlink succeeds."""
from __future__ import annotations

import os

import pytest
from helpers.robustness import SPECIAL_KINDS, deadline, linked_copy, make_special

from glm4v_conversion.config_check import ConfigError
from glm4v_conversion.convert import ConversionError, convert
from glm4v_conversion.safetensors_io import CheckpointError
from glm4v_core import cli
from glm4v_core.checkpoint import load_model
from glm4v_core.parity import cli as parity_cli
from glm4v_core.processing.image import ImageError, load_image
from glm4v_core.processing.tokenizer import Tokenizer, TokenizerError

SHARD1 = "model-00001-of-00002.safetensors"


@pytest.fixture
def tiny(fixtures_dir, tmp_path):
    return linked_copy(fixtures_dir / "tiny", tmp_path / "tiny")


def _loader(folder):
    load_model(folder)


def _converter(folder):
    convert(folder, folder.parent / "out")


# target file -> (what to call on the folder, the error class expected)
CHECKPOINT_FILES = {
    "config.json": [(_loader, ConfigError), (_converter, CheckpointError)],
    SHARD1: [(_loader, CheckpointError), (_converter, CheckpointError)],
    "model.safetensors.index.json": [(_loader, CheckpointError), (_converter, CheckpointError)],
}


@pytest.mark.parametrize("kind", SPECIAL_KINDS)
@pytest.mark.parametrize("target", CHECKPOINT_FILES)
def test_checkpoint_file_that_is_not_a_file(tiny, target, kind):
    make_special(tiny / target, kind)
    for call, error in CHECKPOINT_FILES[target]:
        with deadline(), pytest.raises(error) as info:
            call(tiny)
        message = str(info.value)
        assert target in message and SPECIAL_KINDS[kind] in message, message
    assert not (tiny.parent / "out").exists()


@pytest.mark.parametrize("kind", SPECIAL_KINDS)
def test_provenance_file_that_is_not_a_file(fixtures_dir, tmp_path, kind):
    convert(fixtures_dir / "tiny", tmp_path / "native")
    make_special(tmp_path / "native" / "glm4v_native.json", kind)
    with deadline(), pytest.raises(CheckpointError, match=f"glm4v_native.json.*{SPECIAL_KINDS[kind]}"):
        load_model(tmp_path / "native")


@pytest.mark.parametrize("kind", SPECIAL_KINDS)
def test_checkpoint_folder_that_is_not_a_folder(tmp_path, kind):
    if kind == "folder":
        pytest.skip("a folder is what is expected here")
    folder = tmp_path / "ckpt"
    make_special(folder, kind)
    with deadline(), pytest.raises((CheckpointError, ConfigError), match="ckpt"):
        load_model(folder)
    with deadline(), pytest.raises((CheckpointError, ConfigError), match="ckpt"):
        convert(folder, tmp_path / "out")


@pytest.mark.parametrize("kind", SPECIAL_KINDS)
def test_tokenizer_file_that_is_not_a_file(tmp_path, kind):
    path = tmp_path / "tokenizer.model"
    make_special(path, kind)
    with deadline(), pytest.raises(TokenizerError, match=f"tokenizer.model.*{SPECIAL_KINDS[kind]}"):
        Tokenizer.from_file(path)
    with deadline(), pytest.raises(TokenizerError, match=f"tokenizer.model.*{SPECIAL_KINDS[kind]}"):
        Tokenizer.from_checkpoint(tmp_path)


@pytest.mark.parametrize("kind", SPECIAL_KINDS)
def test_image_that_is_not_a_file(tmp_path, kind):
    path = tmp_path / "cat.png"
    make_special(path, kind)
    with deadline(), pytest.raises(ImageError, match=f"cat.png.*{SPECIAL_KINDS[kind]}") as info:
        load_image(path, 56)
    if kind == "fifo":
        assert "does not exist" not in str(info.value) and "not found" not in str(info.value)


@pytest.mark.parametrize("kind", SPECIAL_KINDS)
@pytest.mark.parametrize("target", ["reference.safetensors", "reference.json"])
def test_parity_reference_that_is_not_a_file(tiny, capsys, kind, target):
    make_special(tiny / target, kind)
    with deadline():
        rc = parity_cli.main(["--checkpoint", str(tiny)])
    err = capsys.readouterr().err
    assert rc == 1 and target in err and "Traceback" not in err, err


# --- destinations ---------------------------------------------------------------------------------

def test_force_through_a_symlinked_destination_replaces_its_target(fixtures_dir, tmp_path):
    real = tmp_path / "disk" / "native"
    convert(fixtures_dir / "tiny", real)
    link = tmp_path / "current"
    link.symlink_to(real)
    with pytest.raises(ConversionError, match="already exists.*symlink"):
        convert(fixtures_dir / "narrow", link)
    result = convert(fixtures_dir / "narrow", link, force=True)  # must not report failure after replacing
    assert link.is_symlink() and os.path.realpath(link) == str(real)
    assert (real / "config.json").read_bytes() == (fixtures_dir / "narrow" / "config.json").read_bytes()
    assert result.dst == real
    assert sorted(p.name for p in real.parent.iterdir() if p.name.startswith(".")) == []
    load_model(link)


@pytest.mark.parametrize("kind,words", [("symlink_loop", "symlink loop"), ("dangling_symlink", "not found")])
@pytest.mark.parametrize("force", [False, True])
def test_looping_or_dangling_destination_is_refused(fixtures_dir, tmp_path, kind, words, force):
    dst = tmp_path / "native"
    make_special(dst, kind)
    with deadline(), pytest.raises(ConversionError, match=f"native is a symlink to .*{words}"):
        convert(fixtures_dir / "tiny", dst, force=force)
    assert dst.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["native"]


@pytest.mark.parametrize("kind", ["fifo", "char_device", "socket"])
def test_force_refuses_a_destination_that_is_a_special_file(fixtures_dir, tmp_path, kind):
    dst = tmp_path / "native"
    make_special(dst, kind)
    with deadline(), pytest.raises(ConversionError, match="not a checkpoint folder"):
        convert(fixtures_dir / "tiny", dst, force=True)


def test_a_huge_file_where_a_small_one_is_expected_is_not_read(tmp_path, monkeypatch):
    import glm4v_conversion.files as files
    monkeypatch.setattr(files, "MAX_SMALL_FILE_BYTES", 1000)
    big = tmp_path / "model.safetensors"
    big.write_bytes(bytes(5000))
    with pytest.raises(TokenizerError, match=r"tokenizer vocabulary .*model.safetensors is 5.00 kB, more than"):
        Tokenizer.from_file(big)
    (tmp_path / "config.json").write_bytes(b" " * 5000)
    with pytest.raises(ConfigError, match="config.json is 5.00 kB"):
        load_model(tmp_path)


@pytest.mark.parametrize("kind", ["fifo", "folder", "symlink_loop"])
def test_checkpoint_tokenizer_that_is_not_a_file_is_named_not_skipped(tiny, capsys, kind):
    """The CLI must not fall back to the bundled vocabulary when the checkpoint's own tokenizer.model is unusable."""
    pass
    make_special(tiny / "tokenizer.model", kind)
    with deadline():
        rc = cli.main(["generate", "--checkpoint", str(tiny), "hi"])
    err = capsys.readouterr().err
    assert rc == 1 and "tokenizer.model" in err and SPECIAL_KINDS[kind] in err, err
