"""Load a checkpoint folder (HF layout or our native layout, auto-detected) into a GLM4V.

The model is built on the `meta` device; every tensor name, shape and dtype in the files is
checked against it before any data is touched (glm4v_conversion.checkpoint names the file and
tensor at fault); then parameters are assigned from memory maps. When the stored dtype and
device already match (bf16 on CPU for the real checkpoint) parameters are views of the
mapped files: nothing is copied and memory grows only with the pages actually read. No pickle.
"""
from __future__ import annotations

from pathlib import Path

import torch

from glm4v_conversion.checkpoint import CONFIG_FILE, Checkpoint, check_tensors, open_checkpoint, read_config
from glm4v_conversion.files import check_folder
from glm4v_conversion.quantize import quantization_record
from glm4v_conversion.safetensors_io import CheckpointError, MappedFiles

from .config import GLM4VConfig
from .model import GLM4V
from .ops import pack_cpu_weights
from .quant import load_quantized

__all__ = ["CheckpointError", "DeviceError", "build_meta_model", "check_against_model", "check_device", "load_model"]


def build_meta_model(config: GLM4VConfig) -> GLM4V:
    """The model with shapes and no storage: what a checkpoint is checked against."""
    with torch.device("meta"):
        return GLM4V(config)


def check_against_model(ckpt: Checkpoint, model: GLM4V, config_path: Path) -> None:
    """Every parameter present once, nothing extra, shapes as the config implies, float dtypes."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    check_tensors(ckpt, expected, config_path)


# The tiny random-weight checkpoint made by the HF reference code, shipped with a source checkout:
# what `glm4v generate` and `python -m glm4v_core.parity` run without --checkpoint.
BUNDLED_CHECKPOINT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "tiny"


SUPPORTED_DEVICES = ("cpu", "cuda")


class DeviceError(ValueError):
    """A device string torch does not know, or one this implementation does not run on, or absent here."""


def check_device(device: str | torch.device) -> torch.device:
    """A usable torch device, or a DeviceError that says why not (before any weight is read).

    glm4v-core runs on the CPU (torch kernels) and on CUDA GPUs (Triton kernels); mps, xpu and
    other backends are refused by name rather than failing inside the first tensor copy."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {str(device)!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type not in SUPPORTED_DEVICES:
        raise DeviceError(f"device {str(device)!r} is not supported: glm4v-core runs on 'cpu' or 'cuda[:N]'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {str(device)!r} requested but CUDA is not available here (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DeviceError(f"device {str(device)!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch.float32/bfloat16/float16 or their names; anything else is a named CheckpointError."""
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in MODEL_DTYPES:
        return MODEL_DTYPES[dtype.removeprefix("torch.")]
    if isinstance(dtype, torch.dtype) and dtype in MODEL_DTYPES.values():
        return dtype
    hint = ("; weights are quantized with `glm4v-convert SRC DST --quantize int8|int4`, then loaded with a float "
            "(compute) dtype") if dtype in (torch.int8, torch.uint8, "int8", "int4") else ""
    raise CheckpointError(f"model dtype must be one of {list(MODEL_DTYPES)} (a torch.dtype or its name), got "
                          f"{dtype!r}{hint}")


def load_model(path: str | Path, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
               pack_cpu: bool = False) -> GLM4V:
    """Load an HF-layout or native checkpoint folder into an eval-mode GLM4V on `device`.

    pack_cpu=True (bf16 on CPU, inference): every linear layer also gets its weight re-laid out for
    oneDNN (glm4v_core.ops.pack_cpu_weights): about 2x faster batch-1 decode (eager or compiled) and
    ~10% faster prefill products on CPUs with native bf16, at the price of the zero-copy loading (the
    weights are read once and copied into process memory).

    Inference-ready: eval mode, no gradients. To train, `model.requires_grad_(True).train()` is
    all it takes. `model.raw_config` keeps config.json as read (auto_map, torch_dtype...) for
    `save_model`.

    Raises CheckpointError (files, names, shapes, dtypes), ConfigError (config.json) or DeviceError,
    all ValueErrors whose message names the file, tensor or argument at fault."""
    device = check_device(device)
    dtype = check_dtype(dtype)
    folder = Path(path)
    check_folder(folder, "checkpoint folder", CheckpointError)
    config = GLM4VConfig.from_json(folder / CONFIG_FILE)
    ckpt = open_checkpoint(folder)
    record = quantization_record(ckpt)
    if record is not None:  # weight-only quantized: packed weights stay packed, `dtype` is the compute dtype
        model = build_meta_model(config).to(MODEL_DTYPES[ckpt.provenance["dtype"]])
        return load_quantized(ckpt, record, model, folder / CONFIG_FILE, dtype, device).eval().requires_grad_(False)
    model = build_meta_model(config)
    check_against_model(ckpt, model, folder / CONFIG_FILE)
    files = MappedFiles()
    # .to() returns the mmapped view itself when dtype and device already match: zero-copy
    state = {name: files.tensor(info).to(device=device, dtype=dtype) for name, info in ckpt.tensors.items()}
    model.load_state_dict(state, assign=True, strict=True)
    model.raw_config = read_config(folder)
    model = model.eval().requires_grad_(False)
    if pack_cpu:
        pack_cpu_weights(model)
    return model
