"""Loading HF and native folders: same model, zero-copy bf16, and a named error for each bad input.

The broken checkpoints (BAD_HF, BAD_NATIVE) are built in tmp_path by copying a fixture and
rewriting one file; tests/test_conversion.py feeds the same ones to the converter."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.broken_checkpoints import (
    BAD_HF,
    BAD_NATIVE,
    SHARD1,
    SHARD2,
    broken_hf,
    broken_native,
    copy_checkpoint,
    edit_json,
    edit_shard,
)
from safetensors.torch import load_file

from glm4v_conversion.convert import convert
from glm4v_conversion.safetensors_io import CheckpointError, MappedFiles
from glm4v_core.checkpoint import load_model
from glm4v_core.config import ConfigError

# --- building broken checkpoints ---------------------------------------------------------------

































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
    with pytest.raises(CheckpointError, match=r"is torch.float32, but a native checkpoint holds one dtype "
                                              r"and the other tensors are bfloat16"):
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
            "from glm4v_core.checkpoint import build_meta_model; before = set(sys.modules); "
            f"m = build_meta_model(GLM4VConfig.from_json({str(fixtures_dir / 'tiny' / 'config.json')!r})); "
            "assert all(t.is_meta for t in m.state_dict().values()); "
            "print(sorted(n for n in set(sys.modules) - before if n.startswith(('sympy', 'torch._refs'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
