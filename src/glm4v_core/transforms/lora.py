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

Files: transforms/adapter_files.py reads and writes adapters (`save_adapters` / `load_adapters`: this
project's one-file format and, through transforms/peft_format.py, PEFT folders); both go through
`LayerAdapter`, one layer's adapter as tensors, which `layer_adapters` takes from a model and
`attach_adapters` puts on one.
"""
from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from glm4v_core.errors import GLM4VError
from glm4v_core.model.glm4v import GLM4V

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


class CastMatmul(torch.autograd.Function):
    """x.to(A.dtype) @ A.T, keeping x for backward as it came (bf16 in a bf16 model) and casting it
    again there: autograd would keep the fp32 copy of every adapted layer's input (2x its bf16 size)
    until the backward. Same values and gradients as the plain expression."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, A)
        return x.to(A.dtype) @ A.T

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, A = ctx.saved_tensors
        grad_x = (grad @ A).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_A = None
        if ctx.needs_input_grad[1]:  # (in, rows) @ (rows, r), transposed: the product autograd takes for A.T
            grad_A = (x.reshape(-1, x.shape[-1]).to(A.dtype).T @ grad.reshape(-1, grad.shape[-1])).T
        return grad_x, grad_A


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
        if isinstance(self.dropout, nn.Identity):
            h = CastMatmul.apply(x, self.lora_A)  # (..., parts * r), no fp32 copy of x kept for backward
        else:  # the dropped-out input is a new tensor anyway: autograd keeps it
            h = self.dropout(x.to(self.lora_A.dtype)) @ self.lora_A.T
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


def linears_of(model: nn.Module) -> dict[str, nn.Module]:
    """{module name: Linear} of every layer an adapter can wrap, adapted ones included (their base)."""
    adapted = {name: m.base for name, m in adapters_of(model).items()}
    bases = {f"{name}.base" for name in adapted}
    return {**{name: m for name, m in model.named_modules() if is_linear(m) and name not in bases}, **adapted}


@dataclass(frozen=True)
class LayerAdapter:
    """One layer's adapter as the adapter files hold it: the update is scale * blockdiag(B_p) @ A with
    A (len(parts) * rank, in) and B (out, rank), B's rows split by `parts` ((out,): one plain adapter)."""
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scale: float
    parts: tuple[int, ...]

    @property
    def rank(self) -> int:
        return self.lora_B.shape[1]


@dataclass(frozen=True)
class AdapterSet:
    """A model's adapters as files hold them. config: the LoRAConfig that describes them (what the
    glm4v format stores), None when none does (per-layer ranks or scales, e.g. a PEFT rank_pattern)."""
    layers: dict[str, LayerAdapter]
    dropout: float
    config: LoRAConfig | None


def adapter_set(model: nn.Module, tensors: dict[str, torch.Tensor] | None = None) -> AdapterSet:
    """The model's adapters, fp32 on the CPU. tensors: their `adapter_state`, default the model's own
    (a sharded model passes them gathered whole)."""
    tensors = tensors or adapter_state(model)
    adapters = adapters_of(model)
    layers = {name: LayerAdapter(tensors[f"{name}.lora_A"].detach().float().cpu(),
                                 tensors[f"{name}.lora_B"].detach().float().cpu(), a.scale, a.parts)
              for name, a in adapters.items()}
    dropout = next((a.dropout.p for a in adapters.values() if isinstance(a.dropout, nn.Dropout)), 0.0)
    return AdapterSet(layers, dropout, getattr(model, "lora_config", None))


def config_for(layers: dict[str, LayerAdapter], dropout: float) -> LoRAConfig | None:
    """The LoRAConfig of adapters of one rank and one scale on exactly these layers (per-part on the fused
    ones if any has parts: the reader gives all fused layers one layout), or None when they differ."""
    ranks, scales = {a.rank for a in layers.values()}, {a.scale for a in layers.values()}
    if len(ranks) != 1 or len(scales) != 1:
        return None
    rank, scale, split = ranks.pop(), scales.pop(), any(len(a.parts) > 1 for a in layers.values())
    return LoRAConfig(rank=rank, alpha=scale * rank, dropout=dropout, targets=tuple(layers), split_fused=split)


def attach_adapters(model: GLM4V, adapters: AdapterSet) -> dict[str, LoRALinear]:
    """Wrap each named Linear in a LoRALinear holding that layer's tensors and scale (the reader has
    checked the shapes against the model); freeze everything else."""
    if adapters_of(model):
        raise LoRAError("the model already has LoRA adapters; call remove_lora(model) first")
    linears = linears_of(model)
    model.requires_grad_(False)
    wrapped = {}
    for name, layer in adapters.layers.items():
        parts = layer.parts if len(layer.parts) > 1 else None
        adapter = LoRALinear(linears[name], layer.rank, layer.scale * layer.rank, adapters.dropout, parts)
        adapter.scale = layer.scale  # exactly the file's scale (alpha / rank could round it again)
        with torch.no_grad():
            adapter.lora_A.copy_(layer.lora_A)
            adapter.lora_B.copy_(layer.lora_B)
        _set_module(model, name, adapter)
        wrapped[name] = adapter
    model.lora_config = adapters.config
    return wrapped
