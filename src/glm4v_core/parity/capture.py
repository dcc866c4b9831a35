"""Capturing a reference model's tensors for `glm4v make-reference`: forward hooks, disk spill.

The module names are those of the GLM-4V HF remote code (THUDM/glm-4v-9b modeling_chatglm.py and
visual.py); `Hooks` reads what those modules return and never changes it. Captures are written
to disk as they come (`SpillWriter`) and streamed into one safetensors file at the end.
No transformers here: the model is any torch module with that tree.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from glm4v_conversion.safetensors_io import write_file
from glm4v_core.errors import GLM4VError


class CaptureError(GLM4VError):
    """A problem with make-reference's arguments, the checkpoint's remote code, or the machine."""


# Reference module -> recorded tensor (without the case suffix); the module names of the real
# GLM-4V remote code (THUDM/glm-4v-9b). The decoder layers and the rotary rows are hooked apart.
VISION_HOOKS = {
    "transformer.vision.patch_embedding": "vision_patch_embed",
    "transformer.vision.transformer": "vision_vit_out",
    "transformer.vision.conv": "vision_conv_out",
    "transformer.vision.linear_proj": "vision_glu_out",
    "transformer.vision": "image_embeds",
}
VISION_OUT = "transformer.vision"
LAYERS = "transformer.encoder.layers"
FINAL_NORM = "transformer.encoder.final_layernorm"
ROTARY = "transformer.rotary_pos_emb"
ENCODER = "transformer.encoder"


class Hooks:
    """Forward hooks on the reference's modules for one prefill; each capture goes straight to disk.

    hidden_states_<case> (n_layers + 1, T, H): the first decoder layer's input (the spliced
    embeddings), then each layer's output; position ids: the rows of the rotary table the decoder
    received, matched back to their row numbers in the table the reference built."""

    def __init__(self, model, case: str, spill: SpillWriter, n_layers: int, with_image: bool):
        self.case, self.spill, self.n_layers = case, spill, n_layers
        self.handles, self.seen, self.expected = [], set(), []
        self.table = self.rows = None
        modules = dict(model.named_modules())
        names = [*(VISION_HOOKS if with_image else ()), LAYERS, FINAL_NORM, ROTARY, ENCODER]
        missing = [n for n in names if n not in modules]
        if missing:
            raise CaptureError(f"the reference model has no module(s) {missing}: make-reference expects the module "
                                 "tree of the GLM-4V remote code (THUDM/glm-4v-9b modeling_chatglm.py / visual.py)")
        if with_image:
            for name, stored in VISION_HOOKS.items():
                self.on_output(modules[name], name, lambda out, stored=stored: self.store(stored, out))
        layers = modules[LAYERS]
        if n_layers > 0:
            self.expected.append("embeddings")
            self.handles.append(layers[0].register_forward_pre_hook(self.embeddings, with_kwargs=True))
        for i in range(n_layers):  # a layer returns (hidden_states, kv_cache)
            self.on_output(layers[i], f"{LAYERS}.{i}",
                           lambda out: self.spill.append(f"hidden_states_{case}", out[0][0]))
        self.on_output(modules[FINAL_NORM], FINAL_NORM, lambda out: self.store("final_norm_out", out))
        self.on_output(modules[ROTARY], ROTARY, lambda out: setattr(self, "table", out))
        self.handles.append(modules[ENCODER].register_forward_pre_hook(self.rotary_rows, with_kwargs=True))

    def on_output(self, module, name: str, take) -> None:
        def hook(_module, _args, output):
            self.seen.add(name)
            take(output)
        self.expected.append(name)
        self.handles.append(module.register_forward_hook(hook))

    def store(self, stored: str, tensor: torch.Tensor) -> None:
        self.spill.add(f"{stored}_{self.case}", tensor)

    def embeddings(self, _module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.spill.append(f"hidden_states_{self.case}", hidden[0])
        self.seen.add("embeddings")

    def rotary_rows(self, _module, args, kwargs):
        self.rows = kwargs["rotary_pos_emb"] if "rotary_pos_emb" in kwargs else args[2]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def check(self) -> None:
        """Every hooked module ran: otherwise the remote code's forward differs from what we record."""
        missed = [n for n in self.expected if n not in self.seen]
        if self.table is None or self.rows is None:
            missed.append(ROTARY)
        if missed:
            raise CaptureError(f"the reference's forward did not run module(s) {missed}: its code differs from "
                                 "the GLM-4V remote code make-reference was written for")

    def position_ids(self) -> torch.Tensor:
        """(1, T): the index of each rotary row the decoder received in the reference's own table."""
        return rows_to_positions(self.table, self.rows[0])[None]


def rows_to_positions(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """table (S, ...) and rows (T, ...) -> (T,) int64 with table[result[t]] == rows[t] exactly."""
    flat = table.detach().reshape(table.shape[0], -1).cpu().contiguous().view(torch.uint8)
    index: dict[bytes, int] = {}
    for p, row in enumerate(flat):
        index.setdefault(row.numpy().tobytes(), p)  # the first row wins: the table starts at position 0
    want = rows.detach().reshape(rows.shape[0], -1).cpu().contiguous().view(torch.uint8)
    positions = [index.get(row.numpy().tobytes(), -1) for row in want]
    if -1 in positions:
        raise CaptureError("a rotary row the reference's decoder received is not in its rotary table: cannot "
                             "recover its position ids")
    return torch.tensor(positions, dtype=torch.long)


class SpillWriter:
    """Captured tensors go to raw files as they come (fp32, or int64 for integers), so memory holds
    one capture at a time; `finish` streams them into one safetensors file."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True)
        self.layout: dict[str, tuple[torch.dtype, list[int], Path]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.layout:
            raise CaptureError(f"tensor {name} captured twice: the reference ran a hooked module more than once")
        self.append(name, tensor, stack=False)

    def append(self, name: str, tensor: torch.Tensor, stack: bool = True) -> None:
        """Write `tensor`; with stack=True, add it as the next entry of a stacked tensor `name`."""
        t = tensor.detach()
        t = (t.long() if not t.is_floating_point() else t.float()).cpu().contiguous()
        if name not in self.layout:
            path = self.folder / f"{len(self.layout)}.bin"
            self.layout[name] = (t.dtype, [0, *t.shape] if stack else list(t.shape), path)
        dtype, shape, path = self.layout[name]
        if stack:
            if list(t.shape) != shape[1:]:
                raise CaptureError(f"{name}: entry of shape {list(t.shape)} after entries of shape {shape[1:]}")
            shape[0] += 1
        with open(path, "ab") as f:
            f.write(memoryview(t.view(torch.uint8).numpy()))  # no extra copy of a large capture

    def read(self, name: str) -> torch.Tensor:
        """A tensor written so far, memory-mapped from its spill file."""
        dtype, shape, file = self.layout[name]
        return torch.from_file(str(file), shared=False, size=math.prod(shape), dtype=dtype).view(shape)

    def describe(self) -> dict:
        return {name: {"shape": shape, "dtype": str(dtype).removeprefix("torch.")}
                for name, (dtype, shape, _) in self.layout.items()}

    def finish(self, path: Path, metadata: dict[str, str]) -> None:
        write_file(path, {name: self.read(name) for name in self.layout}, metadata)
