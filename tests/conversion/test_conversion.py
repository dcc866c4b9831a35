"""glm4v-convert: bit-identical round trips, streaming writer, atomic output, refused inputs."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
import weakref
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from helpers.broken_checkpoints import BAD_HF, BAD_NATIVE, SHARD1, SHARD2, broken_hf, broken_native
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import glm4v_conversion.convert as convert_module
from glm4v_conversion import atomic, safetensors_io
from glm4v_conversion.cli import build_parser, main, parse_size
from glm4v_conversion.config_check import ConfigError
from glm4v_conversion.convert import ConversionError, LossyCastWarning, convert
from glm4v_conversion.names import HF_IGNORED_BUFFERS, hf_to_native
from glm4v_conversion.safetensors_io import CheckpointError, MappedFiles, read_header, write_file

HF_FILES = ("config.json", "model.safetensors.index.json", SHARD1, SHARD2)


def digests(folder: Path, names=None) -> dict[str, str]:
    names = names or sorted(p.name for p in folder.iterdir())
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


def leftovers(parent: Path) -> list[str]:
    """Hidden staging or swap folders the converter may have left beside its output."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# --- the writer --------------------------------------------------------------------------------

def test_writer_bytes_equal_safetensors_save_file(fixtures_dir, tmp_path):
    tensors = load_file(fixtures_dir / "tiny" / SHARD2)
    write_file(tmp_path / "ours", tensors, {"format": "pt"})
    save_file(tensors, tmp_path / "theirs", metadata={"format": "pt"})
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "theirs").read_bytes()


def test_writer_orders_mixed_dtypes_like_safetensors(tmp_path):
    tensors = {f"t{i}": torch.arange(5 + i).to(d) for i, d in enumerate(
        [torch.bool, torch.uint8, torch.int8, torch.int16, torch.float16, torch.bfloat16, torch.int32,
         torch.float32, torch.float64, torch.int64])}
    write_file(tmp_path / "ours", tensors)
    save_file(tensors, tmp_path / "theirs")
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "theirs").read_bytes()


def test_writer_streams_in_chunks_and_casts(fixtures_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors_io, "CHUNK_BYTES", 1000)  # many chunks per tensor
    tensors = load_file(fixtures_dir / "tiny" / SHARD1)
    chunks = []
    written = write_file(tmp_path / "f32", tensors, dtype=torch.float32, on_bytes=chunks.append)
    assert max(chunks[1:]) <= 1000 and len(chunks) > 100  # chunks[0] is the header
    assert written == sum(chunks) == (tmp_path / "f32").stat().st_size
    back = load_file(tmp_path / "f32")
    assert all(back[n].dtype == torch.float32 and torch.equal(back[n], t.float()) for n, t in tensors.items())


# --- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["tiny", "narrow"])
def test_hf_native_hf_round_trip_is_byte_identical(fixture, fixtures_dir, tmp_path):
    convert(fixtures_dir / fixture, tmp_path / "native")
    result = convert(tmp_path / "native", tmp_path / "hf", to="hf")
    assert digests(tmp_path / "hf") == digests(fixtures_dir / fixture, HF_FILES)
    assert result.verified is True


@pytest.mark.parametrize("fixture", ["tiny", "narrow"])
def test_native_folder_holds_the_same_tensors_under_native_names(fixture, fixtures_dir, tmp_path):
    src, dst = fixtures_dir / fixture, tmp_path / "native"
    convert(src, dst)
    assert sorted(p.name for p in dst.iterdir()) == sorted([*HF_FILES, "glm4v_native.json"])
    assert (dst / "config.json").read_bytes() == (src / "config.json").read_bytes()
    for shard in (SHARD1, SHARD2):  # native shard k holds exactly HF shard k's tensors
        hf, native = load_file(src / shard), load_file(dst / shard)
        expected = {hf_to_native(n): t for n, t in hf.items() if n not in HF_IGNORED_BUFFERS}
        assert sorted(native) == sorted(expected)
        assert all(native[n].dtype == t.dtype and torch.equal(native[n].view(torch.int16), t.view(torch.int16))
                   for n, t in expected.items())
        _, metadata = read_header(dst / shard)
        assert metadata["format"] == "glm4v-native" and metadata["format_version"] == "1"
        assert metadata["dtype"] == "bfloat16" and metadata["source_files"] == shard
    provenance = json.loads((dst / "glm4v_native.json").read_text())
    assert (provenance["format"], provenance["format_version"], provenance["dtype"]) == (
        "glm4v-native", "1", "bfloat16")
    assert provenance["source"]["files"][SHARD1]["sha256"] == digests(src, [SHARD1])[SHARD1]
    src_index = json.loads((src / "model.safetensors.index.json").read_text())
    assert provenance["source"]["weight_map"] == src_index["weight_map"]
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for s in (SHARD1, SHARD2)
                                                  for t in load_file(dst / s).values())


def test_float32_round_trip_restores_the_bf16_originals(fixtures_dir, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # widening to float32 is exact: no warning
        convert(fixtures_dir / "tiny", tmp_path / "native", dtype=torch.float32)
    assert all(t.dtype == torch.float32 for t in load_file(tmp_path / "native" / SHARD2).values())
    assert json.loads((tmp_path / "native" / "config.json").read_text())["torch_dtype"] == "float32"
    with pytest.warns(LossyCastWarning, match="float32 to torch.bfloat16 loses precision"):
        result = convert(tmp_path / "native", tmp_path / "hf", to="hf", dtype=torch.bfloat16)
    assert digests(tmp_path / "hf", HF_FILES[1:]) == digests(fixtures_dir / "tiny", HF_FILES[1:])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert result.verified is True


def test_float16_cast_warns(fixtures_dir, tmp_path):
    with pytest.warns(LossyCastWarning, match="bfloat16 to torch.float16"):
        convert(fixtures_dir / "tiny", tmp_path / "native", dtype=torch.float16)
    assert {t.dtype for t in load_file(tmp_path / "native" / SHARD1).values()} == {torch.float16}


def test_resharded_native_still_rebuilds_the_original_files(fixtures_dir, tmp_path):
    convert(fixtures_dir / "narrow", tmp_path / "native", max_shard_size=3 * 10**6)
    shards = sorted((tmp_path / "native").glob("model-*.safetensors"))
    assert len(shards) == 5 and shards[0].name == "model-00001-of-00005.safetensors"
    for shard in shards:  # at most the limit, unless one tensor alone exceeds it
        infos, _ = read_header(shard)
        assert sum(i.nbytes for i in infos.values()) <= 3 * 10**6 or len(infos) == 1
    convert(tmp_path / "native", tmp_path / "hf", to="hf")
    assert digests(tmp_path / "hf") == digests(fixtures_dir / "narrow", HF_FILES)


def test_hf_output_resharded_by_size(fixtures_dir, tmp_path):
    convert(fixtures_dir / "tiny", tmp_path / "native")
    result = convert(tmp_path / "native", tmp_path / "hf", to="hf", max_shard_size=500_000)
    assert result.verified is None
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{k}-of-00004.safetensors" for k in range(1, 5)]
    written = {n: t for f in files for n, t in load_file(tmp_path / "hf" / f).items()}
    original = {n: t for s in (SHARD1, SHARD2) for n, t in load_file(fixtures_dir / "tiny" / s).items()}
    assert sorted(written) == sorted(original) == sorted(index["weight_map"])
    assert all(torch.equal(written[n], t) for n, t in original.items())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in written.values())


def test_native_without_provenance_goes_to_one_hf_file_with_the_rotary_buffer(fixtures_dir, tmp_path):
    convert(fixtures_dir / "tiny", tmp_path / "native")
    (tmp_path / "native" / "glm4v_native.json").unlink()
    result = convert(tmp_path / "native", tmp_path / "hf", to="hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    written = load_file(tmp_path / "hf" / "model.safetensors")
    original = {n: t for s in (SHARD1, SHARD2) for n, t in load_file(fixtures_dir / "tiny" / s).items()}
    assert sorted(written) == sorted(original)
    assert all(torch.equal(written[n].view(torch.int16), t.view(torch.int16)) for n, t in original.items())
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses files without it
    assert result.verified is None


def test_single_hf_file_round_trips(fixtures_dir, tmp_path):
    convert(fixtures_dir / "tiny", tmp_path / "native")
    (tmp_path / "native" / "glm4v_native.json").unlink()
    convert(tmp_path / "native", tmp_path / "hf1", to="hf")
    convert(tmp_path / "hf1", tmp_path / "native1")
    assert sorted(p.name for p in (tmp_path / "native1").iterdir()) == ["config.json", "glm4v_native.json",
                                                                         "model.safetensors"]
    convert(tmp_path / "native1", tmp_path / "hf2", to="hf")
    assert digests(tmp_path / "hf2") == digests(tmp_path / "hf1")


def test_only_one_source_shard_is_mapped_at_a_time(fixtures_dir, tmp_path, monkeypatch):
    """Peak memory stays near one shard: the maps of shard k are gone before shard k+1 is mapped."""
    mapped: list[tuple[weakref.ref, set[str]]] = []
    real_tensor = MappedFiles.tensor

    def spy(self, info):
        if not mapped or mapped[-1][0]() is not self:
            assert all(ref() is None for ref, _ in mapped), "an earlier shard is still mapped"
            mapped.append((weakref.ref(self), set()))
        mapped[-1][1].add(info.file.name)
        return real_tensor(self, info)

    monkeypatch.setattr(MappedFiles, "tensor", spy)
    convert(fixtures_dir / "narrow", tmp_path / "native")
    assert [sorted(files) for _, files in mapped] == [[SHARD1], [SHARD2]]


# --- atomic output -----------------------------------------------------------------------------

def _fail_after_first_shard(monkeypatch, error: BaseException):
    calls = []

    def flaky(*args, **kwargs):
        if calls:
            raise error
        calls.append(args[0])
        return safetensors_io.write_file(*args, **kwargs)

    monkeypatch.setattr(convert_module, "write_file", flaky)
    return calls


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failure_midway_leaves_nothing(error, fixtures_dir, tmp_path, monkeypatch):
    calls = _fail_after_first_shard(monkeypatch, error)
    with pytest.raises(type(error)):
        convert(fixtures_dir / "tiny", tmp_path / "out" / "native")
    assert len(calls) == 1 and not calls[0].exists()  # the first shard was written, then removed
    assert not (tmp_path / "out").exists()  # the folder created for the output is removed too


def test_failure_midway_with_force_keeps_the_old_output(fixtures_dir, tmp_path, monkeypatch):
    convert(fixtures_dir / "tiny", tmp_path / "native")
    before = digests(tmp_path / "native")
    _fail_after_first_shard(monkeypatch, RuntimeError("disk on fire"))
    with pytest.raises(RuntimeError):
        convert(fixtures_dir / "narrow", tmp_path / "native", force=True)
    assert digests(tmp_path / "native") == before and leftovers(tmp_path) == []


def test_force_replaces_an_existing_output(fixtures_dir, tmp_path):
    convert(fixtures_dir / "tiny", tmp_path / "native")
    convert(fixtures_dir / "narrow", tmp_path / "native", force=True)
    assert (tmp_path / "native" / "config.json").read_bytes() == (fixtures_dir / "narrow" / "config.json").read_bytes()
    infos, _ = read_header(tmp_path / "native" / SHARD1)
    assert infos["text.embed.weight"].shape == (2048, 256) and leftovers(tmp_path) == []


def test_force_replace_without_the_atomic_exchange(fixtures_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # the two-rename fallback
    convert(fixtures_dir / "tiny", tmp_path / "native")
    convert(fixtures_dir / "narrow", tmp_path / "native", force=True)
    assert (tmp_path / "native" / "config.json").read_bytes() == (fixtures_dir / "narrow" / "config.json").read_bytes()
    assert leftovers(tmp_path) == []


def test_force_fallback_puts_the_old_output_back_when_the_swap_fails(fixtures_dir, tmp_path, monkeypatch):
    convert(fixtures_dir / "tiny", tmp_path / "native")
    before = digests(tmp_path / "native")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(a, b):
        if Path(a).name.startswith(".native.partial-"):
            raise OSError("rename failed")
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        convert(fixtures_dir / "narrow", tmp_path / "native", force=True)
    assert digests(tmp_path / "native") == before and leftovers(tmp_path) == []


def test_existing_destination_is_refused_without_force(fixtures_dir, tmp_path):
    convert(fixtures_dir / "tiny", tmp_path / "native")
    before = digests(tmp_path / "native")
    with pytest.raises(ConversionError, match=r"native already exists; pass --force to replace it"):
        convert(fixtures_dir / "narrow", tmp_path / "native")
    assert digests(tmp_path / "native") == before


def test_force_does_not_replace_a_folder_that_is_not_a_checkpoint(fixtures_dir, tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(ConversionError, match=r"is not a checkpoint folder \(no config.json\); refusing"):
        convert(fixtures_dir / "tiny", tmp_path / "home", force=True)
    assert (tmp_path / "home" / "thesis.tex").read_text() == "precious"


def test_destination_inside_source_is_refused(fixtures_dir, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(fixtures_dir / "tiny", src)
    with pytest.raises(ConversionError, match="must not be SRC"):
        convert(src, src / "native")
    with pytest.raises(ConversionError, match="must not be SRC"):
        convert(src, tmp_path, force=True)


def test_not_enough_disk_space(fixtures_dir, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(ConversionError, match=r"not enough free disk space in .*: the output needs 1.65 MB, only "
                                              r"1.00 MB are free"):
        convert(fixtures_dir / "tiny", tmp_path / "out" / "native")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


# --- refused inputs: a named error and nothing on disk -----------------------------------------

def test_native_source_given_as_hf_is_refused(fixtures_dir, tmp_path):
    convert(fixtures_dir / "tiny", tmp_path / "native")
    with pytest.raises(CheckpointError, match=r"native is a native-layout folder \(tensor names like '.+'\), but "
                                              r"an HF folder was expected; it converts to HF with --to hf"):
        convert(tmp_path / "native", tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_hf_source_given_as_native_is_refused(fixtures_dir, tmp_path):
    with pytest.raises(CheckpointError, match=r"is an HF-layout folder .* but a native folder was expected; it "
                                              r"converts to native without --to hf"):
        convert(fixtures_dir / "tiny", tmp_path / "out", to="hf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", list(BAD_HF))
def test_bad_hf_source_is_named_and_nothing_is_written(case, fixtures_dir, tmp_path):
    src = broken_hf(fixtures_dir, tmp_path, case)
    _, error, pattern = BAD_HF[case]
    with pytest.raises(error, match=pattern):
        convert(src, tmp_path / "out" / "native")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", list(BAD_NATIVE))
def test_bad_native_source_is_named_and_nothing_is_written(case, fixtures_dir, tmp_path):
    src = broken_native(fixtures_dir, tmp_path, case)
    _, error, pattern = BAD_NATIVE[case]
    with pytest.raises(error, match=pattern):
        convert(src, tmp_path / "out" / "hf", to="hf")
    assert not (tmp_path / "out").exists()


def test_config_without_a_size_is_named(fixtures_dir, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(fixtures_dir / "tiny", src)
    config = json.loads((src / "config.json").read_text())
    del config["vision_config"]["num_hidden_layers"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config.json: vision_config: missing required key 'num_hidden_layers'"):
        convert(src, tmp_path / "native")


def test_provenance_pointing_outside_the_folder_is_refused(fixtures_dir, tmp_path):
    convert(fixtures_dir / "tiny", tmp_path / "native")
    path = tmp_path / "native" / "glm4v_native.json"
    record = json.loads(path.read_text())
    record["source"]["weight_map"] = {n: "../escape.safetensors" for n in record["source"]["weight_map"]}
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"weight_map names an invalid file '../escape.safetensors'"):
        convert(tmp_path / "native", tmp_path / "hf", to="hf")
    assert not (tmp_path / "escape.safetensors").exists() and not (tmp_path / "hf").exists()


# --- the command line --------------------------------------------------------------------------

def test_cli_converts_both_ways_and_verifies(fixtures_dir, tmp_path, capsys):
    assert main([str(fixtures_dir / "tiny"), str(tmp_path / "native")]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"wrote {tmp_path / 'native'} (5 files, ") and "to native" in err  # progress on stderr
    assert main([str(tmp_path / "native"), str(tmp_path / "hf"), "--to", "hf", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "verified: every safetensors file is byte-identical to the original HF file" in out and err == ""
    assert digests(tmp_path / "hf") == digests(fixtures_dir / "tiny", HF_FILES)


def test_cli_errors_and_warnings_go_to_stderr(fixtures_dir, tmp_path, capsys):
    assert main([str(fixtures_dir / "tiny"), str(tmp_path / "n"), "--dtype", "float16", "--no-progress"]) == 0
    assert "glm4v-convert: warning: casting torch.bfloat16 to torch.float16 loses" in capsys.readouterr().err
    assert main([str(fixtures_dir / "tiny"), str(tmp_path / "n"), "--no-progress"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("glm4v-convert: error: ") and "already exists; pass --force" in err
    assert main([str(fixtures_dir / "tiny"), str(tmp_path / "n"), "--force", "--max-shard-size", "1GB",
                 "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "n").iterdir()) == ["config.json", "glm4v_native.json",
                                                                   "model.safetensors"]


def test_cli_rejects_a_bad_size(capsys):
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["a", "b", "--max-shard-size", "lots"])
    assert caught.value.code == 2 and "not a size: 'lots'" in capsys.readouterr().err


def test_help_runs_as_module_and_names_every_option():
    done = subprocess.run([sys.executable, "-m", "glm4v_conversion", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("usage: glm4v-convert ")
    for flag in ("--to {native,hf}", "--dtype {bfloat16,float16,float32}", "--max-shard-size SIZE", "--force",
                 "--no-progress", "SRC", "DST"):
        assert flag in done.stdout


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                        ("1000", 1000), ("1.5 gb", 15 * 10**8)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "5XB", "-1GB", "0", "GB"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_round_trip_keeps_an_unusual_inv_freq_and_file_metadata(fixtures_dir, tmp_path):
    """Originals we could not recompute (other inv_freq bytes, extra header metadata) still come back exactly."""
    src = tmp_path / "hf-odd"
    shutil.copytree(fixtures_dir / "tiny", src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / index["weight_map"]["transformer.rotary_pos_emb.inv_freq"]
    tensors = load_file(shard)
    tensors["transformer.rotary_pos_emb.inv_freq"] = torch.randn(tensors["transformer.rotary_pos_emb.inv_freq"].shape,
                                                                 dtype=torch.bfloat16)
    save_file(tensors, shard, metadata={"format": "pt", "producer": "someone else"})
    convert(src, tmp_path / "native")
    result = convert(tmp_path / "native", tmp_path / "hf", to="hf")
    assert digests(tmp_path / "hf") == digests(src, HF_FILES)
    assert result.verified is True
