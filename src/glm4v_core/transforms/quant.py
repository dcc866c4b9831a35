"""Weight-only int8 / int4 quantization as a transform on a built model, and QLoRA on top of it.

`quantize_model(model, scheme, group_size)` swaps every nn.Linear (ViT, projector, decoder,
lm_head included) for a `QuantLinear` holding packed weights; embeddings, norms, biases and
convolutions stay as they are, in the model's dtype, which is also the compute dtype (activations
are never quantized). The math and the stored format (names, packing, scale/zero dtypes, the rule
for a layer whose input width is not a multiple of the group size: int8 for that layer) are
documented in glm4v_conversion.quantize, shared with `glm4v-convert --quantize`.

Compute (ops.quant_matmul): Triton kernels with fused dequantization on CUDA, PyTorch's packed
weight-only CPU kernels on CPU, dequantize-then-matmul otherwise and whenever gradients are needed.

QLoRA: `glm4v_core.transforms.lora.add_lora` wraps QuantLinears like Linears; only the adapters train, the
packed weights are buffers and receive no gradient (the gradient reaches the input through the
dequantized weight).
"""
from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from glm4v_conversion.quantize import (
    GROUP_SIZES,
    SCHEMES,
    QuantizationError,
    check_request,
    layer_scheme,
    quantize_weight,
    quantized_layout,
)
from glm4v_core.model import ops

__all__ = ["QuantLinear", "QuantizationError", "QuantFallbackWarning", "load_quantized", "quantize_model",
           "quantized_linears", "slower_layers", "SCHEMES", "GROUP_SIZES"]


class QuantFallbackWarning(UserWarning):
    """Some layers of a loaded quantized folder are not what was asked for, or run a slower kernel;
    one warning per load names them and why."""


class QuantLinear(nn.Module):
    """y = x @ dequant(W).T + bias, W stored packed: int8 per-row, or int4 in groups along the input dim.

    Buffers as stored on disk: `weight_int8` + `weight_scale`, or `weight_int4` + `weight_scale` +
    `weight_zero`. The bias (if any) is a float parameter like the rest of the model. `parts`: those of
    the Linear it replaced (see ops.Linear), None for one built directly."""

    parts: tuple[int, ...] | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: str, group_size: int | None,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme = layer_scheme(in_features, scheme, group_size)
        self.group_size = group_size if self.scheme == "int4" else None
        # the stored tensors of a Linear `P.weight` are `P.weight_int8`, ...: here as buffers `weight_int8`, ...
        layout = quantized_layout("P.weight", (out_features, in_features), self.scheme, self.group_size)
        for name, (t_dtype, shape) in layout.items():
            self.register_buffer(name.removeprefix("P."), torch.empty(shape, dtype=t_dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self._cpu_int4: tuple[torch.Tensor, torch.Tensor] | None = None
        self.compute_dtype = dtype  # the activations' dtype: what the CPU kernels' scales are kept in

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, group_size: int | None, method: str = "rtn") -> QuantLinear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme, group_size,
                linear.weight.dtype, linear.weight.device)
        q.parts = getattr(linear, "parts", None)  # a fused layer stays one (a plain nn.Linear has no parts)
        if linear.weight.device.type != "meta":
            stored = quantize_weight(linear.weight.detach(), "P.weight", q.scheme, q.group_size, method)
            for name, t in stored.items():
                getattr(q, name.removeprefix("P.")).copy_(t)
            if linear.bias is not None:
                q.bias.data.copy_(linear.bias.detach())
            q.use_compute_dtype(linear.weight.dtype)
        if q.bias is not None:
            q.bias.requires_grad_(linear.bias.requires_grad)
        return q

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # integer codes are never cast by model.to(dtype); scales and zeros are
        if self.bias is not None:
            self.compute_dtype = self.bias.dtype
        self.prepare()  # the device or dtype may have changed
        return self

    def use_compute_dtype(self, dtype: torch.dtype) -> None:
        """int8 row scales in the compute dtype (PyTorch's packed int8 kernel takes them so; a cast
        inside every call would also break its compiled lowering), then prepare()."""
        self.compute_dtype = dtype
        if self.scheme == "int8":
            self.weight_scale = self.weight_scale.to(dtype)
        self.prepare()

    @torch.no_grad()
    def prepare(self) -> None:
        """Build what the device's fast kernel needs beside the stored buffers (once, after the
        weights are in place; forward never mutates the module, so decode steps compile whole).

        PyTorch's CPU int4 kernel takes its own tiled layout and computes (q - 8) * s + z' with
        z' = z + 8 s. It needs N to be a multiple of 16; other layers run the reference."""
        self._cpu_int4 = None
        w = self._buffers.get("weight_int4")
        if w is None or w.device.type != "cpu" or self.out_features % 16:
            return
        codes = torch.stack((w & 0xF, w >> 4), dim=-1).flatten(-2)  # (N, K/2, 2) -> (N, K)
        packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        s, z = self.weight_scale.float(), self.weight_zero.float()
        scale_and_zero = torch.stack((s, z + 8 * s), dim=-1).transpose(0, 1)  # (K/G, N, 2)
        self._cpu_int4 = (packed, scale_and_zero.to(self.compute_dtype).contiguous())

    @torch.no_grad()
    def merge_delta(self, delta: torch.Tensor) -> None:
        """W <- quantize(dequantize(W) + delta) in this layer's scheme (LoRA merging into a quantized base)."""
        w = self.dequantized_weight(torch.float32) + delta.to(self.weight_scale.device, torch.float32)
        for name, t in quantize_weight(w, "P.weight", self.scheme, self.group_size).items():
            getattr(self, name.removeprefix("P.")).copy_(t)
        self.prepare()

    def dequantized_weight(self, dtype: torch.dtype, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Rows start..end of W (N, K) (all by default) in `dtype`, as the stored tensors stand for
        them, dequantized a block of rows at a time (ops.dequantized_rows)."""
        if self.scheme == "int8":
            return ops.dequantized_rows(self.weight_int8, self.weight_scale, None, None, dtype, start, end)
        return ops.dequantized_rows(self.weight_int4, self.weight_scale, self.weight_zero, self.group_size, dtype,
                                    start, end)

    def weight_rows(self, dtype: torch.dtype) -> DequantizedRows:
        """The weight as the chunked training loss reads it (ops.Linear.weight_rows' contract):
        rows dequantized when sliced, so the loss never holds the dense matrix (1.2 GB in bf16 for
        the 9B's lm_head, kept through backward otherwise)."""
        return DequantizedRows(self, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme == "int8":
            y = ops.quant_matmul(x, self.weight_int8, self.weight_scale)
        else:
            y = ops.quant_matmul(x, self.weight_int4, self.weight_scale, self.weight_zero, self.group_size,
                                 cpu_int4=self._cpu_int4 if x.device.type == "cpu" else None)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}{group}"


class DequantizedRows:
    """A QuantLinear's weight (N, K) that dequantizes only the rows it is sliced at: `rows[a:b]` is
    `layer.dequantized_weight(dtype, a, b)`. Frozen: no gradient reaches the packed codes."""

    def __init__(self, layer: QuantLinear, dtype: torch.dtype):
        self.layer, self.dtype = layer, dtype
        self.shape = torch.Size((layer.out_features, layer.in_features))

    def __getitem__(self, rows: slice) -> torch.Tensor:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError(f"DequantizedRows takes a contiguous row slice [a:b], got {rows!r}")
        return self.layer.dequantized_weight(self.dtype, rows.start or 0, rows.stop)


def quantize_model(model: nn.Module, scheme: str, group_size: int | None = None, method: str = "rtn") -> nn.Module:
    """Replace every nn.Linear of `model` in place by a QuantLinear (see the module docstring).

    On the meta device only the layout is built (what a quantized checkpoint is checked against)."""
    check_request(scheme, group_size, method)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, QuantLinear.from_linear(child, scheme, group_size, method))
    return model


def load_quantized(ckpt, record: dict, model: nn.Module, config_path, dtype: torch.dtype,
                   device: torch.device) -> nn.Module:
    """Fill meta `model` (built in the folder's float dtype) from a quantized native folder.

    The expected tensors are the state_dict of the model after quantize_model on the meta device,
    so names, shapes and dtypes are checked exactly; float tensors are then cast to `dtype`, packed
    ones stay as stored. glm4v_native.json's per-layer list must agree with the group rule."""
    from glm4v_conversion.quantize import check_quantized_tensors
    from glm4v_conversion.safetensors_io import CheckpointError, MappedFiles
    quantize_model(model, record["scheme"], record.get("group_size"), record.get("method") or "rtn")
    layers = {f"{name}.weight": m.scheme for name, m in quantized_linears(model).items()}
    if record.get("layers") is not None and record["layers"] != layers:
        raise CheckpointError(f"{ckpt.folder}: glm4v_native.json's quantization.layers does not match the "
                              f"{record['scheme']} group rule for this config")
    expected = {name: (t.dtype, tuple(t.shape)) for name, t in model.state_dict().items()}
    check_quantized_tensors(ckpt, expected, config_path)
    files = MappedFiles()
    state = {}
    for name, info in ckpt.tensors.items():
        t = files.tensor(info)
        state[name] = t.to(device) if _is_quantized_tensor(name) else t.to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True, strict=True)
    for layer in quantized_linears(model).values():
        layer.use_compute_dtype(dtype)
    reasons = slower_layers(model, record["scheme"], record.get("group_size"))
    if reasons:
        warnings.warn(f"{ckpt.folder}: " + "; ".join(f"{why}: {', '.join(names)}" for why, names in reasons.items()),
                      QuantFallbackWarning, stacklevel=3)  # at load_model's caller
    return model


def slower_layers(model: nn.Module, scheme: str, group_size: int | None) -> dict[str, list[str]]:
    """{why: layer names} of the QuantLinears that are not int4 although int4 was asked for (the group
    rule), or that run the dequantize-then-matmul reference on CPU (PyTorch's int4 kernel needs
    out_features to be a multiple of 16). The names of repeated blocks are folded: `layers.*` (n)."""
    reasons: dict[str, list[str]] = {}
    for name, layer in quantized_linears(model).items():
        if scheme == "int4" and layer.scheme == "int8":
            why = f"stored int8, not int4 (input width not a multiple of the group size {group_size})"
        elif layer.scheme == "int4" and layer.weight_int4.device.type == "cpu" and layer._cpu_int4 is None:
            why = ("int4 without PyTorch's packed CPU kernel, dequantized at every call (out_features not a "
                   "multiple of 16)")
        else:
            continue
        reasons.setdefault(why, []).append(name)
    return {why: fold_layer_names(names) for why, names in reasons.items()}


def fold_layer_names(names: list[str]) -> list[str]:
    """['vision.layers.0.attn.qkv', 'vision.layers.1.attn.qkv'] -> ['vision.layers.*.attn.qkv (2)']: one
    warning line, however deep the model."""
    counts: dict[str, int] = {}
    for name in names:
        folded = re.sub(r"\.layers\.\d+\.", ".layers.*.", name)
        counts[folded] = counts.get(folded, 0) + 1
    return [f"{name} ({n})" if "*" in name else name for name, n in counts.items()]


def _is_quantized_tensor(name: str) -> bool:
    """Codes, scales and zeros keep their stored dtype; every other tensor takes the compute dtype."""
    return name.endswith((".weight_int8", ".weight_int4", ".weight_scale", ".weight_zero"))


def quantized_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
