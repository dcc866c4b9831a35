"""Helpers of the PEFT adapter tests (tests/adapters): the stand-in's folder, inputs, logits, nonzero
adapters, and peft's merge_and_unload written as a checkpoint."""
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .paths import FIXTURES, STANDIN

TOL = 1e-4  # fp32 logits, as every parity check (docs/architecture.md, section 2)


def standin_folder(root: Path, fixture: str) -> Path:
    """A copy of a fixture checkpoint with the stand-in remote code beside it (one name per fixture:
    transformers caches remote code by folder name)."""
    folder = root / f"standin_{fixture}"
    if not folder.exists():
        shutil.copytree(FIXTURES / fixture, folder)
        for src in STANDIN.glob("*.py"):
            shutil.copy(src, folder / src.name)
    return folder


def inputs(config, image: bool = True) -> dict:
    """One row: text, an image block (GLM-4V), more text."""
    if not image or config.vision is None:
        return {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10, 11]])}
    ids = torch.tensor([[5, 6, config.boi_token_id, config.pad_token_id, config.eoi_token_id, 7, 8, 9]])
    size = config.vision.image_size
    return {"input_ids": ids, "images": torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))}


@torch.no_grad()
def ours_logits(model, batch: dict) -> torch.Tensor:
    return model.eval()(batch["input_ids"], batch.get("images")).logits


@torch.no_grad()
def hf_logits(model, batch: dict) -> torch.Tensor:
    return model.eval()(**batch).logits


def randomize(peft_model, seed: int = 0) -> None:
    """Every lora_A / lora_B of a peft model nonzero (peft's B starts at 0: every test would be trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def save_merged(peft_model, fixture: str, dst: Path) -> Path:
    """peft's merge_and_unload written as an HF checkpoint folder (the fixture's config.json): the
    oracle that does not go through the stand-in's forward."""
    merged = peft_model.merge_and_unload()
    dst.mkdir(parents=True)
    shutil.copy(FIXTURES / fixture / "config.json", dst / "config.json")
    state = {k: v.contiguous() for k, v in merged.state_dict().items() if not k.endswith("inv_freq")}
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst
