"""The one place that picks an implementation for each fused op: Triton kernels or torch.

Backend: Triton on CUDA tensors, torch references elsewhere, unless overridden by the
GLM4V_BACKEND environment variable (auto|torch|triton, read once at import) or by the
`use_backend(...)` context manager (tests flip it). An explicit request that cannot run raises.
Every op is differentiable on both backends (the Triton ones have Triton backward kernels), and the
Triton ones are torch custom ops, so torch.compile(fullgraph=True) and CUDA graphs take them whole.
`Linear` is the model's linear layer: on CPU it can run on oneDNN-packed bf16 weights (`pack_cpu_weights`);
a fused one declares the sizes of its parts (`parts`).
"""
from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

import glm4v_kernels as K
from glm4v_core.errors import GLM4VError

BACKENDS = ("auto", "torch", "triton")


class BackendError(GLM4VError):
    """An unknown backend name, or an explicitly requested backend that cannot run here."""


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    return name


_backend = os.environ.get("GLM4V_BACKEND", "auto").strip().lower() or "auto"  # checked at first use
_planned_device: torch.device | None = None  # plan_device(): fake CPU tensors take this device's code path


def triton_usable_on(device: torch.device) -> bool:
    """Triton kernels compile for CUDA; on CPU they run only under TRITON_INTERPRET=1."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def backend_for(x: torch.Tensor) -> str:
    """'triton' or 'torch' for a tensor on x's device, honouring the current override."""
    device = device_of(x)
    if _check_backend(_backend) == "torch":
        return "torch"
    if _backend == "triton":
        if not triton_usable_on(device):
            raise BackendError(
                f"backend 'triton' was requested but cannot run on {device.type}: "
                "Triton needs a CUDA device, or TRITON_INTERPRET=1 on CPU")
        return "triton"
    return "triton" if device.type == "cuda" else "torch"  # auto: kernels on CUDA, references elsewhere


def device_of(x: torch.Tensor) -> torch.device:
    """x's device, or the device being planned for (plan_device)."""
    return _planned_device or x.device


@contextlib.contextmanager
def plan_device(device: str | torch.device) -> Iterator[None]:
    """Memory planning (glm4v_core.training.memory) runs fake CPU tensors down the code path a tensor on
    `device` takes: for 'cuda' the Triton ops, called as the registered custom ops (torch.ops.glm4v_kernels)
    so that only their register_fake runs (output shapes; nothing is launched and no device is checked).
    Fake CUDA tensors cannot be used instead: autograd needs a CUDA device guard, which a CPU build lacks."""
    global _planned_device
    previous, _planned_device = _planned_device, torch.device(device)
    try:
        yield
    finally:
        _planned_device = previous


def _planned_op(name: str):
    """The custom op itself (no Python checks) while planning, else None."""
    return getattr(torch.ops.glm4v_kernels, name) if _planned_device is not None else None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily force 'torch', 'triton' or 'auto' for every op."""
    global _backend
    previous, _backend = _backend, _check_backend(name)
    try:
        yield
    finally:
        _backend = previous


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """GLM-4 RMSNorm over the last dim (fp32 inside, one cast at the end); differentiable."""
    if backend_for(x) == "triton":
        planned = _planned_op("rms_norm")
        return planned(x, weight, float(eps))[0] if planned else K.rms_norm(x, weight, eps)
    return K.rms_norm_ref(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the decoder's residual stream step; differentiable."""
    if backend_for(x) == "triton":
        planned = _planned_op("add_rms_norm")
        return planned(x, residual, weight, float(eps))[:2] if planned else K.add_rms_norm(x, residual, weight, eps)
    return K.add_rms_norm_ref(x, residual, weight, eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
              key_start: torch.Tensor | None = None, key_end: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D) -> (B, Hq, Lq, D); each row b sees keys
    key_start[b] <= j < key_end[b] (None: 0 and Lk); see glm4v_kernels.attention_ref.
    Both backends are differentiable."""
    if backend_for(q) == "triton":
        planned = _planned_op("attention")
        if planned:
            return planned(q, k, v, causal, None, key_start, key_end)[0]
        return K.attention(q, k, v, causal=causal, key_start=key_start, key_end=key_end)
    return K.attention_ref(q, k, v, causal=causal, key_start=key_start, key_end=key_end)


class Linear(nn.Linear):
    """nn.Linear that runs on a copy of its weight pre-packed for oneDNN once `pack_cpu_weights` made one.

    Why: on CPU, F.linear in bf16 hands oneDNN the plain (out, in) weight, which oneDNN re-blocks on
    every call; a one-row product (batch-1 decode) then reaches about 40% of the memory bandwidth,
    the pre-packed weight about twice that, and prefill-sized products gain ~10%. Same kernel family,
    bit-identical results. The packed copy is used only for inference (no gradient wanted) and only
    while the weight is the one that was packed. Under torch.compile the product is the custom op
    `glm4v::packed_linear` (inductor cannot trace the packed copy, an opaque oneDNN tensor).

    parts: for a fused projection (q | k | v, gate | up), the output sizes of its parts in row order
    (they add up to out_features); None for a plain one. Transforms read it (a LoRA adapter per part,
    tensor parallelism's reordering of the rows), and a quantized layer that replaces this one keeps it."""

    packed: PackedWeight | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 parts: tuple[int, ...] | None = None):
        super().__init__(in_features, out_features, bias, device, dtype)
        if parts is not None and sum(parts) != out_features:
            raise ValueError(f"fused parts {tuple(parts)} do not add up to out_features {out_features}")
        self.parts = None if parts is None else tuple(parts)

    def weight_rows(self, dtype: torch.dtype) -> torch.Tensor:
        """The (out, in) weight as the training loss's chunked head reads it, a block of rows at a
        time (`w[a:b]`), for products with activations of `dtype`: this layer's own weight, as it is
        (its gradient flows). A quantized layer returns rows that dequantize when sliced."""
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return F.linear(x, self.weight, self.bias)
        if torch.compiler.is_compiling():
            return packed_linear(x, self.weight, self.bias)
        return self.packed.linear(x, self.weight, self.bias)


def weight_key(weight: torch.Tensor) -> tuple[int, int]:
    """Changes whenever the weight is replaced (address) or written in place through the parameter
    (version counter; an edit through `.data` does not move it)."""
    return weight.data_ptr(), weight._version


class PackedWeight:
    """A bf16 CPU weight re-laid out once for oneDNN, the weight_key it was made from and a weak
    reference to the weight's storage: an address alone can belong to a later tensor once the weight
    is freed (its version counter starts again at 0), so `fits` also asks for the same storage."""

    def __init__(self, weight: torch.Tensor):
        self.tensor = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        self.key = weight_key(weight)
        self.storage = weakref.ref(weight.untyped_storage())

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ weight.T + bias, on the packed copy where it fits, else F.linear."""
        if self.fits(x, weight):
            return torch.ops.mkldnn._linear_pointwise(x, self.tensor, bias, "none", [], "")
        return F.linear(x, weight, bias)

    def fits(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """`weight` is still the one packed, and x is a CPU tensor of its dtype."""
        return (x.dtype == weight.dtype and x.device.type == "cpu" and self.storage() is weight.untyped_storage()
                and weight_key(weight) == self.key)  # (a new weight may be an inference tensor: no version)

    def __deepcopy__(self, memo: dict) -> None:
        return None  # a copied model has new weights (and oneDNN's tensor cannot be copied): plain products


_PACKED: weakref.WeakValueDictionary[int, PackedWeight] = weakref.WeakValueDictionary()  # data_ptr -> packed


@torch.library.custom_op("glm4v::packed_linear", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
def packed_linear(x, weight, bias):
    """The compiled step's product: the packed copy is found by the weight's address at run time (the
    Linear owns it; the table holds it weakly), with the same checks as eager."""
    packed = _PACKED.get(weight.data_ptr())
    return F.linear(x, weight, bias) if packed is None else packed.linear(x, weight, bias)


@packed_linear.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def pack_cpu_weights(model: nn.Module) -> int:
    """Give every `Linear` of `model` with a bf16 CPU weight a oneDNN-packed copy; returns how many.

    For inference on CPU, eager or compiled. The copy lives in process memory: a loaded checkpoint's
    weights stop being read through the file mapping (they are read once, here), so memory is that of
    a copied model, not of a zero-copy one. A no-op where this torch build has no oneDNN bf16 support,
    and for weights made inside torch.inference_mode() (they have no version counter to tell an
    in-place edit): load the model outside it."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return 0
    count = 0
    for module in model.modules():
        if (isinstance(module, Linear) and module.weight.dtype == torch.bfloat16 and module.weight.device.type == "cpu"
                and not module.weight.is_inference()):
            module.packed = PackedWeight(module.weight)
            _PACKED[module.weight.data_ptr()] = module.packed
            count += 1
    return count


def drop_packed_weights(model: nn.Module) -> None:
    """Forget every packed copy in `model`: for transforms that replace its weights by DTensor shards
    (tensor_parallel, fsdp), which run the plain product."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.packed = None


CPU_FP32_PACKED_MAX_ROWS = 8


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
                 group_size: int = 0, cpu_int4: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x (..., K) @ dequant(W).T -> (..., N) for a weight-only quantized W (see glm4v_kernels.quant_matmul):
    int8 when `zero` is None, else int4 with groups of `group_size`.

    Triton kernels (fused dequantization) on CUDA; on CPU PyTorch's packed weight-only kernels
    (`_weight_int8pack_mm`; `_weight_int4pack_mm_for_cpu` when the caller passes its packed weight and
    scale-and-zero tensor as `cpu_int4`); the dequantize-then-matmul reference elsewhere and whenever
    gradients must flow to x (the packed kernels have no backward, e.g. QLoRA training)."""
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    backend = backend_for(x)
    if backend == "triton" and not (needs_grad and _backend == "auto"):
        if _planned_device is not None:
            return (_planned_op("int8_matmul")(x, qweight, scale) if zero is None else
                    _planned_op("int4_matmul")(x, qweight, scale, zero, group_size))
        return K.int8_matmul(x, qweight, scale) if zero is None else K.int4_matmul(x, qweight, scale, zero, group_size)
    rows = x.numel() // x.shape[-1]
    # PyTorch's packed CPU kernels are vectorized for bf16 activations; with fp32 ones they beat
    # dequantize-then-matmul only for a few rows (decode), and lose 10x on a prefill
    fast_cpu = (device_of(x).type == "cpu" and not needs_grad and _backend == "auto"
                and (x.dtype == torch.bfloat16 or (x.dtype == torch.float32 and rows <= CPU_FP32_PACKED_MAX_ROWS)))
    if fast_cpu and zero is None:
        scale = scale if scale.dtype == x.dtype else scale.to(x.dtype)
        return _on_rows(x, lambda rows: torch._weight_int8pack_mm(rows, qweight, scale))
    if fast_cpu and cpu_int4 is not None:
        packed, scale_and_zero = cpu_int4
        if scale_and_zero.dtype != x.dtype:
            scale_and_zero = scale_and_zero.to(x.dtype)
        return _on_rows(x, lambda rows: torch._weight_int4pack_mm_for_cpu(rows, packed, group_size, scale_and_zero))
    if needs_grad:  # keep the packed weight for backward, not a dense copy of it
        return DequantizedMatmul.apply(x, qweight, scale, zero, group_size)
    if zero is None:
        return K.int8_matmul_ref(x, qweight, scale)
    return K.int4_matmul_ref(x, qweight, scale, zero, group_size)


DEQUANTIZE_ROWS = 4096  # rows dequantized at once: bounds the fp32 steps (2 x 4 B per weight)


def dequantized_rows(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                     group_size: int | None, dtype: torch.dtype, start: int = 0, end: int | None = None
                     ) -> torch.Tensor:
    """Rows start..end (all by default) of the weight that int8 codes (zero None) or packed int4
    codes stand for, in `dtype`, made DEQUANTIZE_ROWS rows at a time into the result: the fp32 steps
    of a whole 27392-row MLP weight would hold ~0.9 GB beside it (the memory planner showed it in
    QLoRA's backward). Rows are independent, so the values are those of one pass."""
    end = qweight.shape[0] if end is None else min(end, qweight.shape[0])
    width = qweight.shape[1] * (1 if zero is None else 2)  # int4: two codes a byte
    out = torch.empty(end - start, width, dtype=dtype, device=qweight.device)
    for first in range(start, end, DEQUANTIZE_ROWS):
        rows = slice(first, min(first + DEQUANTIZE_ROWS, end))
        out[first - start:rows.stop - start] = (
            K.dequantize_int8_ref(qweight[rows], scale[rows], dtype) if zero is None else
            K.dequantize_int4_ref(qweight[rows], scale[rows], zero[rows], group_size, dtype))
    return out


class DequantizedMatmul(torch.autograd.Function):
    """x @ dequant(W).T (the reference's products), differentiable in x only, dequantizing W again in
    backward: autograd would keep the dense copy the product read, so QLoRA without checkpointing held
    every layer's dense weight until backward, as much as the unquantized model (15 GiB of the 9B's
    decoder in bf16; found by the memory planner, glm4v_core.training.memory)."""

    @staticmethod
    def forward(ctx, x, qweight, scale, zero, group_size):
        ctx.save_for_backward(qweight, scale, zero)
        ctx.group_size = group_size
        return x @ dequantized_rows(qweight, scale, zero, group_size, x.dtype).T

    @staticmethod
    def backward(ctx, grad):
        qweight, scale, zero = ctx.saved_tensors
        return grad @ dequantized_rows(qweight, scale, zero, ctx.group_size, grad.dtype), None, None, None, None


def _on_rows(x: torch.Tensor, matmul) -> torch.Tensor:
    """matmul of the packed CPU kernels, which take a contiguous 2-D (rows, in) input, on x (..., in).
    A plain view, not a rearrange: the kernels' own 2-D calling convention, not a layout of the model."""
    y = matmul(x.reshape(-1, x.shape[-1]).contiguous())
    return y.view(*x.shape[:-1], y.shape[-1])
