"""Headers and configs: absurd safetensors headers are refused before any allocation, tensors that
share bytes are refused, and one config check (glm4v_conversion.config_check) makes the converter
and the loader refuse exactly the same config.json, before anything is written or loaded."""
from __future__ import annotations

import json
import math
import struct
import tracemalloc

import pytest
import torch
from helpers.robustness import linked_copy

from glm4v_conversion.config_check import ConfigError, check_config
from glm4v_conversion.convert import convert
from glm4v_conversion.safetensors_io import CheckpointError, read_header
from glm4v_core.checkpoint import load_model
from glm4v_core.config import GLM4VConfig

GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}


def write_raw(path, header, data=bytes(32), header_len=None) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if header_len is None else header_len) + text + data)


def entry(**change):
    return {"a": {**GOOD["a"], **change}, "b": GOOD["b"]}


BAD_HEADERS = {
    "header length 2**64-1": (GOOD, {"header_len": 2**64 - 1}, "corrupt safetensors header"),
    "header length past the end": (GOOD, {"header_len": 10**6}, "corrupt safetensors header"),
    "header length 0": (GOOD, {"header_len": 0}, "corrupt safetensors header"),
    "header not an object": ([1, 2], {}, "not a JSON object"),
    "metadata not an object": ({**GOOD, "__metadata__": [1]}, {}, "__metadata__"),
    "entry not an object": ({"a": 5}, {}, "needs dtype, shape and data_offsets"),
    "negative offset": (entry(data_offsets=[-16, 0]), {}, "non-negative integers"),
    "offsets beyond the file": (entry(data_offsets=[2**40, 2**40 + 16]), {}, "truncated file"),
    "offsets overflowing 64 bits": (entry(data_offsets=[2**64, 2**64 + 16]), {}, "truncated file"),
    "begin after end": (entry(data_offsets=[16, 0]), {}, "0 <= begin <= end"),
    "float offsets": (entry(data_offsets=[0.0, 16.0]), {}, "non-negative integers"),
    "string offsets": (entry(data_offsets=["0", "16"]), {}, "non-negative integers"),
    "three offsets": (entry(data_offsets=[0, 8, 16]), {}, "two non-negative integers"),
    "negative dimension": (entry(shape=[-2, -2]), {}, "non-negative integers"),
    "bool dimension": (entry(shape=[True, 4]), {}, "non-negative integers"),
    "absurd shape": (entry(shape=[2**62, 2**62]), {}, "needs"),
    "unknown dtype": (entry(dtype="F8_E4M3"), {}, "does not support"),
    "dtype not a string": (entry(dtype=7), {}, "dtype must be a string"),
    "two tensors on the same bytes": ({"a": GOOD["a"], "b": {**GOOD["a"]}}, {}, "share bytes"),
    "metadata values not strings": ({**GOOD, "__metadata__": {"format": 1}}, {}, "__metadata__ must map"),
    "tensor named twice": (b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, '
                           b'"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}', {}, "'a' appears twice"),
    "header nested too deeply": (b"[" * 100_000 + b"]" * 100_000, {}, "nested too deeply"),
    "two tensors overlapping": ({"a": GOOD["a"], "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, {},
                                "share bytes"),
}


@pytest.mark.parametrize("case", BAD_HEADERS)
def test_absurd_header_is_refused_before_any_allocation(tmp_path, case):
    header, options, words = BAD_HEADERS[case]
    path = tmp_path / "bad.safetensors"
    write_raw(path, header, **options)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=words) as info:
            read_header(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "bad.safetensors" in str(info.value)
    assert peak < 1_000_000, f"{peak} bytes allocated while refusing a {path.stat().st_size}-byte file"


def test_header_length_within_the_format_limit_but_past_the_file_reads_nothing(tmp_path):
    """50 MB declared (under the format's 100 MB cap) in a 100-byte file: refused without reading 50 MB."""
    path = tmp_path / "bad.safetensors"
    write_raw(path, GOOD, header_len=50 * 10**6)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="declares 50000000 header bytes"):
            read_header(path)
        assert tracemalloc.get_traced_memory()[1] < 1_000_000
    finally:
        tracemalloc.stop()


def test_short_file_and_good_file(tmp_path):
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="no header"):
        read_header(tmp_path / "short.safetensors")
    write_raw(tmp_path / "ok.safetensors", GOOD)
    tensors, _ = read_header(tmp_path / "ok.safetensors")  # the control case: the helper writes valid files
    assert {n: t.shape for n, t in tensors.items()} == {"a": (2, 2), "b": (4,)}


def test_zero_size_tensors_may_share_an_offset(tmp_path):
    write_raw(tmp_path / "ok.safetensors", {**GOOD, "e": {"dtype": "F32", "shape": [0], "data_offsets": [16, 16]}})
    assert read_header(tmp_path / "ok.safetensors")[0]["e"].nbytes == 0


# --- configs ----------------------------------------------------------------------------------------

def _v(**change):
    return lambda c: {**c, "vision_config": {**c["vision_config"], **change}}


def _t(**change):
    return lambda c: {**c, **change}


BAD_CONFIGS = {
    "hidden_size 0": (_t(hidden_size=0), "hidden_size must be a positive integer below 2"),
    "num_layers -1": (_t(num_layers=-1), "num_layers must be a positive integer below 2"),
    "padded_vocab_size 0": (_t(padded_vocab_size=0), "padded_vocab_size must be a positive integer below 2"),
    "seq_length 0": (_t(seq_length=0), "seq_length must be a positive integer below 2"),
    "kv groups 0": (_t(multi_query_group_num=0), "multi_query_group_num must be a positive integer below 2"),
    "heads not divisible by groups": (_t(multi_query_group_num=3), "not a multiple of multi_query_group_num"),
    "kv_channels not a multiple of 4": (_t(kv_channels=30), "multiple of 4"),
    "vision hidden not divisible by heads": (_v(num_heads=3), "not a multiple of num_heads"),
    "vision heads 0": (_v(num_heads=0), "num_heads must be a positive integer below 2"),
    "epsilon 0": (_t(layernorm_epsilon=0), "layernorm_epsilon must be a finite number > 0"),
    "epsilon negative": (_t(layernorm_epsilon=-1e-5), "layernorm_epsilon must be a finite number > 0"),
    "epsilon NaN": (_t(layernorm_epsilon=math.nan), "layernorm_epsilon must be a finite number > 0"),
    "epsilon inf": (_t(layernorm_epsilon=math.inf), "layernorm_epsilon must be a finite number > 0"),
    "vision epsilon 0": (_v(layer_norm_eps=0.0), "layer_norm_eps must be a finite number > 0"),
    "rope ratio 0": (_t(rope_ratio=0), "rope_ratio must be a finite number > 0"),
    "rope ratio negative": (_t(rope_ratio=-2.0), "rope_ratio must be a finite number > 0"),
    "rope ratio NaN": (_t(rope_ratio=math.nan), "rope_ratio must be a finite number > 0"),
    "scaling factor 0": (_v(scaling_factor=0), "scaling_factor must be a finite number > 0"),
    "image size not a multiple of the patch": (_v(image_size=60), "image_size 60 must be a multiple of patch_size 14"),
    "odd patch grid": (_v(image_size=42, num_positions=10), "even number of patches"),
    "positions disagree": (_v(num_positions=16), "num_positions is 16"),
    "unknown key": (_t(rope_scaling={"type": "linear"}), r"unknown key\(s\) \['rope_scaling'\]"),
    "unknown vision key": (_v(use_rope=True), r"vision_config: unknown key\(s\) \['use_rope'\]"),
    "string size": (_t(hidden_size="128"), "hidden_size must be an integer, got '128'"),
    "bool size": (_t(num_layers=True), "num_layers must be an integer, got True"),
    "string epsilon": (_t(layernorm_epsilon="1e-5"), "layernorm_epsilon must be a number"),
    "empty eos list": (_t(eos_token_id=[]), "eos_token_id must be a token id or a non-empty list"),
    "eos outside the vocabulary": (_t(eos_token_id=[801, 5000]), r"eos_token_id 5000 is not a token id"),
    "negative pad id": (_t(pad_token_id=-1), "pad_token_id -1 is not a token id"),
    "unsupported switch": (_t(rmsnorm=False), "rmsnorm=False is not supported"),
    "num_hidden_layers disagrees": (_t(num_hidden_layers=99), r"num_hidden_layers \(99\) must equal num_layers"),
    "transformers-native layout": (_t(model_type="glm"), "glm-4-9b-chat-hf"),
    "GLM-4-0414": (_t(model_type="glm4"), "GLM-4-0414"),
    "image ids without vision_config": (lambda c: {k: v for k, v in c.items() if k != "vision_config"} | {
        "boi_token_id": "x"}, "boi_token_id must be an integer"),
    "vision_config not an object": (_t(vision_config=[1]), "vision_config"),
    "size past 2**31": (_t(ffn_hidden_size=2**40), "ffn_hidden_size must be a positive integer below 2"),
    "vocabulary past 2**31": (_t(padded_vocab_size=10**30), "padded_vocab_size must be a positive integer below 2"),
    "missing key": (lambda c: {k: v for k, v in c.items() if k != "kv_channels"}, "missing required key 'kv_channels'"),
}


@pytest.fixture(scope="module")
def tiny_config(fixtures_dir):
    return json.loads((fixtures_dir / "tiny" / "config.json").read_text())


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_is_refused_alike_by_validator_loader_and_converter(fixtures_dir, tmp_path, tiny_config, case):
    change, words = BAD_CONFIGS[case]
    bad = change(tiny_config)
    with pytest.raises(ConfigError, match=words):
        check_config(bad)
    with pytest.raises(ConfigError, match=words):
        GLM4VConfig.from_hf(bad)
    folder = linked_copy(fixtures_dir / "tiny", tmp_path / "ckpt")
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(bad))  # json writes NaN/Infinity, as a careless tool would
    with pytest.raises(ConfigError, match=words):
        load_model(folder)
    with pytest.raises(ConfigError, match=f"config.json: .*{words}"):
        convert(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_every_fixture_config_passes_and_a_converted_folder_loads(fixtures_dir, tmp_path, tiny_config):
    for name in ("tiny", "narrow"):
        check_config(json.loads((fixtures_dir / name / "config.json").read_text()))
    check_config(json.loads((fixtures_dir / "real_manifest.json").read_text())["config"])
    assert check_config(tiny_config) is not tiny_config and tiny_config.get("rope_ratio") == 1  # input untouched
    convert(fixtures_dir / "tiny", tmp_path / "native")
    load_model(tmp_path / "native")


def test_config_dataclasses_and_validator_agree_on_the_keys(tiny_config):
    """The dataclasses are built from the validated dict: every field's HF key is a checked key."""
    import dataclasses

    from glm4v_conversion.config_check import ALIASES, IMAGE_KEYS, TEXT_KEYS, VISION_KEYS
    from glm4v_core.config import VisionConfig
    text = {GLM4VConfig._HF_NAMES.get(f.name, f.name) for f in dataclasses.fields(GLM4VConfig)}
    vision = {VisionConfig._HF_NAMES.get(f.name, f.name) for f in dataclasses.fields(VisionConfig)}
    assert text == set(TEXT_KEYS) | set(IMAGE_KEYS) | set(ALIASES) and vision == set(VISION_KEYS)


# --- provenance (glm4v_native.json) edited by hand ------------------------------------------------------

def _edit(change):
    def apply(record):
        change(record)
        return record
    return apply


BAD_PROVENANCE = {
    "source not an object": _edit(lambda r: r.update(source=[1])),
    "source.files not an object": _edit(lambda r: r["source"].update(files=[1])),
    "a file record not an object":
        _edit(lambda r: r["source"]["files"].update({"model-00001-of-00002.safetensors": 5})),
    "metadata values not strings": _edit(lambda r: r["source"]["files"]["model-00001-of-00002.safetensors"].update(
        metadata={"format": 1})),
    "weight_map values not strings": _edit(lambda r: r["source"].update(weight_map={"a": 1})),
    "buffers not an object": _edit(lambda r: r["source"].update(buffers="x")),
    "buffer base64 not base64": _edit(lambda r: next(iter(r["source"]["buffers"].values())).update(base64="@@@")),
    "buffer of the wrong size": _edit(lambda r: next(iter(r["source"]["buffers"].values())).update(shape=[3])),
    "buffer shape not sizes": _edit(lambda r: next(iter(r["source"]["buffers"].values())).update(shape=["a"])),
    "index not a boolean": _edit(lambda r: r["source"].update(index="yes")),
    "dtype not a string": _edit(lambda r: r.update(dtype=16)),
}


@pytest.mark.parametrize("case", BAD_PROVENANCE)
def test_edited_provenance_is_a_named_error(fixtures_dir, tmp_path, case):
    convert(fixtures_dir / "tiny", tmp_path / "native")
    path = tmp_path / "native" / "glm4v_native.json"
    path.write_text(json.dumps(BAD_PROVENANCE[case](json.loads(path.read_text()))))
    with pytest.raises(CheckpointError, match="glm4v_native.json"):
        convert(tmp_path / "native", tmp_path / "hf", to="hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("dtype", ["float64", torch.int8, "bf16", 16, None])
def test_load_model_refuses_unknown_dtypes_by_name(fixtures_dir, dtype):
    with pytest.raises(CheckpointError, match="model dtype must be one of"):
        load_model(fixtures_dir / "tiny", dtype=dtype)


def test_load_model_accepts_dtype_names(fixtures_dir):
    assert load_model(fixtures_dir / "tiny", dtype="bfloat16").dtype == torch.bfloat16


@pytest.mark.parametrize("text,words", [
    ('{"hidden_size": 1, "hidden_size": 2}', "'hidden_size' appears twice"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
])
@pytest.mark.parametrize("file", ["config.json", "model.safetensors.index.json", "glm4v_native.json"])
def test_json_files_that_cannot_be_read_unambiguously(fixtures_dir, tmp_path, text, words, file):
    if file == "glm4v_native.json":
        convert(fixtures_dir / "tiny", tmp_path / "ckpt")
        folder = tmp_path / "ckpt"
    else:
        folder = linked_copy(fixtures_dir / "tiny", tmp_path / "ckpt")
        (folder / file).unlink()
    (folder / file).write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises((ConfigError, CheckpointError), match=f"{file}.*{words}"):
        load_model(folder)
    if file != "glm4v_native.json":  # the converter reads the HF folder's JSON files
        with pytest.raises((ConfigError, CheckpointError), match=f"{file}.*{words}"):
            convert(folder, tmp_path / "out")


@pytest.mark.parametrize("shard", ["../elsewhere/model.safetensors", "/etc/passwd", "sub/model.safetensors"])
def test_index_naming_a_file_outside_the_folder_is_refused(fixtures_dir, tmp_path, shard):
    folder = linked_copy(fixtures_dir / "tiny", tmp_path / "ckpt")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = shard
    index_path.unlink()
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"names shard {shard!r}; shards are file names inside"):
        load_model(folder)
