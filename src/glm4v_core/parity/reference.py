"""Reference files: their cases, each case's inputs, and the checks that refuse a file made for
another model before anything is loaded.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from glm4v_conversion.files import parse_json, read_text
from glm4v_conversion.safetensors_io import MappedFiles, read_header
from glm4v_core.config import GLM4VConfig
from glm4v_core.errors import GLM4VError

REFERENCE_DTYPES = ("float32", "bfloat16")  # what a reference records (float16 is not compared)


def case_inputs(ref: dict[str, torch.Tensor], case: str) -> dict[str, torch.Tensor | None]:
    """The reference's inputs for one case: ids, optional pixels, padding mask and positions."""
    mask = ref.get(f"attention_mask_{case}")
    positions = ref.get(f"position_ids_in_{case}")
    if positions is None and mask is not None and f"pixel_values_{case}" not in ref:
        positions = ref.get(f"position_ids_{case}")  # text-only padded batch: inputs = outputs
    return {"input_ids": ref[f"input_ids_{case}"], "pixel_values": ref.get(f"pixel_values_{case}"),
            "attention_mask": mask, "position_ids": positions}


# A long prompt's reference holds the logits of its last N positions only: logits_<case>_last<N>.
LAST_LOGITS = re.compile(r"logits_(.+)_last(\d+)$")


def reference_cases(ref: dict[str, torch.Tensor]) -> list[str]:
    cases = set()
    for key in ref:
        if key.startswith("logits_") and not key.endswith("_bf16"):
            last = LAST_LOGITS.match(key)
            cases.add(last.group(1) if last else key[len("logits_"):])
    return sorted(cases)


def logits_key(ref: dict, case: str) -> tuple[str, int | None]:
    """The key of a case's reference logits, and how many last positions they cover (None: all)."""
    if f"logits_{case}" in ref:
        return f"logits_{case}", None
    for key in ref:
        last = LAST_LOGITS.match(key)
        if last and last.group(1) == case:
            return key, int(last.group(2))
    raise KeyError(case)


def recorded_in_bf16(meta: dict) -> bool:
    """A `glm4v make-reference --dtype bfloat16` recording (the fixtures record fp32 plus `*_bf16` tensors)."""
    return meta.get("dtype") == "bfloat16"


class ReferenceFileError(GLM4VError):
    """A --reference file that is not a parity reference, or one made for another model."""


def check_reference(ref_path: Path, config: GLM4VConfig) -> None:
    """Refuse a reference file that cannot be compared with this checkpoint, before loading either:
    not a safetensors file, no cases in it, or sizes (vocabulary, layers, widths, image size, token
    ids) that disagree with the checkpoint's config.json."""
    infos, _ = read_header(ref_path)  # regular file, valid header (else a CheckpointError naming it)
    meta_path = ref_path.with_suffix(".json")
    if meta_path.exists() or meta_path.is_symlink():
        meta = parse_json(read_text(meta_path, "reference metadata", ReferenceFileError), meta_path,
                          ReferenceFileError)
        if not isinstance(meta, dict):
            raise ReferenceFileError(f"{meta_path}: must hold a JSON object")
    cases = reference_cases(infos)
    if not cases:
        raise ReferenceFileError(f"{ref_path} is not a parity reference: it has no logits_<case> tensors "
                                 "(see tests/fixtures/tiny/reference.safetensors)")
    v = config.vision
    want = [("logits", -1, config.vocab_size, "padded_vocab_size"),
            ("hidden_states", -1, config.hidden_size, "hidden_size"),
            ("final_norm_out", -1, config.hidden_size, "hidden_size")]
    if v is not None:
        want += [("pixel_values", 1, v.in_channels, "vision_config.in_channels"),
                 ("pixel_values", 2, v.image_size, "vision_config.image_size"),
                 ("pixel_values", 3, v.image_size, "vision_config.image_size"),
                 ("vision_patch_embed", -1, v.hidden_size, "vision_config.hidden_size")]
    for case in cases:
        if v is None and f"pixel_values_{case}" in infos:
            raise ReferenceFileError(f"{ref_path}: case {case!r} has images (pixel_values_{case}), but this "
                                     "checkpoint is a text-only GLM-4 (no vision_config)")
        key, last = logits_key(infos, case)
        logits = infos[key]
        if last is not None and (len(logits.shape) != 3 or logits.shape[1] != last):
            raise ReferenceFileError(f"{ref_path}: {key} must hold (batch, {last}, vocab) logits, got "
                                     f"{list(logits.shape)}")
        ids = infos.get(f"input_ids_{case}")
        if ids is None or len(ids.shape) != 2 or ids.dtype.is_floating_point:
            raise ReferenceFileError(f"{ref_path}: case {case!r} needs an integer input_ids_{case} of shape (batch, "
                                     f"tokens), got {None if ids is None else list(ids.shape)}")
        for stage, dim, size, what in want:
            info = infos.get(key if stage == "logits" else f"{stage}_{case}")
            if info is None:
                continue
            rank_ok = len(info.shape) == 4 if stage == "pixel_values" else len(info.shape) > 0
            if not rank_ok or info.shape[dim] != size:
                raise ReferenceFileError(f"{ref_path} was made for another model: {stage}_{case} has shape "
                                         f"{list(info.shape)}, but this checkpoint's {what} is {size}")
        hidden = infos.get(f"hidden_states_{case}")  # embeddings + each layer; a recording may stop early
        if hidden is not None and not 1 <= hidden.shape[0] <= config.num_layers + 1:
            raise ReferenceFileError(f"{ref_path} was made for another model: hidden_states_{case} has shape "
                                     f"{list(hidden.shape)}, but this checkpoint has num_layers + 1 = "
                                     f"{config.num_layers + 1} hidden states")
        values = MappedFiles().tensor(ids)
        for token in (values.min(), values.max()) if ids.nbytes else ():
            if not 0 <= int(token) < config.vocab_size:
                raise ReferenceFileError(f"{ref_path} was made for another model: input_ids_{case} holds token id "
                                         f"{int(token)}, outside this checkpoint's vocabulary [0, {config.vocab_size})")


