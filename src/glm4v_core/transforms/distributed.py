"""Several processes, one model: sharding plans applied to a built GLM4V, on torch.distributed.

Nothing here is a second model: each function takes the ordinary one-process model and shards
its parameters in place with PyTorch's own tools (DTensor tensor-parallel styles, FSDP2
`fully_shard`, DDP). Collectives run on NCCL for CUDA and gloo for CPU.

Tensor parallelism (inference), degree tp:
- Decoder attention by KV group: rank r owns KV groups [r*G/tp, (r+1)*G/tp) and the query heads
  that read them (head h reads group h // (heads / groups), so they are also one contiguous
  block). The fused qkv rows [all q | all k | all v] are reordered to [q_0 k_0 v_0 | q_1 k_1 v_1 | ...]
  so that a plain column split gives each rank its own q, k and v; the output projection is split
  along its input (row-parallel) and all-reduced: one all-reduce per attention.
- Decoder MLP: gate_up rows [gate | up] reordered to [gate_0 up_0 | gate_1 up_1 | ...] (column
  parallel), down row-parallel: one all-reduce per MLP.
- Embedding and lm_head split along the vocabulary (the embedding sums its partial rows with an
  all-reduce; lm_head all-gathers the logits so every rank samples the same token).
- ViT: the same plan by heads (qkv [q | k | v], fc1 column / fc2 row) when its head count divides
  by tp; otherwise it is replicated, as are the projector, the norms and the patch embedding.
- The KV cache is per rank and holds only that rank's KV groups.
- Weight-only quantized layers (int8 / int4) follow the same plan, their packed weights split by
  hand (shard_quantized): DTensor's styles only split nn.Linear / nn.Embedding parameters.

Training: `fully_shard` (FSDP2) on every ViT and decoder block and then on the whole model, or
DDP; the loss and gradient checkpointing are the one-process code.

Launch: under `torchrun --nproc-per-node N` (the environment names the ranks), or `run_ranks`
starts the N processes itself (forked from a forkserver that imported torch once: the second run
of a process starts in a fraction of a second). Every collective has a timeout, and a rank that
raises ends the whole run with its error.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from glm4v_core.errors import REFUSED, GLM4VError
from glm4v_core.model.glm4v import GLM4V
from glm4v_core.model.ops import drop_packed_weights
from glm4v_core.transforms.quant import QuantLinear

COLLECTIVE_TIMEOUT = timedelta(seconds=120)  # a collective that waits longer fails the run (a peer died)


class DistributedError(GLM4VError):
    """A sharding that this model cannot take (degree vs heads), or a rank that failed."""


# --- process groups and launching ------------------------------------------------------------

def init(device_type: str | None = None, timeout: timedelta = COLLECTIVE_TIMEOUT) -> torch.device:
    """Join the process group named by the environment (torchrun's, or run_ranks'); returns this
    rank's device: its own GPU with NCCL for "cuda" (the default when there is CUDA), the CPU
    with gloo for "cpu"."""
    if not dist.is_initialized():
        device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timeout)
        # torchrun sets OMP_NUM_THREADS; spawned ranks share the cores
        if device_type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // dist.get_world_size()))
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank())))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def mesh(device: torch.device) -> DeviceMesh:
    """All ranks in one dimension (one tensor-parallel or one data-parallel group)."""
    return init_device_mesh(device.type, (dist.get_world_size(),))


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("WORLD_SIZE" in os.environ and "RANK" in os.environ)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, device_type: str | None = None,
              timeout: timedelta = COLLECTIVE_TIMEOUT) -> Any:
    """fn(*args) on every rank of a `world_size` group on `device_type` ("cuda": one GPU per rank,
    "cpu": gloo; default cuda when there is CUDA); returns rank 0's result.

    Under torchrun this process is already one rank: fn runs here. Otherwise world_size processes
    are started (on CPU: gloo) and this one waits; when any rank raises, the others are stopped
    and a DistributedError carries that rank's traceback (only its message for an input error: a
    ValueError, which every rank meets alike)."""
    if launched_by_torchrun():
        if int(os.environ["WORLD_SIZE"]) != world_size:
            raise DistributedError(f"torchrun started {os.environ['WORLD_SIZE']} ranks but {world_size} were asked for")
        init(device_type, timeout)
        try:
            return fn(*args)
        finally:
            dist.destroy_process_group()
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", __name__])  # the server imports once; each rank is a fork of it
    results, errors, received = ctx.SimpleQueue(), ctx.SimpleQueue(), ctx.Event()
    try:
        ranks = mp.start_processes(
            _spawned_rank, args=(world_size, free_port(), device_type, timeout, results, errors, received, fn, args),
            nprocs=world_size, join=False, start_method="forkserver")
        result = None
        while not ranks.join(timeout=0.1):  # raises as soon as any rank fails (and stops the others)
            if not received.is_set() and not results.empty():
                result = results.get()  # while rank 0 still lives: its tensors are shared, not copied
                received.set()
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        if not errors.empty():  # the first error reported is the cause: a peer's failure makes the others fail
            rank, trace, input_error = errors.get()
            if input_error:
                raise DistributedError(f"rank {rank} of {world_size}: {input_error}") from None
            raise DistributedError(f"rank {rank} of {world_size} failed:\n{trace}") from None
        raise DistributedError(f"rank {e.error_index} of {world_size} died: {e}") from None
    return result


def _spawned_rank(rank: int, world_size: int, port: int, device_type: str | None, timeout: timedelta,
                  results: Any, errors: Any, received: Any, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        init(device_type, timeout)
        result = fn(*args)
        if rank == 0:
            results.put(result)
            received.wait(timeout.total_seconds())
    except BaseException as e:
        errors.put((rank, traceback.format_exc(), str(e) if isinstance(e, REFUSED) else None))  # in failing order
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


# --- tensor parallelism (inference) ----------------------------------------------------------

def check_tp_degree(model: GLM4V, tp: int) -> None:
    """Each rank must own whole KV groups (and so whole query-head blocks), whole MLP halves and
    an equal slice of the vocabulary."""
    c = model.config
    for what, n in (("query heads (num_attention_heads)", c.num_heads),
                    ("KV groups (multi_query_group_num)", c.num_kv_groups),
                    ("MLP width (ffn_hidden_size)", c.ffn_hidden_size),
                    ("vocabulary (padded_vocab_size)", c.vocab_size)):
        if n % tp:
            raise DistributedError(f"tensor-parallel degree {tp} must divide the model's {what} = {n}")


def tensor_parallel(model: GLM4V, device_mesh: DeviceMesh) -> GLM4V:
    """Shard `model` (built and filled, identical on every rank) for inference, in place.

    No data moves between ranks: each takes its slice of its own copy. Afterwards model.config
    describes this rank's shard (num_heads, num_kv_groups: the local counts), which is what sizes
    its KV cache. A weight-only quantized model (int8 / int4 QuantLinear layers) is sharded the
    same way, its packed weights split by hand (see shard_quantized)."""
    tp = device_mesh.size()
    check_tp_degree(model, tp)
    drop_packed_weights(model)  # copies of whole weights, and the packed product takes no DTensor
    c = model.config
    for block in model.text.layers:
        attn = block.attn
        hd = attn.head_dim
        fused_blocks(attn.qkv, tp)
        fused_blocks(block.mlp.gate_up, tp)
        attn.num_heads, attn.num_kv = c.num_heads // tp, c.num_kv_groups // tp
        attn.q_size, attn.kv_size = attn.num_heads * hd, attn.num_kv * hd
        shard(block, device_mesh, {"attn.qkv": ColwiseParallel(), "attn.out": RowwiseParallel(),
                                   "mlp.gate_up": ColwiseParallel(), "mlp.down": RowwiseParallel()})
    v = c.vision  # None: a text-only GLM-4
    if v is not None and v.num_heads % tp == 0 and v.intermediate_size % tp == 0:  # else the ViT stays whole
        for block in model.vision.layers:
            fused_blocks(block.attn.qkv, tp)  # the ViT's head count comes from its q|k|v width
            shard(block, device_mesh, {"attn.qkv": ColwiseParallel(), "attn.out": RowwiseParallel(),
                                       "mlp.fc1": ColwiseParallel(), "mlp.fc2": RowwiseParallel()})
    shard(model.text, device_mesh, {"embed": RowwiseParallel(input_layouts=Replicate()),
                                    "lm_head": ColwiseParallel(output_layouts=Replicate())})
    model.config = dataclasses.replace(c, num_heads=c.num_heads // tp, num_kv_groups=c.num_kv_groups // tp)
    return model


def fused_blocks(linear: nn.Module, tp: int) -> None:
    """Reorder the output rows of a fused projection [part_0 | part_1 | ...] (sizes: its `parts`) to
    rank-major order [p0_r0 p1_r0 ... | p0_r1 p1_r1 ... | ...], so that an even column split hands
    rank r the r-th slice of every part (its own q, k and v; its own gate and up); `parts` then
    lists those slices. Every tensor of the layer has one row per output: weight and bias, or packed
    codes, scales, zeros and bias."""
    parts = list(linear.parts)
    for p in (*linear.parameters(recurse=False), *linear.buffers(recurse=False)):
        pieces = [part.chunk(tp) for part in p.data.split(parts)]  # [part][rank]
        p.data = torch.cat([piece for rank in range(tp) for piece in (part[rank] for part in pieces)])
    linear.parts = tuple(n // tp for n in parts) * tp


def shard(module: nn.Module, device_mesh: DeviceMesh, plan: dict) -> None:
    """Apply `plan` (submodule name -> ColwiseParallel / RowwiseParallel) to `module`'s children:
    DTensor's styles for float layers, shard_quantized for int8 / int4 ones."""
    plan = dict(plan)
    for name in [n for n in plan if isinstance(module.get_submodule(n), QuantLinear)]:
        module.set_submodule(name, shard_quantized(module.get_submodule(name), plan.pop(name), device_mesh, name))
    # src_data_rank=None: every rank holds the same weights, so each keeps its slice, no broadcast
    parallelize_module(module, device_mesh, plan, src_data_rank=None)
    for sub in module.modules():  # a slice can be a view that keeps the whole tensor alive
        for name, p in list(sub.named_parameters(recurse=False)):
            if isinstance(p, DTensor):
                local = p.to_local()
                if local.untyped_storage().nbytes() > local.numel() * local.element_size():
                    sub.register_parameter(name, nn.Parameter(
                        DTensor.from_local(local.clone(), p.device_mesh, p.placements, run_check=False),
                        requires_grad=p.requires_grad))


def shard_quantized(layer: QuantLinear, style: ColwiseParallel | RowwiseParallel, device_mesh: DeviceMesh,
                    name: str) -> nn.Module:
    """The plan's style for a weight-only quantized layer, whose weights are packed integer buffers
    that DTensor's styles do not split: this rank keeps plain slices of them and the collectives
    are the styles' own (functional all-reduce / all-gather), so activations flow as for float.

    Column-parallel: its output rows (codes, scales, zeros, bias all have one row per output).
    Row-parallel: its input columns; an int8 row's scale covers the whole row, so it stays, and
    int4 scales and zeros cover groups of `group_size` inputs, so the split must fall between
    groups: in_features / tp must be a multiple of the group size (else DistributedError)."""
    tp, rank = device_mesh.size(), device_mesh.get_local_rank()
    if isinstance(style, ColwiseParallel):
        for t in (*layer.buffers(recurse=False), *layer.parameters(recurse=False)):
            t.data = t.data.chunk(tp)[rank].clone()  # a copy: the whole tensor is freed
        layer.out_features //= tp
        if layer.parts is not None:  # fused_blocks listed every rank's slices: keep this rank's
            n = len(layer.parts) // tp
            layer.parts = layer.parts[rank * n:(rank + 1) * n]
        layer.prepare()
        return GatheredOutput(layer, device_mesh) if style.output_layouts[0].is_replicate() else layer
    local_in = layer.in_features // tp
    if layer.scheme == "int4" and local_in % layer.group_size:
        raise DistributedError(f"tensor-parallel degree {tp} splits the {layer.in_features} inputs of int4 layer "
                               f"{name} into {local_in} per rank, not whole groups of {layer.group_size}; quantize "
                               f"with a group size dividing {local_in}, or int8")
    for buffer, t in layer.named_buffers(recurse=False):
        if buffer != "weight_scale" or layer.scheme == "int4":  # (N, K) codes, (N, K/2) int4 pairs, (N, K/G) groups
            t.data = t.data.chunk(tp, dim=1)[rank].clone()
    layer.in_features = local_in
    bias, layer.bias = layer.bias, None  # added once, after the sum
    layer.prepare()
    return SummedOutput(layer, bias, device_mesh)


class SummedOutput(nn.Module):
    """A row-parallel quantized layer: the ranks' partial products summed by one all-reduce, then
    the bias."""

    def __init__(self, local: QuantLinear, bias: nn.Parameter | None, device_mesh: DeviceMesh):
        super().__init__()
        self.local, self.bias, self.device_mesh = local, bias, device_mesh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = funcol.wait_tensor(funcol.all_reduce(self.local(x), "sum", self.device_mesh))
        return y if self.bias is None else y + self.bias


class GatheredOutput(nn.Module):
    """A column-parallel quantized layer whose whole output every rank needs (lm_head: the logits)."""

    def __init__(self, local: QuantLinear, device_mesh: DeviceMesh):
        super().__init__()
        self.local, self.device_mesh = local, device_mesh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stacked = funcol.wait_tensor(funcol.all_gather_single(self.local(x), 0, self.device_mesh))  # ranks along dim 0
        return torch.cat(stacked.chunk(self.device_mesh.size()), dim=-1)  # rank r's columns r-th, as in the weight


# --- data parallelism (training) -------------------------------------------------------------

def fsdp(model: GLM4V, device_mesh: DeviceMesh) -> GLM4V:
    """FSDP2: every ViT and decoder block is one unit (its parameters gathered just before it
    runs, freed after), the rest (embeddings, projector, lm_head) the root unit. Gradients are
    averaged over ranks and left sharded (DTensor; `full_tensor()` gathers one)."""
    drop_packed_weights(model)  # inference-only copies of whole weights
    vision_blocks = () if model.vision is None else model.vision.layers  # None: a text-only GLM-4
    for block in (*vision_blocks, *model.text.layers):
        fully_shard(block, mesh=device_mesh)
    fully_shard(model, mesh=device_mesh)
    return model


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`whole` (e.g. read from a checkpoint, the same on every rank) laid out as `like`: this rank's
    shard when `like` is a DTensor (no communication: each rank slices its own copy)."""
    whole = whole.to(like.device)
    if isinstance(like, DTensor):
        return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)
    return whole


def ddp(model: GLM4V, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """Every rank keeps the whole model; gradients are all-reduced (averaged) in buckets."""
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

