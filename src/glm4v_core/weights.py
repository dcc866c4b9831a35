"""Load a checkpoint folder (HF layout or our native layout, auto-detected) into a GLM4V.

The model is built on the `meta` device; every tensor name, shape and dtype in the files is
checked against it before any data is touched; then parameters are assigned from memory maps
(zero-copy when the stored dtype and device already match). No pickle anywhere.
"""
from __future__ import annotations

from pathlib import Path

import torch

from glm4v_conversion.names import HF_IGNORED_BUFFERS, hf_to_native, is_hf_name
from glm4v_conversion.safetensors_io import CheckpointError, MappedFiles, TensorInfo, list_tensors

from .config import GLM4VConfig
from .model import GLM4V

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def build_meta_model(config: GLM4VConfig) -> GLM4V:
    """The model with shapes and no storage: what a checkpoint is checked against."""
    with torch.device("meta"):
        return GLM4V(config)


def native_tensor_infos(folder: str | Path) -> tuple[dict[str, TensorInfo], str]:
    """The folder's tensors under native names, and its layout ('hf' or 'native')."""
    tensors = list_tensors(folder)
    hf_names = [n for n in tensors if is_hf_name(n)]
    if hf_names and len(hf_names) != len(tensors):
        other = next(n for n in tensors if not is_hf_name(n))
        raise CheckpointError(f"{folder}: mixes HF names ({hf_names[0]!r}) and native names ({other!r})")
    if not hf_names:
        return tensors, "native"
    out = {}
    for name, info in tensors.items():
        if name in HF_IGNORED_BUFFERS:
            continue  # saved by the reference, never read by its forward
        native = hf_to_native(name)
        if native is None:
            raise CheckpointError(f"{info.file}: unexpected tensor {name!r} (no such parameter in GLM-4V)")
        out[native] = info
    return out, "hf"


def check_against_model(infos: dict[str, TensorInfo], model: GLM4V, config_path: Path) -> None:
    """Every parameter present once, nothing extra, shapes as the config implies, float dtypes."""
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    missing = sorted(set(expected) - set(infos))
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s) the config requires, e.g. {missing[:5]}")
    unexpected = sorted(set(infos) - set(expected))
    if unexpected:
        info = infos[unexpected[0]]
        raise CheckpointError(f"{info.file}: unexpected tensor {info.name!r} (no such parameter in GLM-4V)")
    for name, shape in expected.items():
        info = infos[name]
        if info.shape != shape:
            raise CheckpointError(f"{info.file}: tensor {info.name!r} has shape {list(info.shape)}, but "
                                  f"{config_path} implies {list(shape)}")
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{info.file}: tensor {info.name!r} has dtype {info.dtype}, expected a float dtype")


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> GLM4V:
    """Load an HF-layout or native checkpoint folder into an eval-mode GLM4V on `device`."""
    folder = Path(path)
    config_path = folder / "config.json"
    config = GLM4VConfig.from_json(config_path)
    infos, _layout = native_tensor_infos(folder)
    model = build_meta_model(config)
    check_against_model(infos, model, config_path)
    files = MappedFiles()
    state = {name: files.tensor(info).to(device=device, dtype=dtype) for name, info in infos.items()}
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval().requires_grad_(False)
