"""What a fine-tuning run keeps on disk and reads back: checkpoints and the loss log (no pickle),
the rule for its output folder, its lock, and how signals stop it.

OUT/checkpoints/step-00000N/, each folder published atomically (written into a hidden sibling,
renamed when complete; a Ctrl-C, SIGTERM or SIGHUP during the write waits until it is done):
    trainable.safetensors   the trained tensors: LoRA adapters (glm4v_core.transforms.lora's adapter file) or,
                            for a full fine-tune, every trained parameter under its model name
    optimizer.safetensors   AdamW state as `<parameter name>.<exp_avg | exp_avg_sq | step>`
    rng.safetensors         torch RNG states `cpu` (and `cuda`): dropout continues where it stopped
    trainer.json            step, total steps, the run's arguments, the optimizer's param groups
OUT/loss.jsonl: one strict JSON line per step and per evaluation (a non-finite number is written
as the string "nan", "inf" or "-inf"); OUT/loss.png: its plot.
A killed write leaves only hidden names (leftovers lists them; the next run on OUT removes them),
never a half step-N folder; --keep-last deletes older step-N folders (prune_checkpoints), only
those holding exactly a checkpoint's files.

The rule for OUT (check_out, before anything is written, and again under the lock): OUT is a
folder or does not exist yet (not a file, not a dangling link), on a file system that stores
files, and this process may write in it and in the folder above it (where its lock file goes).
It holds none of a run's files (RUN_FILES) unless --resume continues the run kept in OUT itself.
Other files in OUT are allowed and never touched. While a run lives it holds OUT's lock
(glm4v_conversion.atomic.destination_lock, the converter's: `.OUT.lock` beside OUT, with its
pid), so a second run, or a glm4v-convert, on the same folder is refused, naming the process.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from glm4v_conversion.atomic import staged_file, staging
from glm4v_core.training.config import FinetuneConfig
from glm4v_core.training.resume import (
    ResumeError,
    check_groups,
    check_optimizer,
    check_rng,
    check_tensor,
    read_state,
    read_tensors,
)
from glm4v_core.transforms.adapter_files import atomic_save_file
from glm4v_core.transforms.dtensor import whole

try:
    import fcntl
except ImportError:  # not POSIX: no lock to probe (destination_lock takes none either)
    fcntl = None

CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer.json")
# Arguments that must not change on --resume: they shape the model, the data or the curve.
RESUME_FIXED = ("lora_rank", "lora_alpha", "lora_dropout", "lora_shared_fused", "train", "lr", "weight_decay",
                "warmup_steps", "schedule", "epochs", "max_steps", "batch_size", "grad_accum", "max_grad_norm",
                "dtype", "seed", "train_on", "max_length", "shuffle")


# What a run writes in OUT, and what each must be when a resumed run writes it again.
RUN_FILES = {"loss.jsonl": "file", "loss.png": "file", "checkpoints": "folder", "adapter.safetensors": "file",
             "adapter": "peft", "merged": "checkpoint", "model": "checkpoint"}  # adapter/: --adapter-format peft


def write_checkpoint(dst: Path, write_trained: Callable[[Path], None], optimizer: tuple[dict, list[dict]],
                     rng: dict[str, torch.Tensor], state: dict) -> Path:
    """Write one checkpoint folder atomically; `optimizer` is what optimizer_tensors returns."""
    with deferred_interrupt(), staging(dst) as tmp:
        write_trained(tmp / "trainable.safetensors")
        tensors, groups = optimizer
        atomic_save_file(tensors, tmp / "optimizer.safetensors", {"format": "glm4v-finetune"})
        atomic_save_file(rng, tmp / "rng.safetensors", {"format": "glm4v-finetune"})
        (tmp / "trainer.json").write_text(json.dumps({**state, "param_groups": groups}, indent=1) + "\n")
    return dst


Place = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (whole stored tensor, the tensor it fills) -> its value


def on_device(stored: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return stored.to(like.device)


def read_checkpoint(folder: Path, trained: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    names: list[str], place: Place = on_device) -> tuple[dict, dict[str, torch.Tensor]]:
    """Fill `trained` (name -> tensor, in place) and the optimizer from a checkpoint folder;
    returns (trainer.json's contents, the RNG states). `place` turns a stored (whole) tensor into
    the layout of the tensor it fills: moved to its device, or this rank's shard of it (FSDP).
    Everything is checked first (glm4v_core.training.resume): a damaged file is a ResumeError."""
    state = read_state(folder)
    groups = check_groups(folder / "trainer.json", state["param_groups"], optimizer)
    rng = read_tensors(folder / "rng.safetensors")
    check_rng(folder / "rng.safetensors", rng)
    path = folder / "optimizer.safetensors"
    tensors = read_tensors(path)
    params = [p for g in optimizer.param_groups for p in g["params"]]  # in `names` order
    check_optimizer(path, tensors, names, params)
    path = folder / "trainable.safetensors"
    try:
        f = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise ResumeError(f"{path} is not a readable safetensors file (truncated or replaced?): {e}") from None
    with f, torch.no_grad():
        stored = set(f.keys())
        if stored != set(trained):
            mismatched = sorted(stored ^ set(trained))
            raise ResumeError(f"{path}: trained tensors do not fit this run (e.g. {mismatched[:3]})")
        for name, t in trained.items():  # one at a time: a full fine-tune's tensors may be large
            try:
                value = f.get_tensor(name)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise ResumeError(f"{path}: tensor {name!r} cannot be read ({e})") from None
            check_tensor(path, name, value, t)
            t.copy_(place(value, t))
    load_optimizer(optimizer, names, tensors, groups, place)
    return state, rng


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict, list[dict]]:
    """AdamW state as {<param name>.<key>: whole tensor} plus the JSON-able param groups (no pickle)."""
    sd = optimizer.state_dict()
    tensors = {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"{names[index]}.{key}"] = whole(torch.as_tensor(value)).detach().cpu().contiguous()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer(optimizer: torch.optim.Optimizer, names: list[str], tensors: dict, groups: list[dict],
                   place: Place = on_device) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"]]  # in `names` order
    state = {}
    for index, name in enumerate(names):
        keys = {k[len(name) + 1:] for k in tensors if k.startswith(name + ".") and "." not in k[len(name) + 1:]}
        if keys:
            state[index] = {k: tensors[f"{name}.{k}"] if k == "step" else place(tensors[f"{name}.{k}"], params[index])
                            for k in keys}
    param_groups = [{**{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()},
                     "params": list(range(len(names)))} for g in groups]
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


class Stopped(BaseException):
    """SIGTERM or SIGHUP, raised where the program is (see stop_signals), so that `glm4v finetune`
    stops as on Ctrl-C: a checkpoint saved, exit status 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Stopped inside the block (once: later ones are ignored while the
    run saves). A signal ignored on entry stays ignored (nohup's SIGHUP)."""
    def stop(signum, frame):
        for s in names:
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(signum)

    names = [s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]
    try:
        saved = {s: signal.signal(s, stop) for s in names}
    except ValueError:  # not the main thread: signals cannot be caught here
        saved = {}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


DEFERRED = (signal.SIGINT, *STOP_SIGNALS)


class deferred_interrupt:
    """Hold a Ctrl-C (SIGINT), and a SIGTERM / SIGHUP that stop_signals turns into an exception,
    that arrives inside the block; deliver the first one when the block ends. An ignored signal
    stays ignored, and one left to its default action (it ends the process) is not held."""

    def __enter__(self):
        self.pending: int | None = None
        self.previous: dict[int, object] = {}
        for s in DEFERRED:
            current = signal.getsignal(s)
            if current in (signal.SIG_IGN, None) or (s != signal.SIGINT and not callable(current)):
                continue
            try:
                self.previous[s] = signal.signal(s, self._hold)
            except ValueError:  # not the main thread: signals cannot be caught here anyway
                break
        return self

    def _hold(self, signum, frame) -> None:
        if self.pending is None:
            self.pending = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if self.pending is not None and exc[0] is None:
            handler = self.previous[self.pending]
            if callable(handler):
                handler(self.pending, None)  # Python's SIGINT handler raises KeyboardInterrupt; stop_signals' Stopped
            elif self.pending == signal.SIGINT:
                raise KeyboardInterrupt
        return False


STEP_FOLDER = re.compile(r"step-(\d{6,})")
# What glm4v_conversion.atomic leaves when a run is killed while it writes (8 hex digits of a uuid):
# a staging or swapped-out folder `.<name>.partial-XXXXXXXX` / `.<name>.old-XXXXXXXX`, a staged
# file `.<name>.XXXXXXXX.tmp`.
STAGED_FOLDER = re.compile(r"\.(.+)\.(?:partial|old)-[0-9a-f]{8}")
STAGED_FILE = re.compile(r"\.(.+)\.[0-9a-f]{8}\.tmp")


def checkpoint_folders(out: Path) -> dict[int, Path]:
    """OUT/checkpoints/step-N folders by step, oldest first (numeric: step-1000000 after step-999999)."""
    root = out / "checkpoints"
    found = {}
    for path in root.iterdir() if root.is_dir() else ():
        match = STEP_FOLDER.fullmatch(path.name)
        if match and path.is_dir():
            found[int(match[1])] = path
    return dict(sorted(found.items()))


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoint_folders(out)
    return found[max(found)] if found else None


def is_run_checkpoint(folder: Path) -> bool:
    """A folder exactly as write_checkpoint publishes it: a real folder of its files, nothing else."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    entries = list(folder.iterdir())
    return (folder / "trainer.json").is_file() and all(
        e.name in CHECKPOINT_FILES and e.is_file() and not e.is_symlink() for e in entries)


def prune_checkpoints(out: Path, keep: int, newest: int) -> list[Path]:
    """--keep-last: delete this run's checkpoints up to step `newest` (complete, just written)
    beyond the `keep` newest. A folder holding anything but a checkpoint's files is not ours to
    delete; later steps (an abandoned curve after a resume) are rewritten by the run, not deleted.
    Each folder is renamed to a hidden `.old-` name first, so a failed delete never leaves a
    half-deleted step-N for --resume to pick (the next run removes it as a leftover)."""
    ours = [p for step, p in checkpoint_folders(out).items() if step <= newest and is_run_checkpoint(p)]
    doomed = ours[:-keep]
    for path in doomed:
        hidden = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(path, hidden)
        shutil.rmtree(hidden)
    return doomed


def leftovers(out: Path) -> list[Path]:
    """The hidden files and folders a killed run's atomic writes left in OUT: unfinished
    checkpoint folders in OUT/checkpoints, staged files of the log, the plot and the adapters, an
    unfinished merged/ or model/. Only our exact names holding only what we write there; read-only."""
    found = []
    root = out / "checkpoints"
    for path in sorted(root.iterdir()) if root.is_dir() and not root.is_symlink() else ():
        match = STAGED_FOLDER.fullmatch(path.name)
        if match and STEP_FOLDER.fullmatch(match[1]) and _only_files(path, CHECKPOINT_FILES):
            found.append(path)
    for path in sorted(out.iterdir()) if out.is_dir() else ():
        folder, file = STAGED_FOLDER.fullmatch(path.name), STAGED_FILE.fullmatch(path.name)
        if folder and RUN_FILES.get(folder[1]) in ("checkpoint", "peft") and _only_files(path):
            found.append(path)
        elif file and RUN_FILES.get(file[1]) == "file" and path.is_file() and not path.is_symlink():
            found.append(path)
    return found


def _only_files(folder: Path, names: tuple[str, ...] | None = None) -> bool:
    """A real folder of regular files only (of `names`, or their staged temporaries, if given)."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    for entry in folder.iterdir():
        staged = STAGED_FILE.fullmatch(entry.name)
        name = staged[1] if staged else entry.name
        if entry.is_symlink() or not entry.is_file() or (names is not None and name not in names):
            return False
    return True


def find_resume(path: Path) -> Path:
    """An output folder (its latest checkpoint) or a checkpoint folder itself."""
    folder = path if (path / "trainer.json").is_file() else latest_checkpoint(path)
    if folder is None:
        unfinished = [p.name for p in leftovers(path) if p.parent.name == "checkpoints"]
        killed = f" (only {', '.join(unfinished)}: the unfinished write of a run that was killed)" if unfinished else ""
        raise ResumeError(f"--resume {path}: no checkpoint there{killed} (expected {path}/checkpoints/step-N "
                          "or a folder holding trainer.json)")
    missing = [f for f in CHECKPOINT_FILES if not (folder / f).is_file()]
    if missing:
        raise ResumeError(f"--resume: checkpoint {folder} is incomplete, missing {missing}")
    return folder


def check_resume_args(folder: Path, args: FinetuneConfig) -> None:
    saved = read_state(folder)["args"]
    changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {getattr(args, k)!r}" for k in RESUME_FIXED
               if saved.get(k) != getattr(args, k)]
    adapter = None if getattr(args, "adapter", None) is None else str(args.adapter)  # saved as its path
    if saved.get("adapter") != adapter:
        changed.append(f"--adapter {saved.get('adapter')!r} -> {adapter!r}")
    if changed:
        raise ResumeError(f"--resume {folder}: these arguments differ from the interrupted run, so the "
                            f"curve could not continue: {', '.join(changed)}")


def json_line(record: dict) -> str:
    """One strict JSON line: a non-finite float becomes the string "nan", "inf" or "-inf"."""
    def strict(v):
        if not isinstance(v, float) or math.isfinite(v):
            return v
        return "nan" if math.isnan(v) else "inf" if v > 0 else "-inf"
    return json.dumps({k: strict(v) for k, v in record.items()}, allow_nan=False) + "\n"


NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def keep_log_until(source: Path, dst: Path, step: int) -> None:
    """dst's log = source's lines up to `step` (a resumed run drops what came after its checkpoint;
    resumed into a new folder, it starts from the old folder's lines)."""
    lines = []
    if step > 0 and source.exists():
        lines = [line for line in source.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    with staged_file(dst) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))


def read_log(path: Path) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of a loss.jsonl; "nan" / "inf" / "-inf" read as floats."""
    records = [{k: NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in json.loads(line).items()}
               for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]


def plot_loss(log: Path, png: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed, so no {png.name}; the curve is in {log}", file=sys.stderr)
        return None
    train, evals = read_log(log)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over counted tokens)")
    ax.legend()
    with staged_file(png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")  # the temporary's name says nothing of the format
        plt.close(fig)
    return png
