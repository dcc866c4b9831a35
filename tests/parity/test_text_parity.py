"""Parity of a text-only GLM-4 (tests/fixtures/text_tiny, glm-4-9b-chat's config at tiny sizes)
against its HF reference: every case (b, d, the 3000-token `long`), bf16, gradients, int8 / int4
folders, tensor parallel, FSDP2, and the converter both ways."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from helpers.paths import FIXTURES

from glm4v_core.parity.grads import run_grad_parity
from glm4v_core.parity.run import run_parity

TEXT = FIXTURES / "text_tiny"


def stages(reports) -> dict[str, dict[str, object]]:
    return {r.name: {s.name: s for s in r.stages} for r in reports}


def test_every_text_case_passes_in_fp32():
    reports = run_parity(TEXT)
    assert [r.name for r in reports] == ["b", "d", "long"]
    assert all(r.ok for r in reports), [(r.name, [(s.name, s.max_abs) for s in r.stages if not s.ok]) for r in reports]
    by = stages(reports)
    assert {"embeddings", "decoder.layer0", "decoder.layer1", "final_norm", "logits", "greedy_tokens"} <= set(by["b"])
    assert set(by["long"]) == {"logits (last 16)", "greedy_tokens"}
    assert by["long"]["logits (last 16)"].max_abs <= 1e-4


def test_the_long_case_catches_a_wrong_rope_ratio(tmp_path):
    """The fixture's sensitivity: rope_ratio 1 instead of 500 moves the last-16 logits by ~0.4."""
    folder = tmp_path / "wrong_rope"
    shutil.copytree(TEXT, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rope_ratio": 1}))
    by = {r.name: r for r in run_parity(folder)}
    assert not by["long"].ok


def test_text_parity_in_bf16_passes():
    reports = run_parity(TEXT, dtype=torch.bfloat16)
    assert all(r.ok for r in reports)


def test_text_gradients_match_the_reference():
    (report,) = run_grad_parity(TEXT)
    assert report.name == "b" and report.ok and report.compared == "full tensors"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glm4v_core", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flags", [["--tp", "2"], ["--grads", "--fsdp", "2"]], ids=["tp2", "fsdp2"])
def test_text_parity_on_two_ranks(flags):
    done = run_cli("parity", "--checkpoint", str(TEXT), *flags)
    assert done.returncode == 0, done.stderr
    assert "PASSED" in done.stdout


def convert(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "glm4v_conversion", *args, "--no-progress"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_the_converter_round_trips_a_text_checkpoint_bit_for_bit(tmp_path):
    convert(str(TEXT), str(tmp_path / "native"))
    convert("--to", "hf", str(tmp_path / "native"), str(tmp_path / "hf"))
    for name in ("config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                 "model-00002-of-00002.safetensors"):
        assert (tmp_path / "hf" / name).read_bytes() == (TEXT / name).read_bytes(), name
    assert all(r.ok for r in run_parity(tmp_path / "native", TEXT / "reference.safetensors"))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_text_folders_pass_their_budgets(tmp_path, scheme):
    convert("--quantize", scheme, str(TEXT), str(tmp_path / scheme))
    reports = run_parity(tmp_path / scheme, TEXT / "reference.safetensors", baseline=TEXT)
    assert [r.name for r in reports] == ["b", "d", "long"] and all(r.ok for r in reports)
    assert all(s.tol is not None for r in reports for s in r.stages)  # judged, not only shown
