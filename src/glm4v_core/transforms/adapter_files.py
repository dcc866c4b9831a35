"""Adapter files: this project's one-file format, and the dispatch between it and PEFT folders.

The glm4v format (`save_adapters` / `load_adapters`, `glm4v finetune`'s OUT/adapter.safetensors): one
safetensors file, fp32 tensors `<module name>.lora_A` / `.lora_B` (e.g. `text.layers.0.attn.qkv.lora_A`)
and the metadata `format = glm4v-lora`, `format_version = 1`, `lora_config = <LoRAConfig as JSON>`. It
holds adapters of one rank and one alpha (a LoRAConfig); adapters with per-layer ranks or scales (read
from a PEFT rank_pattern / alpha_pattern) are saved as PEFT.

PEFT folders (adapter_config.json + adapter_model.safetensors; transforms/peft_format.py) are read and
written through the same names: `load_adapters(model, DIR)` and `check_adapters` take either (a folder
holding adapter_config.json is PEFT), `save_adapters(model, DIR, format="peft")` writes one.
"""
from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from glm4v_conversion.atomic import staged_file
from glm4v_core.model.glm4v import GLM4V
from glm4v_core.transforms import peft_format
from glm4v_core.transforms.lora import (
    AdapterSet,
    LayerAdapter,
    LoRAConfig,
    LoRAError,
    LoRALinear,
    adapter_set,
    adapter_state,
    adapters_of,
    attach_adapters,
    check_targets,
    is_linear,
)
from glm4v_core.transforms.peft_format import PEFT_CONFIG, PEFT_WEIGHTS, is_peft_folder

ADAPTER_FORMAT = "glm4v-lora"
ADAPTER_FORMAT_VERSION = "1"
ADAPTER_FILE = "adapter.safetensors"  # what a LoRA run of `glm4v finetune` leaves in its --out folder
ADAPTER_FORMATS = ("glm4v", "peft")
PEFT_FOLDER = "adapter"  # what `glm4v finetune --adapter-format peft` leaves in its --out folder
PER_LAYER = ("the adapters have per-layer ranks or scales (a PEFT rank_pattern / alpha_pattern), which the glm4v "
             "format's one rank and alpha cannot hold")


def save_adapters(model: nn.Module, path: str | Path, extra_metadata: dict[str, str] | None = None,
                  tensors: dict[str, torch.Tensor] | None = None, *, format: str = "glm4v",
                  base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapters atomically: format "glm4v", one safetensors file with the LoRA config in
    its metadata (temp + rename); "peft", a PEFT LoRA folder (published whole) that peft's
    PeftModel.from_pretrained and vLLM load, `base_model_name_or_path` recorded in its adapter_config.json.

    tensors: the adapter tensors to write, default adapter_state(model) (a sharded model passes
    them gathered whole)."""
    if format not in ADAPTER_FORMATS:
        raise LoRAError(f"adapter format {format!r}: choose from {list(ADAPTER_FORMATS)}")
    adapters = adapters_of(model)
    if not adapters:
        raise LoRAError("the model has no LoRA adapters to save (call add_lora first)")
    if any(a.merged for a in adapters.values()):
        raise LoRAError("the adapters are merged into the base weights; unmerge(model) before saving them")
    if format == "peft":
        return peft_format.write_peft(adapter_set(model, tensors), path, model.config, base_model_name_or_path)
    config = getattr(model, "lora_config", None)
    if config is None:
        raise LoRAError(f"{PER_LAYER}; save them with format='peft'")
    return write_adapter_file(config, tensors or adapter_state(model), Path(path), extra_metadata)



def write_adapter_file(config: LoRAConfig, tensors: dict[str, torch.Tensor], path: Path,
                       extra_metadata: dict[str, str] | None = None) -> Path:
    """The glm4v format: fp32 tensors and `config` in the metadata, written atomically."""
    tensors = {k: v.float().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"format": ADAPTER_FORMAT, "format_version": ADAPTER_FORMAT_VERSION,
                "lora_config": config.to_json(), **(extra_metadata or {})}
    atomic_save_file(tensors, path, metadata)
    return path


def write_adapters(adapters: AdapterSet, path: str | Path, format: str, config, base_model: str | None = None) -> Path:
    """Write an AdapterSet (read from a file, no model needed) in `format`; `config` is the GLM4VConfig
    it fits (the PEFT format names the HF modules)."""
    if format == "peft":
        return peft_format.write_peft(adapters, path, config, base_model)
    if adapters.config is None:
        raise LoRAError(f"{PER_LAYER}; write them in the PEFT format (glm4v adapter convert --to peft)")
    tensors = {f"{n}.lora_{ab}": getattr(layer, f"lora_{ab}") for n, layer in adapters.layers.items() for ab in "AB"}
    return write_adapter_file(adapters.config, tensors, Path(path))


def atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Written under a temporary name, flushed, renamed into place (staged_file); folders made above it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


CONFIG_FIELDS = {"rank": "an integer >= 1", "alpha": "a finite number > 0", "dropout": "a number in [0, 1)",
                 "targets": "a non-empty list of module-name patterns", "split_fused": "true or false"}


def read_adapter_config(path: str | Path) -> LoRAConfig:
    """The LoRA config stored in an adapter file's metadata, checked field by field."""
    meta = _open_adapter_file(path, lambda f: f.metadata() or {})
    if meta.get("format") != ADAPTER_FORMAT:
        raise LoRAError(f"{path} is not a glm4v-core adapter file (metadata format {meta.get('format')!r}, "
                        f"expected {ADAPTER_FORMAT!r})")
    if meta.get("format_version") != ADAPTER_FORMAT_VERSION:
        raise LoRAError(f"{path}: adapter format_version {meta.get('format_version')!r}, this code reads "
                        f"{ADAPTER_FORMAT_VERSION!r}")
    if "lora_config" not in meta:
        raise LoRAError(f"{path}: metadata key 'lora_config' is missing (a JSON object with {list(CONFIG_FIELDS)})")
    try:
        fields = json.loads(meta["lora_config"])  # NaN / Infinity read as floats, refused below
    except ValueError as e:
        raise LoRAError(f"{path}: metadata 'lora_config' is not JSON ({e})") from None
    if not isinstance(fields, dict):
        raise LoRAError(f"{path}: metadata 'lora_config' is not a JSON object (keys {list(CONFIG_FIELDS)})")
    unknown = sorted(set(fields) - set(CONFIG_FIELDS))
    if unknown:
        raise LoRAError(f"{path}: metadata 'lora_config' has unknown key(s) {unknown}; accepted: {list(CONFIG_FIELDS)}")
    missing = [k for k in CONFIG_FIELDS if k not in fields]
    if missing:
        raise LoRAError(f"{path}: metadata 'lora_config' lacks key(s) {missing} ({list(CONFIG_FIELDS)} are required)")
    for key, value in fields.items():
        good = {"rank": lambda v: type(v) is int and v >= 1,
                "alpha": lambda v: _number(v) and math.isfinite(v) and v > 0,
                "dropout": lambda v: _number(v) and 0 <= v < 1,
                "targets": lambda v: isinstance(v, list) and bool(v) and all(isinstance(t, str) for t in v),
                "split_fused": lambda v: isinstance(v, bool)}[key](value)
        if not good:
            raise LoRAError(f"{path}: metadata 'lora_config' key {key!r} is {value!r}, expected {CONFIG_FIELDS[key]}")
    return LoRAConfig(**fields)


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _open_adapter_file(path, read):
    try:
        with safe_open(str(path), framework="pt") as f:
            return read(f)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise LoRAError(f"{path} is not a readable safetensors file (truncated or not safetensors?): {e}") from None


def expected_adapter_shapes(model: nn.Module, config: LoRAConfig) -> dict[str, tuple[int, ...]]:
    """{<module name>.lora_A / .lora_B: shape} that add_lora(model, config) would create (or the
    model's adapters already have), computed without touching the model."""
    if adapters_of(model):
        return {k: tuple(v.shape) for k, v in adapter_state(model).items()}
    linears = {name: m for name, m in model.named_modules() if is_linear(m)}
    check_targets(linears, config)
    shapes = {}
    for name, linear in linears.items():
        if any(fnmatch.fnmatchcase(name, p) for p in config.targets):
            parts = (getattr(linear, "parts", None) if config.split_fused else None) or (linear.out_features,)
            shapes[f"{name}.lora_A"] = (len(parts) * config.rank, linear.in_features)
            shapes[f"{name}.lora_B"] = (linear.out_features, config.rank)
    return shapes


def resolve_adapter(path: str | Path) -> Path:
    """The adapters a command's --adapter names: a PEFT folder (adapter_config.json +
    adapter_model.safetensors), a `glm4v finetune --out` folder (its adapter.safetensors, or its adapter/
    PEFT folder), or a glm4v adapter file itself."""
    path = Path(path)
    if not path.is_dir():
        if not path.exists():
            raise LoRAError(f"{path} does not exist; give a PEFT adapter folder, a glm4v finetune --out folder or "
                            f"its {ADAPTER_FILE}")
        return path
    if is_peft_folder(path):
        return path
    if (path / ADAPTER_FILE).is_file():
        return path / ADAPTER_FILE
    if is_peft_folder(path / PEFT_FOLDER):
        return path / PEFT_FOLDER
    hint = ("it holds model/, a full fine-tune: pass that folder as --checkpoint" if (path / "model").is_dir() else
            f"it has {PEFT_WEIGHTS} but no {PEFT_CONFIG} (a PEFT folder needs both)" if (path / PEFT_WEIGHTS).exists()
            else "a LoRA run writes it when it finishes (glm4v finetune --resume OUT finishes an interrupted one)")
    raise LoRAError(f"folder {path} has no {ADAPTER_FILE} and is no PEFT adapter folder ({PEFT_CONFIG}): {hint}")


def check_adapter_file(model: GLM4V, path: str | Path) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """A glm4v adapter file's config and tensors once they fit `model` (a meta-device model will do):
    the metadata (read_adapter_config), the tensor names, and each tensor's shape (what the
    config's rank gives), dtype (floating point) and values (finite). The model is not touched."""
    path = Path(path)
    if not path.is_file():
        raise LoRAError(f"adapter file {path} does not exist")
    config = read_adapter_config(path)
    existing = adapters_of(model)
    if existing and getattr(model, "lora_config", None) != config:
        raise LoRAError(f"{path} holds adapters of {config}, the model has {getattr(model, 'lora_config', None)}")
    if any(a.merged for a in existing.values()):
        raise LoRAError(f"{path}: the model's adapters are merged into its weights; unmerge(model) before loading")
    expected = expected_adapter_shapes(model, config)
    tensors = _open_adapter_file(path, lambda f: {n: f.get_tensor(n) for n in f.keys()})
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise LoRAError(f"{path}: adapter tensors do not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise LoRAError(f"{path}: tensor {name} has shape {tuple(t.shape)}, the model's adapter of rank "
                            f"{config.rank} (metadata 'lora_config') has {shape}")
        if not t.is_floating_point():
            raise LoRAError(f"{path}: tensor {name} has dtype {t.dtype}, expected floating point (the file format "
                            "writes float32)")
        if not bool(torch.isfinite(t).all()):
            raise LoRAError(f"{path}: tensor {name} holds non-finite values")
    return config, tensors


def check_adapters(model: GLM4V, path: str | Path) -> AdapterSet:
    """The adapters of a glm4v file, a PEFT folder or a finetune --out folder (resolve_adapter) once they
    fit `model` (a meta-device model will do), every key and tensor checked; the model is not touched."""
    path = resolve_adapter(path) if Path(path).is_dir() else Path(path)
    if path.is_dir():  # a PEFT folder
        adapters = peft_format.read_peft(model, path)
        check_refill(model, adapters, path)
        return adapters
    config, tensors = check_adapter_file(model, path)
    linears = {name: m for name, m in model.named_modules() if is_linear(m) or isinstance(m, LoRALinear)}
    layers = {}
    for name in [n for n in linears if f"{n}.lora_A" in tensors]:  # the model's order
        parts = (getattr(linears[name], "parts", None) if config.split_fused else None) or (linears[name].out_features,)
        layers[name] = LayerAdapter(tensors[f"{name}.lora_A"].float(), tensors[f"{name}.lora_B"].float(),
                                    config.scale, tuple(parts))
    return AdapterSet(layers, config.dropout, config)


def check_refill(model: nn.Module, adapters: AdapterSet, path: Path) -> None:
    """A model that has adapters already takes only the same ones (names, shapes, scales) again."""
    existing = adapter_set(model) if adapters_of(model) else None
    if existing is None:
        return
    if any(a.merged for a in adapters_of(model).values()):
        raise LoRAError(f"{path}: the model's adapters are merged into its weights; unmerge(model) before loading")

    def layout(s: AdapterSet) -> dict:
        return {n: (tuple(a.lora_A.shape), tuple(a.lora_B.shape), a.parts, a.scale) for n, a in s.layers.items()}
    if layout(existing) != layout(adapters):
        raise LoRAError(f"{path} holds other adapters than the model has (layers, ranks or scales); "
                        "remove_lora(model) first")


def load_adapters(model: GLM4V, path: str | Path, dropout: float | None = None) -> dict[str, LoRALinear]:
    """Add the adapters of a glm4v file, a PEFT folder or a finetune --out folder to a base model (or
    refill existing ones of the same layout). Everything is checked first (check_adapters): a refused
    file leaves the model as it was. dropout: the adapters' dropout in training, default the file's."""
    adapters = check_adapters(model, path)
    if dropout is not None:
        adapters = replace(adapters, dropout=dropout,
                           config=adapters.config and replace(adapters.config, dropout=dropout))
    if not adapters_of(model):
        return attach_adapters(model, adapters)
    with torch.no_grad():
        for name, adapter in adapters_of(model).items():
            adapter.lora_A.copy_(adapters.layers[name].lora_A)
            adapter.lora_B.copy_(adapters.layers[name].lora_B)
    return adapters_of(model)
