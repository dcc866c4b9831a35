"""`glm4v finetune` on a text-only GLM-4 (tests/fixtures/text_tiny, glm-4-9b-chat's config): LoRA and
full fine-tuning on a text JSONL, the merged output, image records skipped, vision parts refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.paths import FIXTURES
from safetensors.torch import load_file

from glm4v_core import load_model
from glm4v_core.training import cli as training_cli
from glm4v_core.transforms import adapter_files

TEXT = FIXTURES / "text_tiny"
RECORDS = [
    {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "Green."}]},
    {"messages": [{"role": "user", "content": "What is shown?", "image": "missing.png"},
                  {"role": "assistant", "content": "Nothing."}]},
    {"messages": [{"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Blue."}]},
]


@pytest.fixture()
def data(tmp_path) -> Path:
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def finetune(data: Path, out: Path, *flags: str) -> int:
    return training_cli.main(["--checkpoint", str(TEXT), "--data", str(data), "--out", str(out), "--no-progress",
                              "--max-steps", "2", *flags])


def test_lora_on_a_text_checkpoint_merges_to_the_adapted_logits(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert finetune(data, out, "--save-merged", "--lr", "1e-2") == 0
    err = capsys.readouterr().err
    assert f"{data}:2: skipped: message 0 has an image, but the checkpoint is a text-only GLM-4" in err
    adapters = load_file(str(out / "adapter.safetensors"))
    # one rank-8 adapter per part of q | k | v, stacked: 4 query heads and the config's 2 KV groups, 32 wide
    assert adapters["text.layers.0.attn.qkv.lora_A"].shape == (3 * 8, 128)
    assert adapters["text.layers.0.attn.qkv.lora_B"].shape == ((4 + 2 * 2) * 32, 8)
    ids = torch.tensor([[803, 805, 808, 101, 219, 338, 809]])
    base = load_model(TEXT)
    before = base(ids).logits
    adapter_files.load_adapters(base, out / "adapter.safetensors")
    adapted = base(ids).logits
    merged = load_model(out / "merged")
    assert merged.vision is None
    assert (adapted - before).abs().max() > 1e-3  # training moved the model
    torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-4, rtol=1e-4)


def test_a_full_fine_tune_of_a_text_checkpoint_writes_a_text_checkpoint(data, tmp_path):
    out = tmp_path / "full"
    assert finetune(data, out, "--lora-rank", "0") == 0
    config = json.loads((out / "model" / "config.json").read_text())
    assert "vision_config" not in config and config["rope_ratio"] == 500
    assert load_model(out / "model").vision is None


@pytest.mark.parametrize("parts", ["vision", "decoder,projector"])
def test_vision_parts_are_refused_on_a_text_checkpoint(data, tmp_path, capsys, parts):
    assert finetune(data, tmp_path / "run", "--train", parts) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "text-only GLM-4 (no vision tower)" in err[0] and "--train decoder" in err[0]
    assert not (tmp_path / "run").exists()
