"""Broken copies of the tiny checkpoint, one per way a file can be wrong (shared by the loader and converter tests)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from glm4v_conversion.convert import convert
from glm4v_conversion.safetensors_io import CheckpointError

INDEX = "model.safetensors.index.json"


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


SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"










def copy_checkpoint(src: Path, dst: Path) -> Path:
    """The checkpoint files of a fixture folder (not its reference outputs)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name == "config.json" or f.name.startswith("model") or f.name == "glm4v_native.json":
            shutil.copy(f, dst / f.name)
    return dst


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
    edit_json(folder / INDEX,
              lambda d: d["weight_map"].update({"transformer.vision.eoi": "model-00003-of-00003.safetensors"}))


def _drop(name):
    return lambda folder: edit_shard(folder, SHARD2, lambda t: {k: v for k, v in t.items() if k != name})


def _put(name, tensor):
    """Add a tensor to shard 2, or replace the one of that name."""
    return lambda folder: edit_shard(folder, SHARD2, lambda t: {**t, name: tensor})


def _config(key, value):
    return lambda folder: edit_json(folder / "config.json", lambda d: d.update({key: value}))


def _native_mixed_dtype(folder):
    shard = next(folder.glob("model-*.safetensors"))
    tensors = {k: v.clone() for k, v in load_file(shard).items()}
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].float()
    save_file(tensors, shard, metadata={"format": "glm4v-native", "format_version": "1"})


def _native_version(folder):
    edit_json(folder / "glm4v_native.json", lambda d: d.update({"format_version": "2"}))


# name -> (break the tiny fixture's HF folder, error type, message pattern)
BAD_HF = {
    "missing shard": (lambda f: (f / SHARD2).unlink(), CheckpointError,
                      rf"names shard '{SHARD2}', which does not exist"),
    "truncated shard": (_truncate, CheckpointError,
                        rf"{SHARD2}: truncated file: tensor '.+' ends at byte \d+, file has \d+"),
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
                    rf"{SHARD2}: tensor 'transformer.vision.boi' has shape \[1, 1, 127\], "
                    r"but .*config.json implies \[1, 1, 128\]"),
    "int dtype": (_put("transformer.vision.boi", torch.zeros(1, 1, 128, dtype=torch.int32)), CheckpointError,
                  rf"{SHARD2}: tensor 'transformer.vision.boi' has dtype torch.int32; weights must be float"),
    "config hidden_size changed": (_config("hidden_size", 96), CheckpointError,
                                   rf"{SHARD1}: tensor 'transformer.embedding.word_embeddings.weight' has shape "
                                   r"\[1024, 128\], but .*config.json implies \[1024, 96\]"),
    "config num_layers changed": (_config("num_layers", 3), CheckpointError,
                                  r"missing tensor 'transformer.encoder.layers.2.input_layernorm.weight'"),
}


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
