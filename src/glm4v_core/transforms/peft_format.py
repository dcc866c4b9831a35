"""PEFT LoRA folders, both ways: what peft's `save_pretrained` writes and vLLM's `--lora-modules` reads.

A folder holds `adapter_config.json` (a peft LoraConfig as JSON) and `adapter_model.safetensors`: per
adapted Linear of the HF model, `base_model.model.<HF module>.lora_A.weight` (r, in) and `.lora_B.weight`
(out, r). HF modules are ours renamed (glm4v_conversion.names; the weights are never permuted), so an HF
module's adapter is the same update on our module.

Reading follows peft's own rules (transforms/peft_config.py; peft 0.13, and later peft where it differs):
- target_modules, a list: a module is adapted when its name equals an entry or ends with "." + entry;
  a string: when re.fullmatch(string, name). "all-linear" is peft's shorthand, expanded before saving.
- r and lora_alpha of a module from rank_pattern / alpha_pattern. peft 0.13 takes the first key of
  rank_pattern then alpha_pattern with re.match(rf".*\\.{key}$", name) and looks both up with it; later
  peft looks each up on its own with re.match(rf"(.*\\.)?({key})$", name). A module the two rules give
  different values is refused (the file means different adapters to different peft versions).
- scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora.
- A LoRA on a fused HF Linear (query_key_value: q | k | v, dense_h_to_4h: gate | up) is one adapter over
  the whole output: it becomes our shared adapter over the fused layer (parts (out,)), the same update.
  When every adapted fused layer's B is block-diagonal over its parts (what writing makes of our per-part
  adapters), they become per-part adapters again, so ours -> PEFT -> ours gives back the same tensors.
Every other feature that changes the update (DoRA, modules_to_save, bias, ...) is refused by name.

Writing: our per-part adapters of rank r on a fused layer of P parts are one PEFT adapter of rank P * r:
A as we store it (the parts' A stacked) and B block-diagonal, blockdiag(B_q, B_k, B_v), the same update.
Every module is written with one scale s = lora_alpha / r, the one vLLM applies to all modules (it reads
neither rank_pattern nor alpha_pattern; ranks come from the tensors): a module of another rank r_m gets
rank_pattern r_m and alpha_pattern s * r_m; a module whose own scale differs has its B scaled by
scale_m / s. Pattern keys are module names without their first component `transformer.` (peft 0.13 needs
a dot before the key), with the layer index as `.*` when every adapted module the key matches shares the
value; both peft rules are checked to give every module its rank and alpha before anything is written.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from glm4v_conversion.atomic import staging
from glm4v_conversion.names import HF_IGNORED_BUFFERS, native_to_hf
from glm4v_core.config import GLM4VConfig
from glm4v_core.model.glm4v import GLM4V
from glm4v_core.transforms.lora import AdapterSet, LayerAdapter, LoRAError, config_for, linears_of
from glm4v_core.transforms.peft_config import PEFT_CONFIG, PeftSettings, pattern_values, read_settings, targeted

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_FILES = (PEFT_CONFIG, PEFT_WEIGHTS, "README.md")  # what a folder we may replace holds
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the HF model
LM_HEAD = "text.lm_head"


def is_peft_folder(path: Path) -> bool:
    return path.is_dir() and (path / PEFT_CONFIG).is_file()


# -- the HF module tree peft matches against --------------------------------------------------------

def hf_module(native: str) -> str:
    """The HF name of one of our modules (its weight's name, less `.weight`)."""
    return native_to_hf(f"{native}.weight").removesuffix(".weight")


def hf_module_kinds(config: GLM4VConfig) -> dict[str, str]:
    """Every module of the HF model that holds a tensor, by HF name (what peft's matching sees): "linear" for
    a Linear an adapter can wrap, else what it is (the reason a target on it is refused). The remote code's
    tensorless modules (dropouts, activations) are not listed: peft refuses targets on those itself."""
    with torch.device("meta"):
        model = GLM4V(config)
    kinds = {"": "the whole model"}  # named_modules' root
    kinds.update({b.rpartition(".")[0]: "the rotary embedding" for b in HF_IGNORED_BUFFERS})
    for name, module in model.named_modules():
        if not name or native_to_hf(f"{name}.weight") is None:
            continue
        kinds[hf_module(name)] = ("the output layer (lm_head)" if name == LM_HEAD else
                                  "linear" if isinstance(module, nn.Linear) else
                                  "an embedding" if isinstance(module, nn.Embedding) else
                                  "a convolution" if isinstance(module, nn.Conv2d) else "a norm")
    for hf in list(kinds):
        parts = hf.split(".")
        for k in range(1, len(parts)):
            kinds.setdefault(".".join(parts[:k]), "a container of other modules")
    return kinds


def adaptable(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """{HF module name: (our name, Linear)} of every Linear an adapter may wrap (lm_head never)."""
    return {hf_module(name): (name, m) for name, m in linears_of(model).items() if name != LM_HEAD}


# -- reading ------------------------------------------------------------------------------------------

def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / PEFT_WEIGHTS
    if not path.is_file():
        pickled = " (adapter_model.bin is a pickle, which is never read: save with safe_serialization=True)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise LoRAError(f"PEFT folder {folder} has no {PEFT_WEIGHTS}{pickled}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {n: f.get_tensor(n) for n in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise LoRAError(f"{path} is not a readable safetensors file (truncated or not safetensors?): {e}") from None


def read_peft(model: nn.Module, folder: str | Path) -> AdapterSet:
    """A PEFT LoRA folder's adapters once they fit `model` (a meta-device model will do), every key and
    tensor checked; the model is not touched."""
    folder = Path(folder)
    config_path, weights = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
    settings = read_settings(folder)
    linears, kinds = adaptable(model), hf_module_kinds(model.config)
    modules = targeted(settings, kinds)
    if not modules:
        raise LoRAError(f"{config_path}: target_modules {settings.target_modules!r} matches no module of the model "
                        f"(e.g. {sorted(linears)[:2]})")
    for name in modules:
        if name not in linears:
            raise LoRAError(f"{config_path}: target_modules {settings.target_modules!r} matches {name or 'the root'}, "
                            f"{kinds[name]}; only Linear layers (not the output layer) take adapters here")
    tensors = read_tensors(folder)
    expected = {f"{PREFIX}{m}.lora_{ab}.weight" for m in modules for ab in "AB"}
    extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
    if extra or missing:
        raise LoRAError(f"{weights}: tensors do not fit the model and target_modules: unexpected {extra[:2]}, "
                        f"missing {missing[:2]} (expected {PREFIX}<HF module>.lora_A.weight / .lora_B.weight)")
    layers = {}
    for hf in modules:
        native, linear = linears[hf]
        layers[native] = peft_layer(settings, config_path, weights, hf, linear, tensors)
    layers = as_per_part(layers, {native: getattr(m, "parts", None) for native, m in linears.values()}) or layers
    return AdapterSet(layers, settings.lora_dropout, config_for(layers, settings.lora_dropout))


def as_per_part(layers: dict[str, LayerAdapter], parts_of: dict[str, tuple | None]) -> dict[str, LayerAdapter] | None:
    """Our per-part adapters again when every adapted fused layer's B is block-diagonal over its parts
    (what write_peft makes of them; the same update either way), else None: all stay shared."""
    split = {}
    for name, layer in layers.items():
        parts = parts_of.get(name)
        if not parts or len(parts) < 2:
            continue
        if layer.rank % len(parts):
            return None
        r = layer.rank // len(parts)
        blocks = [b[:, k * r:(k + 1) * r] for k, b in enumerate(layer.lora_B.split(parts))]
        if not torch.equal(torch.block_diag(*blocks), layer.lora_B):
            return None
        split[name] = replace(layer, lora_B=torch.cat(blocks), parts=tuple(parts))
    return {**layers, **split} if split else None


def peft_layer(s: PeftSettings, config_path: Path, weights: Path, hf: str, linear: nn.Module,
               tensors: dict[str, torch.Tensor]) -> LayerAdapter:
    old, new = pattern_values(s, hf)
    if old != new:
        raise LoRAError(f"{config_path}: rank_pattern / alpha_pattern give {hf} (r, alpha) {old} under peft 0.13's "
                        f"key rule and {new} under later peft's; use keys that both read alike (e.g. the module's "
                        "name without its first component)")
    r, alpha = old
    A, B = tensors[f"{PREFIX}{hf}.lora_A.weight"], tensors[f"{PREFIX}{hf}.lora_B.weight"]
    for name, t, shape in (("lora_A", A, (r, linear.in_features)), ("lora_B", B, (linear.out_features, r))):
        key = f"{PREFIX}{hf}.{name}.weight"
        if tuple(t.shape) != shape:
            raise LoRAError(f"{weights}: tensor {key} has shape {tuple(t.shape)}, expected {shape} (rank {r} from "
                            f"{config_path.name}'s r / rank_pattern)")
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise LoRAError(f"{weights}: tensor {key} is not floating point or holds non-finite values")
    scale = alpha / (math.sqrt(r) if s.use_rslora else r)
    return LayerAdapter(A.float(), B.float(), scale, (linear.out_features,))


# -- writing ------------------------------------------------------------------------------------------

def peft_tensors(adapters: AdapterSet, scale: float) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The folder's tensors, and each HF module's rank: per-part adapters as one adapter of the summed rank
    (A stacked as we store it, B block-diagonal); a scale other than `scale` folded into B."""
    tensors, ranks = {}, {}
    for native, layer in adapters.layers.items():
        hf = hf_module(native)
        B = torch.block_diag(*layer.lora_B.split(layer.parts))  # (out, parts * rank)
        if layer.scale != scale:
            B = B * (layer.scale / scale)
        tensors[f"{PREFIX}{hf}.lora_A.weight"] = layer.lora_A.float().contiguous()
        tensors[f"{PREFIX}{hf}.lora_B.weight"] = B.float().contiguous()
        ranks[hf] = B.shape[1]
    return tensors, ranks


def pattern_keys(ranks: dict[str, int], r0: int) -> dict[str, int]:
    """rank_pattern for the modules whose rank is not r0 (see the module docstring), checked under both
    peft rules."""
    def hits(key: str) -> list[str]:
        return [m for m in ranks if re.match(rf".*\.{key}$", m) or re.match(rf"(.*\.)?({key})$", m)]

    pattern = {}
    for name, r in ranks.items():
        if r == r0:
            continue
        own = name.split(".", 1)[1]
        generic = re.sub(r"\.\d+\.", ".*.", own)
        pattern[generic if all(ranks[m] == r for m in hits(generic)) else own] = r
    for name, r in ranks.items():  # every module matched by at most one key, and by the one with its rank
        keys = [k for k in pattern if name in hits(k)]
        if (keys and (len(keys) > 1 or pattern[keys[0]] != r)) or (not keys and r != r0):
            raise AssertionError(f"rank_pattern keys {keys} do not single out {name}")  # a bug, not an input
    return pattern


def peft_config(adapters: AdapterSet, ranks: dict[str, int], scale: float, targets: list[str],
                base_model: str | None) -> dict:
    """adapter_config.json as peft 0.13's LoraConfig writes it, with one scale for every module."""
    r0 = min(Counter(ranks.values()).most_common(), key=lambda rc: (-rc[1], rc[0]))[0]
    rank_pattern = pattern_keys(ranks, r0)
    return {"alpha_pattern": {k: _plain(scale * r) for k, r in rank_pattern.items()}, "auto_mapping": None,
            "base_model_name_or_path": base_model, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "init_lora_weights": True, "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
            "loftq_config": {}, "lora_alpha": _plain(scale * r0), "lora_dropout": adapters.dropout,
            "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None, "peft_type": "LORA",
            "r": r0, "rank_pattern": rank_pattern, "revision": None, "target_modules": targets,
            "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False}


def _plain(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def target_list(adapted: list[str], kinds: dict[str, str]) -> list[str]:
    """target_modules: for each adapted module its shortest name suffix (from a non-numeric component) that
    peft's suffix rule matches on adapted modules only, e.g. ["mlp.dense_h_to_4h", "self_attention.dense"]:
    together exactly the adapted modules, as short as they can be."""
    chosen = set(adapted)
    suffixes = set()
    for name in adapted:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if suffix[0].isdigit():
                continue
            if all(n in chosen for n in kinds if n == suffix or n.endswith(f".{suffix}")):
                suffixes.add(suffix)
                break
    return sorted(suffixes)


def write_peft(adapters: AdapterSet, folder: str | Path, config: GLM4VConfig, base_model: str | None = None) -> Path:
    """Write `adapters` as a PEFT LoRA folder, published whole (a hidden sibling renamed into place). An
    existing folder is replaced only when it holds nothing but a PEFT adapter's files."""
    folder = Path(folder)
    check_destination(folder)
    scale = Counter(layer.scale for layer in adapters.layers.values()).most_common(1)[0][0]
    tensors, ranks = peft_tensors(adapters, scale)
    targets = target_list(list(ranks), hf_module_kinds(config))
    text = json.dumps(peft_config(adapters, ranks, scale, targets, base_model), indent=2, sort_keys=True)
    with staging(folder) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(text + "\n")
    return folder


def check_destination(folder: Path) -> None:
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise LoRAError(f"{folder} exists and is not a folder; a PEFT adapter is a folder ({PEFT_CONFIG}, "
                        f"{PEFT_WEIGHTS})")
    others = sorted(p.name for p in folder.iterdir() if p.name not in PEFT_FILES) if folder.is_dir() else []
    if others:
        raise LoRAError(f"{folder} holds files other than a PEFT adapter's ({others[:3]}); refusing to replace it, "
                        "choose another folder")
