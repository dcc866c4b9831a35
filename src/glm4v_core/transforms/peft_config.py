"""adapter_config.json of a PEFT LoRA folder: its keys, checked one by one, and peft's rules for which
modules it adapts and with which rank and alpha (transforms/peft_format.py reads and writes the folders).

Every key either decides the adapters (USED), changes nothing about their update (IGNORED: names,
initializations that leave the base weights as they were, runtime options), or names a feature this code
does not compute (DoRA, modules_to_save, biases, ...): such a key is accepted only at its "off" value,
else it is one LoRAError naming the file and the key. An unknown key counts as a feature.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from glm4v_conversion.files import read_json_object
from glm4v_core.transforms.lora import LoRAError

PEFT_CONFIG = "adapter_config.json"

# keys read for their value; keys that do not change the adapters' update
USED = ("peft_type", "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora",
        "lora_dropout")
IGNORED = ("base_model_name_or_path", "revision", "task_type", "inference_mode", "auto_mapping", "loftq_config",
           "eva_config", "corda_config", "runtime_config", "megatron_core", "peft_version", "qalora_group_size",
           "ensure_weight_tying", "init_lora_weights")
# init_lora_weights that leave the base weights as they were (pissa, olora, corda, loftq change them)
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
FEATURES = {"use_dora": "DoRA (weight-decomposed LoRA)", "modules_to_save": "modules_to_save (full copies of "
            "modules)", "bias": "trained biases", "lora_bias": "a bias on lora_B", "fan_in_fan_out": "fan_in_fan_out "
            "(Conv1D-style transposed weights)", "layers_to_transform": "layers_to_transform",
            "layers_pattern": "layers_pattern", "layer_replication": "layer_replication",
            "exclude_modules": "exclude_modules", "megatron_config": "Megatron parallel layers",
            "trainable_token_indices": "trainable tokens", "target_parameters": "LoRA on parameters",
            "use_qalora": "QA-LoRA", "alora_invocation_tokens": "activated LoRA"}


@dataclass(frozen=True)
class PeftSettings:
    """The keys of adapter_config.json that decide the adapters, checked."""
    r: int
    lora_alpha: float
    target_modules: list[str] | str
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    use_rslora: bool
    lora_dropout: float


# -- peft's rules -----------------------------------------------------------------------------------

def targeted(settings: PeftSettings, names) -> list[str]:
    """The module names peft adapts (peft.tuners.tuners_utils.check_target_module_exists)."""
    t = settings.target_modules
    if isinstance(t, str):
        return [n for n in names if re.fullmatch(t, n)]
    return [n for n in names if n in t or any(n.endswith(f".{key}") for key in t)]


def pattern_values(settings: PeftSettings, name: str) -> tuple[tuple[int, float], tuple[int, float]]:
    """(r, alpha) of module `name` under peft 0.13's key rule, and under later peft's."""
    s = settings
    old = next((k for k in [*s.rank_pattern, *s.alpha_pattern] if re.match(rf".*\.{k}$", name)), name)
    new_r = next((k for k in s.rank_pattern if re.match(rf"(.*\.)?({k})$", name)), name)
    new_a = next((k for k in s.alpha_pattern if re.match(rf"(.*\.)?({k})$", name)), name)
    return ((s.rank_pattern.get(old, s.r), s.alpha_pattern.get(old, s.lora_alpha)),
            (s.rank_pattern.get(new_r, s.r), s.alpha_pattern.get(new_a, s.lora_alpha)))


# -- the checks -------------------------------------------------------------------------------------

def read_settings(folder: Path) -> PeftSettings:
    """adapter_config.json, checked key by key: a LoRA that this code computes exactly, or a LoRAError."""
    path = folder / PEFT_CONFIG
    raw = read_json_object(path, "peft adapter config", LoRAError, "a JSON object (a peft LoraConfig)")
    if raw.get("peft_type") != "LORA":
        raise LoRAError(f"{path}: key 'peft_type' is {raw.get('peft_type')!r}; only 'LORA' adapters are read")
    for key, value in raw.items():
        check_feature(path, key, value)
    return PeftSettings(r=_rank(path, "r", raw.get("r")), lora_alpha=_alpha(path, "lora_alpha", raw.get("lora_alpha")),
                        target_modules=_targets(path, raw.get("target_modules")),
                        rank_pattern={k: _rank(path, f"rank_pattern[{k!r}]", v)
                                      for k, v in _mapping(path, "rank_pattern", raw).items()},
                        alpha_pattern={k: _alpha(path, f"alpha_pattern[{k!r}]", v)
                                       for k, v in _mapping(path, "alpha_pattern", raw).items()},
                        use_rslora=_flag(path, "use_rslora", raw.get("use_rslora", False)),
                        lora_dropout=_dropout(path, raw.get("lora_dropout", 0.0)))


def check_feature(path: Path, key: str, value) -> None:
    """A key this reader neither uses nor may ignore must hold its 'off' value."""
    if key in USED or (key in IGNORED and key != "init_lora_weights"):
        return
    if key == "init_lora_weights":
        if not any(value is v if isinstance(v, bool) else value == v for v in PLAIN_INITS):
            raise LoRAError(f"{path}: key 'init_lora_weights' is {value!r}: such adapters go with the base weights "
                            "that initialization changed; convert them to a plain LoRA first (peft's save_pretrained "
                            "with path_initial_model_for_weight_conversion)")
        return
    if value in (None, False, "", [], {}) or (key == "bias" and value == "none"):
        return
    what = FEATURES.get(key, "a peft feature this reader does not know")
    raise LoRAError(f"{path}: key {key!r} is {value!r}: {what} is not supported; accepted are plain LoRA adapters "
                    f"on Linear layers ({', '.join(USED[1:])})")


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _rank(path, key, v) -> int:
    if type(v) is not int or v < 1:
        raise LoRAError(f"{path}: key {key} is {v!r}, expected an integer >= 1")
    return v


def _alpha(path, key, v) -> float:
    if not (_number(v) and v > 0):
        raise LoRAError(f"{path}: key {key} is {v!r}, expected a finite number > 0")
    return v


def _flag(path, key, v) -> bool:
    if not isinstance(v, bool):
        raise LoRAError(f"{path}: key {key!r} is {v!r}, expected true or false")
    return v


def _dropout(path, v) -> float:
    if not (_number(v) and 0 <= v < 1):
        raise LoRAError(f"{path}: key 'lora_dropout' is {v!r}, expected a number in [0, 1)")
    return float(v)


def _mapping(path, key, raw) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise LoRAError(f"{path}: key {key!r} is {value!r}, expected a JSON object of module-name patterns")
    for k in value:
        try:
            re.compile(k)
        except re.error as e:
            raise LoRAError(f"{path}: key {key} has {k!r}, not a regular expression ({e})") from None
    return value


def _targets(path, v) -> list[str] | str:
    if isinstance(v, str):
        if v.lower() == "all-linear":
            raise LoRAError(f"{path}: key 'target_modules' is 'all-linear', peft's shorthand that it expands before "
                            "saving; list the module names (or give a regular expression)")
        try:
            re.compile(v)
        except re.error as e:
            raise LoRAError(f"{path}: key 'target_modules' {v!r} is not a regular expression ({e})") from None
        return v
    if isinstance(v, list) and v and all(isinstance(t, str) and t for t in v):
        return v
    raise LoRAError(f"{path}: key 'target_modules' is {v!r}, expected a non-empty list of module names or a "
                    "regular expression")
