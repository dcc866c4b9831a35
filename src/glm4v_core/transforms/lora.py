"""LoRA: low-rank adapters around chosen Linear layers of a GLM4V, base weights frozen.

    y = base(x) + (alpha / rank) * B(A(dropout(x)))       A: (rank, in), B: (out, rank), B starts at 0

so a freshly adapted model computes exactly what the base model computes.

Which layers: `LoRAConfig.targets` holds shell-style patterns over module names (fnmatch), e.g.
`text.layers.*.attn.qkv`. The presets `decoder`, `vision` and `projector` (TARGET_PRESETS) name
every Linear of the decoder blocks, the ViT blocks and the projector's GLU; the output head
(lm_head), the embeddings and the convolutions never get adapters.

Fused layers. The decoder's `attn.qkv` computes q | k | v with one matrix (sizes 4096 | 256 | 256
in the real model), `mlp.gate_up` computes gate | up, the ViT's `attn.qkv` q | k | v; each declares
the sizes of its parts (`parts`, see glm4v_core.model.ops.Linear; a quantized layer keeps them). With
`split_fused=True` (the default) each part gets its own rank-r adapter, as if q, k and v were
separate Linears (what LoRA on the unfused reference layout gives): the parts' A matrices are
stacked in `lora_A` (parts * rank, in) and their B matrices in `lora_B` (out, rank), rows of part p
multiplying only A's rows of part p. Written as one matrix this is the block-diagonal update
    delta_W = scale * blockdiag(B_q, B_k, B_v) @ [A_q; A_k; A_v]          (out, in)
With `split_fused=False` the fused layer gets one shared adapter (A (rank, in), B (out, rank)):
fewer parameters, and the parts share one input subspace.

The base is pluggable (QLoRA: quantize first, then add adapters): LoRALinear needs from it only
`in_features`, `out_features` and `forward`; `merge()` / `unmerge()` call its `merge_delta(delta)`
when it has one (a quantized base requantizes there), else add `delta` to `base.weight`.

Adapter files (`save_adapters` / `load_adapters`, `glm4v finetune`'s OUT/adapter.safetensors): one
safetensors file, fp32 tensors `<module name>.lora_A` / `.lora_B` (e.g. `text.layers.0.attn.qkv.lora_A`)
and the metadata `format = glm4v-lora`, `format_version = 1`, `lora_config = <LoRAConfig as JSON>`.
"""
from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from glm4v_conversion.atomic import staged_file
from glm4v_core.errors import GLM4VError
from glm4v_core.model.glm4v import GLM4V

ADAPTER_FORMAT = "glm4v-lora"
ADAPTER_FORMAT_VERSION = "1"
ADAPTER_FILE = "adapter.safetensors"  # what a LoRA run of `glm4v finetune` leaves in its --out folder
TARGET_PRESETS = {
    "decoder": ("text.layers.*.attn.qkv", "text.layers.*.attn.out", "text.layers.*.mlp.gate_up",
                "text.layers.*.mlp.down"),
    "vision": ("vision.layers.*.attn.qkv", "vision.layers.*.attn.out", "vision.layers.*.mlp.fc1",
               "vision.layers.*.mlp.fc2"),
    "projector": ("projector.glu.proj", "projector.glu.gate", "projector.glu.up", "projector.glu.down"),
}


class LoRAError(GLM4VError):
    """A LoRA request or adapter file that does not fit the model; the message says which and how."""


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8                 # r: the adapters' inner width
    alpha: float = 16.0           # the update is scaled by alpha / rank
    dropout: float = 0.0          # dropout on the adapter's input only (training mode)
    targets: tuple[str, ...] = TARGET_PRESETS["decoder"]  # fnmatch patterns over module names
    split_fused: bool = True      # fused qkv / gate_up: one adapter per part (True) or one shared

    def __post_init__(self):
        if self.rank < 1:
            raise LoRAError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_presets(cls, parts: list[str], **kwargs) -> LoRAConfig:
        """e.g. from_presets(["decoder", "projector"], rank=8): the union of those presets' targets."""
        unknown = [p for p in parts if p not in TARGET_PRESETS]
        if unknown or not parts:
            raise LoRAError(f"unknown LoRA target preset(s) {unknown or parts}; choose from {list(TARGET_PRESETS)}")
        return cls(targets=tuple(t for p in parts for t in TARGET_PRESETS[p]), **kwargs)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LoRAConfig:
        return cls(**json.loads(text))


class LoRALinear(nn.Module):
    """A frozen base Linear (or any module with the same contract) plus a trainable low-rank update.

    parts: output sizes of the fused parts (sum = out_features), one adapter each; (out,) = plain."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 parts: tuple[int, ...] | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base = base
        self.parts = tuple(parts or (base.out_features,))
        if sum(self.parts) != base.out_features:
            raise LoRAError(f"fused parts {self.parts} do not add up to out_features {base.out_features}")
        self.rank, self.scale = rank, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = next(iter([*base.parameters(), *base.buffers()]), torch.empty(0)).device
        self.lora_A = nn.Parameter(torch.empty(len(self.parts) * rank, base.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype, device=device))
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """A ~ N(0, 1/in_features) (unit-scale outputs, as glm4v_core.model.init), B = 0: the update starts
        at 0. Drawn from a CPU generator, so the same seed gives the same adapters on every device."""
        a = torch.randn(self.lora_A.shape, generator=generator) / math.sqrt(self.in_features)
        self.lora_A.copy_(a)
        self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        h = self.dropout(x.to(self.lora_A.dtype)) @ self.lora_A.T  # (..., parts * r)
        h = h.unflatten(-1, (len(self.parts), self.rank))  # (..., parts, r)
        # part p's rows of B multiply only part p's rank slice: the block-diagonal B, never built
        update = torch.cat([h[..., p, :] @ b.T for p, b in enumerate(self.lora_B.split(self.parts))], dim=-1)
        return y + (self.scale * update).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scale * blockdiag(B_p) @ A: the (out, in) update merge() adds to the base weight (fp32)."""
        A = self.lora_A.detach().float().unflatten(0, (len(self.parts), self.rank))  # (parts, r, in)
        Bs = self.lora_B.detach().float().split(self.parts)
        return self.scale * torch.cat([b @ A[p] for p, b in enumerate(Bs)], dim=0)

    def merge(self) -> None:
        if not self.merged:
            self._add_to_base(self.delta_weight())
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._add_to_base(-self.delta_weight())
            self.merged = False

    def _add_to_base(self, delta: torch.Tensor) -> None:
        if hasattr(self.base, "merge_delta"):  # e.g. a quantized base: dequantize, add, requantize
            self.base.merge_delta(delta)
            return
        w = self.base.weight
        # out of place: a loaded weight may be a view of a memory-mapped file
        w.data = (w.detach().float() + delta.to(w.device)).to(w.dtype)


def add_lora(model: GLM4V, config: LoRAConfig, seed: int = 0) -> dict[str, LoRALinear]:
    """Wrap every Linear (or `is_linear` stand-in) whose name matches a target in a LoRALinear, in
    place; freeze everything else. Returns {module name: adapter}. A pattern that matches no Linear raises (a typo would
    otherwise train nothing)."""
    if adapters_of(model):
        raise LoRAError("the model already has LoRA adapters; call remove_lora(model) first")
    linears = {name: m for name, m in model.named_modules() if is_linear(m)}
    check_targets(linears, config)
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    adapters = {}
    for name, linear in linears.items():
        if not any(fnmatch.fnmatchcase(name, p) for p in config.targets):
            continue
        parts = getattr(linear, "parts", None) if config.split_fused else None  # a fused layer declares them
        adapter = LoRALinear(linear, config.rank, config.alpha, config.dropout, parts)
        adapter.reset_parameters(generator)
        _set_module(model, name, adapter)
        adapters[name] = adapter
    model.lora_config = config
    return adapters


def check_targets(linears: dict[str, nn.Module], config: LoRAConfig) -> None:
    """Every target pattern matches some Linear: a typo would otherwise train (or load) nothing."""
    for pattern in config.targets:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in linears):
            raise LoRAError(f"LoRA target {pattern!r} matches no Linear layer of the model "
                            f"(examples of names: {sorted(linears)[:3]})")


def is_linear(module: nn.Module) -> bool:
    """A module adapters can wrap: nn.Linear, or any stand-in (a quantized Linear) that declares
    integer in_features and out_features."""
    if isinstance(module, LoRALinear):
        return False
    return isinstance(module, nn.Linear) or all(isinstance(getattr(module, a, None), int)
                                                for a in ("in_features", "out_features"))


def adapters_of(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge(model: nn.Module) -> None:
    """Fold every adapter into its base weight (the forward then skips the adapters). The sum is
    taken in fp32 and stored in the weight's dtype: a bf16 base rounds the merged weight to bf16."""
    for adapter in adapters_of(model).values():
        adapter.merge()


def unmerge(model: nn.Module) -> None:
    """Undo merge(): subtract the same updates (equal to the unmerged model within rounding)."""
    for adapter in adapters_of(model).values():
        adapter.unmerge()


def remove_lora(model: GLM4V, merge_first: bool = True) -> GLM4V:
    """Put the base Linears back in place of the wrappers (merged into them by default): the
    model then has its original parameter names, ready for save_model."""
    for name, adapter in adapters_of(model).items():
        if merge_first:
            adapter.merge()
        elif adapter.merged:
            adapter.unmerge()
        _set_module(model, name, adapter.base)
    model.__dict__.pop("lora_config", None)
    return model


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{<module name>.lora_A / .lora_B: tensor} of every adapter: the adapter file's contents."""
    state = {}
    for name, adapter in adapters_of(model).items():
        state[f"{name}.lora_A"] = adapter.lora_A.detach()
        state[f"{name}.lora_B"] = adapter.lora_B.detach()
    return state


def save_adapters(model: nn.Module, path: str | Path, extra_metadata: dict[str, str] | None = None,
                  tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapters and the LoRA config to one safetensors file, atomically (temp + rename).

    tensors: the adapter tensors to write, default adapter_state(model) (a sharded model passes
    them gathered whole)."""
    config = getattr(model, "lora_config", None)
    if config is None or not adapters_of(model):
        raise LoRAError("the model has no LoRA adapters to save (call add_lora first)")
    if any(a.merged for a in adapters_of(model).values()):
        raise LoRAError("the adapters are merged into the base weights; unmerge(model) before saving them")
    path = Path(path)
    tensors = {k: v.float().cpu().contiguous() for k, v in (tensors or adapter_state(model)).items()}
    metadata = {"format": ADAPTER_FORMAT, "format_version": ADAPTER_FORMAT_VERSION,
                "lora_config": config.to_json(), **(extra_metadata or {})}
    atomic_save_file(tensors, path, metadata)
    return path


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
    """The adapter file a command's --adapter names: a `glm4v finetune --out` folder (its
    adapter.safetensors) or the file itself."""
    path = Path(path)
    if not path.is_dir():
        if not path.exists():
            raise LoRAError(f"{path} does not exist; give a glm4v finetune --out folder or its {ADAPTER_FILE}")
        return path
    if (path / ADAPTER_FILE).is_file():
        return path / ADAPTER_FILE
    hint = ("it holds model/, a full fine-tune: pass that folder as --checkpoint" if (path / "model").is_dir() else
            "a LoRA run writes it when it finishes (glm4v finetune --resume OUT finishes an interrupted one)")
    raise LoRAError(f"folder {path} has no {ADAPTER_FILE}: {hint}")


def check_adapters(model: GLM4V, path: str | Path) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """An adapter file's config and tensors once they fit `model` (a meta-device model will do):
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


def load_adapters(model: GLM4V, path: str | Path) -> dict[str, LoRALinear]:
    """Add the file's adapters to a base model (or refill existing ones of the same config).
    Everything is checked first (check_adapters): a refused file leaves the model as it was."""
    config, tensors = check_adapters(model, path)
    if not adapters_of(model):
        add_lora(model, config)
    with torch.no_grad():
        for name, target in adapter_state(model).items():
            target.copy_(tensors[name])
    return adapters_of(model)
