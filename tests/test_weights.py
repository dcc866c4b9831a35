"""Loading HF and native folders: same model, zero-copy bf16, and a named error for each bad input.

The broken checkpoints (BAD_HF, BAD_NATIVE) are built in tmp_path by copying a fixture and
rewriting one file; tests/test_conversion.py feeds the same ones to the converter."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from glm4v_conversion.convert import convert
from glm4v_conversion.safetensors_io import CheckpointError, MappedFiles
from glm4v_core.config import ConfigError
from glm4v_core.weights import load_model

SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


# --- building broken checkpoints ---------------------------------------------------------------

def copy_checkpoint(src: Path, dst: Path) -> Path:
    """The checkpoint files of a fixture folder (not its reference outputs)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name == "config.json" or f.name.startswith("model") or f.name == "glm4v_native.json":
            shutil.copy(f, dst / f.name)
    return dst


def edit_shard(folder: Path, shard: str, edit) -> None:
    """Rewrite one shard with edit(tensors) and keep the index in step with its names."""
    tensors = edit({k: v.clone() for k, v in load_file(folder / shard).items()})
    save_file(tensors, folder / shard, metadata={"format": "pt"})
    index = json.loads((folder / INDEX).read_text())
    kept = {n: f for n, f in index["weight_map"].items() if f != shard or n in tensors}
    index["weight_map"] = {**kept, **{n: shard for n in tensors}}
    (folder / INDEX).write_text(json.dumps(index, indent=2))


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def _truncate(folder):
    path = folder / SHARD2
    path.write_bytes(path.read_bytes()[:-1000])


def _corrupt_header(folder):
    data = bytearray((folder / SHARD2).read_bytes())
    data[8:24] = b"#" * 16  # the JSON header now starts with garbage
    (folder / SHARD2).write_bytes(bytes(data))


def _huge_header_length(folder):
    data = bytearray((folder / SHARD1).read_bytes())
    data[:8] = (10**12).to_bytes(8, "little")
    (folder / SHARD1).write_bytes(bytes(data))


def _index_names_missing_file(folder):
    edit_json(folder / INDEX, lambda d: d["weight_map"].update({"transformer.vision.eoi": "model-00003-of-00003.safetensors"}))


def _drop(name):
    return lambda folder: edit_shard(folder, SHARD2, lambda t: {k: v for k, v in t.items() if k != name})


def _put(name, tensor):
    """Add a tensor to shard 2, or replace the one of that name."""
    return lambda folder: edit_shard(folder, SHARD2, lambda t: {**t, name: tensor})


def _config(key, value):
    return lambda folder: edit_json(folder / "config.json", lambda d: d.update({key: value}))


# name -> (break the tiny fixture's HF folder, error type, message pattern)
BAD_HF = {
    "missing shard": (lambda f: (f / SHARD2).unlink(), CheckpointError,
                      rf"names shard '{SHARD2}', which does not exist"),
    "truncated shard": (_truncate, CheckpointError, rf"{SHARD2}: truncated file: tensor '.+' ends at byte \d+, file has \d+"),
    "corrupt header": (_corrupt_header, CheckpointError, rf"{SHARD2}: corrupt safetensors header"),
    "header length past the end": (_huge_header_length, CheckpointError,
                                   rf"{SHARD1}: corrupt safetensors header \(declares 1000000000000 header bytes"),
    "index names a missing file": (_index_names_missing_file, CheckpointError,
                                   r"names shard 'model-00003-of-00003.safetensors', which does not exist"),
    "missing tensor": (_drop("transformer.vision.eoi"), CheckpointError,
                       r"missing tensor 'transformer.vision.eoi', which .*config.json requires"),
    "unexpected tensor": (_put("transformer.vision.extra_scale", torch.ones(1, dtype=torch.bfloat16)), CheckpointError,
                          rf"{SHARD2}: unexpected tensor 'transformer.vision.extra_scale'"),
    "layer beyond the config": (_put("transformer.encoder.layers.2.input_layernorm.weight",
                                     torch.ones(128, dtype=torch.bfloat16)), CheckpointError,
                                r"unexpected tensor 'transformer.encoder.layers.2.input_layernorm.weight'"),
    "native name in an HF folder": (_put("text.extra", torch.ones(1, dtype=torch.bfloat16)), CheckpointError,
                                    r"mixes HF names .* and native names \('text.extra'\)"),
    "wrong shape": (_put("transformer.vision.boi", torch.zeros(1, 1, 127, dtype=torch.bfloat16)), CheckpointError,
                    rf"{SHARD2}: tensor 'transformer.vision.boi' has shape \[1, 1, 127\], but .*config.json implies \[1, 1, 128\]"),
    "int dtype": (_put("transformer.vision.boi", torch.zeros(1, 1, 128, dtype=torch.int32)), CheckpointError,
                  rf"{SHARD2}: tensor 'transformer.vision.boi' has dtype torch.int32; weights must be float"),
    "config hidden_size changed": (_config("hidden_size", 96), CheckpointError,
                                   rf"{SHARD1}: tensor 'transformer.embedding.word_embeddings.weight' has shape "
                                   r"\[1024, 128\], but .*config.json implies \[1024, 96\]"),
    "config num_layers changed": (_config("num_layers", 3), CheckpointError,
                                  r"missing tensor 'transformer.encoder.layers.2.input_layernorm.weight'"),
}


def _native_mixed_dtype(folder):
    shard = next(folder.glob("model-*.safetensors"))
    tensors = {k: v.clone() for k, v in load_file(shard).items()}
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].float()
    save_file(tensors, shard, metadata={"format": "glm4v-native", "format_version": "1"})


def _native_version(folder):
    edit_json(folder / "glm4v_native.json", lambda d: d.update({"format_version": "2"}))


BAD_NATIVE = {
    "tensor dtype differs from the rest": (_native_mixed_dtype, CheckpointError,
                                           r"is torch.float32, but a native checkpoint holds one dtype and "
                                           r"glm4v_native.json records bfloat16"),
    "newer format version": (_native_version, CheckpointError, r"glm4v_native.json: format_version '2'"),
}


def broken_hf(fixtures_dir: Path, tmp_path: Path, case: str) -> Path:
    folder = copy_checkpoint(fixtures_dir / "tiny", tmp_path / "bad")
    BAD_HF[case][0](folder)
    return folder


def broken_native(fixtures_dir: Path, tmp_path: Path, case: str) -> Path:
    folder = tmp_path / "bad"
    convert(fixtures_dir / "tiny", folder)
    BAD_NATIVE[case][0](folder)
    return folder


# --- loading good checkpoints ------------------------------------------------------------------

def _input_ids(fixture_dir: Path) -> torch.Tensor:
    ids = json.loads((fixture_dir / "reference.json").read_text())["inputs"]["b"]["input_ids"]
    return torch.tensor([ids])


@pytest.mark.parametrize("fixture", ["tiny", "narrow"])
def test_native_and_hf_folders_give_identical_logits(fixture, fixtures_dir, tmp_path):
    convert(fixtures_dir / fixture, tmp_path / "native")
    ids = _input_ids(fixtures_dir / fixture)
    with torch.no_grad():
        hf = load_model(fixtures_dir / fixture, dtype=torch.float32)(ids).logits
        native = load_model(tmp_path / "native", dtype=torch.float32)(ids).logits
    assert hf.dtype == native.dtype == torch.float32
    assert torch.equal(hf, native), (hf - native).abs().max()


def test_single_file_native_folder_loads(fixtures_dir, tmp_path):
    convert(fixtures_dir / "tiny", tmp_path / "native", max_shard_size=10**9)
    assert sorted(p.name for p in (tmp_path / "native").iterdir()) == ["config.json", "glm4v_native.json",
                                                                        "model.safetensors"]
    ids = _input_ids(fixtures_dir / "tiny")
    with torch.no_grad():
        a = load_model(fixtures_dir / "tiny")(ids).logits
        b = load_model(tmp_path / "native")(ids).logits
    assert torch.equal(a, b)


def test_single_file_hf_folder_loads(fixtures_dir, tmp_path):
    convert(fixtures_dir / "tiny", tmp_path / "native")
    (tmp_path / "native" / "glm4v_native.json").unlink()  # nothing records the two original shards
    convert(tmp_path / "native", tmp_path / "hf", to="hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    ids = _input_ids(fixtures_dir / "tiny")
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "hf")(ids).logits, load_model(fixtures_dir / "tiny")(ids).logits)


def test_bf16_load_is_zero_copy_views_of_the_files(fixtures_dir, tmp_path):
    convert(fixtures_dir / "tiny", tmp_path / "native")
    sizes = {p.stat().st_size for p in (tmp_path / "native").glob("*.safetensors")}
    model = load_model(tmp_path / "native", dtype=torch.bfloat16)
    storages = {p.untyped_storage().nbytes() for p in model.parameters()}
    assert storages <= sizes, "some parameter is not a view of a mapped shard"
    fp32 = load_model(tmp_path / "native", dtype=torch.float32)  # control: a cast must copy
    assert not {p.untyped_storage().nbytes() for p in fp32.parameters()} <= sizes


def test_loaded_values_are_the_stored_values(fixtures_dir):
    model = load_model(fixtures_dir / "narrow", dtype=torch.bfloat16)
    stored = load_file(fixtures_dir / "narrow" / SHARD2)
    assert torch.equal(model.projector.boi, stored["transformer.vision.boi"])
    assert torch.equal(model.text.lm_head.weight, stored["transformer.output_layer.weight"])


def test_hf_folder_without_the_rotary_buffer_loads(fixtures_dir, tmp_path):
    folder = copy_checkpoint(fixtures_dir / "tiny", tmp_path / "hf")
    edit_shard(folder, SHARD1, lambda t: {k: v for k, v in t.items() if k != "transformer.rotary_pos_emb.inv_freq"})
    ids = _input_ids(fixtures_dir / "tiny")
    with torch.no_grad():
        assert torch.equal(load_model(folder)(ids).logits, load_model(fixtures_dir / "tiny")(ids).logits)


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(BAD_HF))
def test_bad_hf_checkpoint_is_named(case, fixtures_dir, tmp_path):
    folder = broken_hf(fixtures_dir, tmp_path, case)
    _, error, pattern = BAD_HF[case]
    with pytest.raises(error, match=pattern) as caught:
        load_model(folder)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("case", list(BAD_NATIVE))
def test_bad_native_checkpoint_is_named(case, fixtures_dir, tmp_path):
    folder = broken_native(fixtures_dir, tmp_path, case)
    _, error, pattern = BAD_NATIVE[case]
    with pytest.raises(error, match=pattern):
        load_model(folder)


def test_native_mixed_dtype_without_provenance_names_the_odd_tensor(fixtures_dir, tmp_path):
    folder = broken_native(fixtures_dir, tmp_path, "tensor dtype differs from the rest")
    (folder / "glm4v_native.json").unlink()
    with pytest.raises(CheckpointError, match=r"is torch.float32, but a native checkpoint holds one dtype and the other tensors are bfloat16"):
        load_model(folder)


def test_config_that_cannot_be_read_is_a_config_error(fixtures_dir, tmp_path):
    folder = copy_checkpoint(fixtures_dir / "tiny", tmp_path / "bad")
    edit_json(folder / "config.json", lambda d: d.pop("kv_channels"))
    with pytest.raises(ConfigError, match=r"config.json: config: missing required key 'kv_channels'"):
        load_model(folder)


def test_no_tensor_data_is_read_before_the_checks(fixtures_dir, tmp_path, monkeypatch):
    folder = broken_hf(fixtures_dir, tmp_path, "wrong shape")

    def touched(*_):
        raise AssertionError("tensor data mapped before the checkpoint was checked")

    monkeypatch.setattr(MappedFiles, "tensor", touched)
    with pytest.raises(CheckpointError, match="has shape"):
        load_model(folder)


def test_meta_build_skips_torch_python_meta_kernels(fixtures_dir):
    """normal_ on a meta tensor would import sympy and ~900 modules (1-2 s) on first use."""
    code = ("import sys, json; from glm4v_core.config import GLM4VConfig; "
            "from glm4v_core.weights import build_meta_model; before = set(sys.modules); "
            f"m = build_meta_model(GLM4VConfig.from_json({str(fixtures_dir / 'tiny' / 'config.json')!r})); "
            "assert all(t.is_meta for t in m.state_dict().values()); "
            "print(sorted(n for n in set(sys.modules) - before if n.startswith(('sympy', 'torch._refs'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
