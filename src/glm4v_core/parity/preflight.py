"""What `glm4v make-reference` checks before it runs anything of the checkpoint: consent and the
auto_map rules for its remote code, the --out destination (only a reference is ever replaced) and its
lock, and the memory and disk space the recording needs.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import torch

from glm4v_conversion.atomic import DestinationBusyError, check_free_space, destination_lock, free_space
from glm4v_conversion.errors import ConversionError
from glm4v_conversion.files import file_kind, os_reason, parse_json, read_text
from glm4v_conversion.safetensors_io import list_tensors, read_header
from glm4v_core.config import GLM4VConfig
from glm4v_core.parity.capture import CaptureError

GENERATOR = "glm4v make-reference"  # in reference.json and in reference.safetensors' metadata: what --overwrite trusts
REFERENCE_FILES = ("reference.safetensors", "reference.json")
GiB = 1024 ** 3


@contextlib.contextmanager
def writer_lock(out: Path) -> Iterator[None]:
    """glm4v_conversion.atomic.destination_lock, its refusal worded for whichever glm4v writer holds `out`."""
    lock = destination_lock(out)
    try:
        lock.__enter__()
    except DestinationBusyError as e:  # the lock is shared by every glm4v writer, not only glm4v-convert
        raise CaptureError(f"{out} is being written by another glm4v-convert or make-reference (pid {e.owner}; "
                           f"lock file {e.lock}); wait for it to finish") from None
    except ConversionError as e:
        raise CaptureError(str(e)) from None
    with contextlib.ExitStack() as stack:
        stack.push(lock)
        yield


def check_out(out: Path, overwrite: bool) -> None:
    """`out` may be absent, or (with overwrite) an empty folder or one make-reference wrote; refused otherwise.

    Never written through: a file, FIFO, device, socket or symlink at `out` is refused whatever
    `overwrite` says, and a folder holding anything else (the user's files, a reference of another
    tool) is refused by name, so --overwrite cannot delete what make-reference did not make."""
    if out.name in ("", ".", ".."):
        raise CaptureError(f"--out {str(out)!r} must name the folder to create (for example --out ref)")
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return
    except OSError as e:
        raise CaptureError(f"--out {out} {os_reason(e)}") from None
    if stat.S_ISLNK(st.st_mode):
        raise CaptureError(f"--out {out} is a symbolic link (to {os.readlink(out)}): make-reference does not write "
                           "through links; give the folder's own path, or a new one")
    if not stat.S_ISDIR(st.st_mode):
        raise CaptureError(f"--out {out} is {file_kind(st.st_mode)}, not a folder: --out names the folder "
                           "make-reference creates (reference.safetensors + reference.json); give a new path")
    try:
        entries = sorted(os.listdir(out))
    except OSError as e:
        raise CaptureError(f"--out {out} {os_reason(e)}") from None
    if entries:
        problem = not_a_reference(out, entries)
        if problem:
            raise CaptureError(f"--out {out} exists and is not a reference made by make-reference ({problem}); "
                               "--overwrite replaces only such a folder (reference.safetensors + reference.json, "
                               "nothing else) or an empty one: give another --out, or move those files away")
    if not overwrite:
        what = "already holds a reference made by make-reference" if entries else "exists (an empty folder)"
        raise CaptureError(f"--out {out} {what}; pass --overwrite to replace it")


def not_a_reference(out: Path, entries: list[str]) -> str | None:
    """Why the folder `out` (holding `entries`) is not what make-reference writes, or None if it is."""
    others = [e for e in entries if e not in REFERENCE_FILES]
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        return f"it holds {shown}"
    for name in REFERENCE_FILES:
        if name not in entries:
            return f"no {name}"
        mode = os.lstat(out / name).st_mode
        if not stat.S_ISREG(mode):
            return f"its {name} is {'a symbolic link' if stat.S_ISLNK(mode) else file_kind(mode)}"
    try:
        meta = parse_json(read_text(out / "reference.json", "reference.json", CaptureError), out / "reference.json",
                          CaptureError)
        _, metadata = read_header(out / "reference.safetensors")
    except (CaptureError, ConversionError) as e:
        return f"it cannot be read as a make-reference output: {e}"
    if not isinstance(meta, dict) or meta.get("generator") != GENERATOR:
        return "its reference.json was not written by make-reference (no \"generator\": \"glm4v make-reference\")"
    if metadata.get("generator") != GENERATOR:
        return "its reference.safetensors was not written by make-reference (its metadata names no such generator)"
    return None


RELATIVE_IMPORTS = (re.compile(r"^\s*import\s+\.(\S+)\s*$", re.MULTILINE),  # transformers' own patterns
                    re.compile(r"^\s*from\s+\.(\S+)\s+import", re.MULTILINE))


def remote_code_files(checkpoint: Path, raw_config: dict) -> list[Path]:
    """The Python files of `checkpoint` that loading it through transformers runs: the modules its
    config.json's auto_map names, then the files they import relatively (as transformers follows them).

    Each auto_map entry must be `module.Class` with `module.py` a regular file of the folder itself:
    another repository's code (`org/repo--module.Class`), a path (`../x.Class`, `/abs/x.Class`), a
    link out of the folder or a missing file is refused, naming the entry."""
    where = checkpoint / "config.json"
    auto_map = raw_config.get("auto_map")
    if not isinstance(auto_map, dict) or "AutoModelForCausalLM" not in auto_map:
        raise CaptureError(f"{where} has no auto_map.AutoModelForCausalLM: this folder does not ship the HF remote "
                           "code (modeling_chatglm.py) that make-reference runs")
    queue = []
    for key, value in auto_map.items():
        for ref in value if isinstance(value, list) else [value]:  # a tokenizer's entry is [slow, fast]
            if ref is not None or not isinstance(value, list):
                queue.append((auto_module(where, key, ref), f"{where} auto_map.{key} = {ref!r}"))
    files: dict[str, Path] = {}
    while queue:
        module, named_by = queue.pop(0)
        if module in files:
            continue
        files[module] = path = module_file(checkpoint, module, named_by)
        text = read_text(path, "remote code file", CaptureError)
        for pattern in RELATIVE_IMPORTS:
            for imported in pattern.findall(text):
                if not imported.isidentifier():
                    raise CaptureError(f"{path} imports .{imported}, outside the folder {checkpoint} (or not a "
                                       "module file of it): make-reference runs only code of the checkpoint folder "
                                       "itself (relative imports as 'from .module import ...')")
                queue.append((imported, f"{path} (from .{imported} import ...)"))
    return list(files.values())


def auto_module(where: Path, key: str, ref) -> str:
    """The module of one auto_map entry `module.Class`, refusing anything that is not a module of the folder."""
    entry = f"{where} auto_map.{key} = {ref!r}"
    accepted = "accepted: 'module.Class' with module.py a file of the checkpoint folder"
    if not isinstance(ref, str):
        raise CaptureError(f"{entry} is not a 'module.Class' string; {accepted}")
    if "--" in ref:
        raise CaptureError(f"{entry} names code in another repository ({ref.split('--')[0]}): make-reference runs "
                           f"only the code shipped in the checkpoint folder; copy it in and name it; {accepted}")
    if "/" in ref or "\\" in ref or ref.startswith(".") or os.path.isabs(ref):
        raise CaptureError(f"{entry} points outside the checkpoint folder; {accepted}")
    module, _, name = ref.rpartition(".")
    if not (module.isidentifier() and name.isidentifier()):
        raise CaptureError(f"{entry} is not 'module.Class'; {accepted}")
    return module


def module_file(checkpoint: Path, module: str, named_by: str) -> Path:
    """CHECKPOINT/module.py, a regular file inside the folder (a link is followed, and must stay inside)."""
    path = checkpoint / f"{module}.py"
    if not (path.exists() or path.is_symlink()):
        raise CaptureError(f"{named_by} needs {path.name}, which is not in {checkpoint}: the folder must ship the "
                           "remote code it names")
    if path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(checkpoint.resolve()):
            raise CaptureError(f"{named_by} needs {path.name}, a link to {target}, outside {checkpoint}: "
                               "make-reference runs only code of the checkpoint folder itself")
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise CaptureError(f"{named_by} needs {path} {os_reason(e)}") from None
    if not stat.S_ISREG(mode):
        raise CaptureError(f"{named_by} needs {path}, which is {file_kind(mode)}, not a Python file")
    return path


def memory_report(checkpoint: Path, config: GLM4VConfig, dtype: torch.dtype, device: str,
                  inputs: dict, force: bool, with_bf16: bool = False) -> str:
    """What the run needs, said before loading; an error if clearly more than the machine has."""
    n_params = sum(math.prod(info.shape) for info in list_tensors(checkpoint).values())
    weights = n_params * dtype.itemsize
    longest = max(spliced_length(ids, px, config) for ids, px in inputs.values())
    v = config.vision  # None for a text-only GLM-4: no ViT
    # the largest transients: the logits of every prompt position (kept in fp32 too), the ViT's
    # attention scores if the reference's SDPA falls back to its math path, one MLP activation
    activations = (longest * config.vocab_size * (dtype.itemsize + 4)
                   + (v.num_heads * v.num_positions ** 2 * dtype.itemsize if v is not None else 0)
                   + longest * 2 * config.ffn_hidden_size * dtype.itemsize)
    need = weights + activations
    lines = [f"make-reference: {count(n_params)} parameters in {str(dtype).removeprefix('torch.')}: "
             f"{size(weights)} of weights + ~{size(activations)} of activations (longest prompt {longest} positions)"]
    if dtype == torch.float32:
        lines.append(f"  (--dtype bfloat16 halves the weights to {size(n_params * 2)}; parity shows the errors of a "
                     "bf16 recording but judges fp32 ones)")
    if device == "cpu" and (dtype == torch.bfloat16 or with_bf16) and n_params > 1e9:
        lines.append("  warning: bf16 on the CPU runs ATen's own bf16 matmuls (oneDNN off, as bit-exact bf16 parity "
                     "needs), orders of magnitude slower than fp32 on most CPUs: use --device cuda for bf16")
    cpu = available_cpu_memory()
    # transformers without accelerate builds the model in CPU memory before .to(device)
    lines.append(f"  CPU memory available: {size(cpu)}" if cpu else "  CPU memory available: unknown")
    short = cpu is not None and weights + (0 if device.startswith("cuda") else activations) > cpu
    if device.startswith("cuda"):
        free = torch.cuda.mem_get_info(torch.device(device))[0]
        lines.append(f"  {device} memory free: {size(free)}")
        short = short or need > free
    if short and not force:
        raise CaptureError("\n".join(lines) + "\nnot enough memory for this run: use --dtype bfloat16, another "
                             "--device, or --force to try anyway")
    return "\n".join(lines)


def spliced_length(ids: torch.Tensor, pixels: torch.Tensor | None, config: GLM4VConfig) -> int:
    """Positions of one case in the reference's decoder: an image's boi, placeholder, eoi (3 tokens)
    become boi, its image tokens, eoi."""
    return ids.shape[1] - 3 + config.vision.num_image_tokens + 2 if pixels is not None else ids.shape[1]


HEADER_BYTES_PER_TENSOR = 160  # its name, dtype, shape and offsets in the safetensors header (generous)


def reference_bytes(config: GLM4VConfig, inputs: dict, n_layers: int, max_new_tokens: int, with_bf16: bool) -> int:
    """The size of the reference.safetensors a recording writes, from the config and each case's
    (input ids, pixels): what record_case and capture.Hooks store, floats as fp32, integers as int64
    (config.vision is read only for a case with pixels: a text-only checkpoint has none)."""
    H, V, N, v = config.hidden_size, config.vocab_size, max_new_tokens, config.vision
    total = 1024  # the header's metadata and padding
    for ids, pixels in inputs.values():
        L, T = ids.shape[1], spliced_length(ids, pixels, config)
        floats = (n_layers + 1) * T * H if n_layers else 0  # hidden states: the embeddings, then each layer
        floats += T * H + T * V + N * V  # final norm, prompt logits, each greedy step's logits
        ints, tensors = L + T + N, 6 + (n_layers > 0)  # input ids, position ids, greedy tokens
        if pixels is not None:  # pixels, patch embeddings and ViT output, conv and GLU outputs, image embeddings
            floats += pixels.numel() + 2 * v.num_positions * v.hidden_size + 2 * v.num_image_tokens * H
            floats += (v.num_image_tokens + 2) * H
            tensors += 6
        if with_bf16:  # its logits, image embeddings and greedy tokens
            floats += T * V + ((v.num_image_tokens + 2) * H if pixels is not None else 0)
            ints, tensors = ints + N, tensors + 2 + (pixels is not None)
        total += 4 * floats + 8 * ints + HEADER_BYTES_PER_TENSOR * tensors
    return total


def disk_report(out: Path, config: GLM4VConfig, inputs: dict, n_layers: int, max_new_tokens: int,
                with_bf16: bool, force: bool) -> str:
    """The disk space the recording needs beside `out`, said before loading; an error if the file
    system has less free (unless `force`). At the end the capture spill and the final file exist
    together, so the peak is twice the file, plus reference.json (an indented line per token id)."""
    final = reference_bytes(config, inputs, n_layers, max_new_tokens, with_bf16)
    tokens = sum(ids.shape[1] + 2 * max_new_tokens for ids, _ in inputs.values())
    peak = 2 * final + 16 * tokens + 4096
    if not force:
        check_free_space(out, peak, "the recording (reference.safetensors, and the capture spill until it is "
                         "written)", CaptureError, "fewer or shorter cases, --layers N, a smaller "
                         "--max-new-tokens, another --out, or --force to try anyway")
    place, free = free_space(out)
    return f"  disk: ~{size(final)} of reference.safetensors, ~{size(peak)} at the peak; {size(free)} free in {place}"


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def size(nbytes: int) -> str:
    return f"{nbytes / GiB:.1f} GiB" if nbytes >= GiB else f"{nbytes / 2 ** 20:.1f} MiB"


def available_cpu_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


