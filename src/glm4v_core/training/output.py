"""The output folder of `glm4v finetune`: checked completely before anything is written (a previous
run's files are refused unless --resume continues them; other files are never touched), with room
for what the run will write, and held with the destination lock for the whole run; under the lock,
what a killed run's unfinished writes left there is removed.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch.distributed as dist

from glm4v_conversion.atomic import (
    DestinationBusyError,
    destination_lock,
    free_space,
    lock_file,
    lock_owner,
    unwritable_file_system,
)
from glm4v_conversion.errors import ConversionError
from glm4v_conversion.files import human_size
from glm4v_core.training.config import FinetuneConfig, FinetuneError
from glm4v_core.training.state import RUN_FILES, latest_checkpoint, leftovers


def check_out(a: FinetuneConfig, resume_dir: Path | None, probe_lock: bool = True) -> None:
    """The rule for --out (this module's docstring), read-only: nothing is created or changed.
    `resume_dir` is the checkpoint --resume names (find_resume), if any."""
    out = a.out
    if out.is_symlink() and not out.exists():
        raise FinetuneError(f"--out {out} is a dangling symbolic link (to {os.readlink(out)}); point it at a folder "
                            "or choose another --out")
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--out {out} is a file, not a folder; choose a folder (a new one, or one without a "
                            "previous run's files)")
    try:
        target = out.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise FinetuneError(f"--out {out} cannot be resolved: {e}") from None
    if target.name == "":
        raise FinetuneError(f"--out {out} is the root folder; name a folder inside it")
    place = target.parent
    while not place.exists():
        place = place.parent
    if not place.is_dir():
        raise FinetuneError(f"--out {out}: {place} is a file, so it cannot hold the output folder")
    reason = unwritable_file_system(target)
    if reason is not None:
        raise FinetuneError(f"--out {out} cannot be written: {reason}")
    for folder in (place, target) if target.exists() else (place,):
        if not os.access(folder, os.W_OK | os.X_OK):
            raise FinetuneError(f"--out {out}: no permission to write in {folder} (the run writes OUT and its lock "
                                "file beside it)")
    if probe_lock:
        holder = lock_holder(target)
        if holder is not None:
            raise FinetuneError(in_use(out, holder))
    found = [n for n in RUN_FILES if (target / n).exists() or (target / n).is_symlink()] if target.exists() else []
    names = ", ".join(f"{n}/" if (target / n).is_dir() else n for n in found)
    continues = resume_dir is not None and resume_dir.resolve().parent.parent == target
    if found and not continues:
        if resume_dir is not None:
            raise FinetuneError(f"--out {out} holds another run's files ({names}), and --resume {a.resume} continues "
                                f"the run in {resume_dir.parent.parent}: resume into that folder, or into an --out "
                                "without a previous run's files (nothing was changed)")
        hint = (f"continue it with --resume {out}" if latest_checkpoint(target) is not None
                else "it has no checkpoint to resume")
        raise FinetuneError(f"--out {out} already holds a previous run's files ({names}); {hint}, or choose another "
                            "--out (nothing was changed)")
    writes = {"loss.jsonl", "loss.png", "checkpoints"}
    adapters = "adapter" if getattr(a, "adapter_format", "glm4v") == "peft" else "adapter.safetensors"
    writes |= {adapters} if a.lora_rank > 0 else {"model"}
    writes |= {"merged"} if a.save_merged else set()
    for name in found:
        path, kind = target / name, RUN_FILES[name]
        if name not in writes:
            continue
        if kind == "file":
            fits = path.is_file()
        else:
            mark = "adapter_config.json" if kind == "peft" else "config.json"  # what the folder it replaces holds
            fits = path.is_dir() and (kind == "folder" or (path / mark).exists() or not any(path.iterdir()))
        if not fits:
            what = {"file": "a file", "folder": "a folder", "checkpoint": "a checkpoint folder (with config.json)",
                    "peft": "a PEFT adapter folder (with adapter_config.json)"}
            raise FinetuneError(f"--out {out}: {path} is not what this run writes there ({what[kind]}); move it "
                                "away, then resume (nothing was changed)")


def lock_holder(target: Path) -> str | None:
    """Who holds `target`'s destination lock ("pid N: its command line"), or None; reads only."""
    owner = lock_owner(target)
    return None if owner is None else describe_process(owner)


def describe_process(pid: str) -> str:
    """"pid N: its command line" (Linux), or "pid N"."""
    pid = pid or "unknown"
    try:
        argv = Path(f"/proc/{int(pid)}/cmdline").read_bytes().split(b"\0")
        command = " ".join(a.decode(errors="replace") for a in argv if a)
    except (OSError, ValueError):
        command = ""
    if len(command) > 120:
        command = command[:117] + "..."
    return f"pid {pid}: {command}" if command else f"pid {pid}"


def in_use(out: Path, holder: str) -> str:
    return (f"--out {out} is in use by another process ({holder}), which holds its lock "
            f"{lock_file(out.resolve())}: one run writes to a folder at a time; wait for it to finish, or choose "
            "another --out")


@contextmanager
def out_lock(out: Path) -> Iterator[None]:
    """Hold --out's destination lock (the converter's) for the block; FinetuneError if another
    process holds it (naming it) or the place cannot be written."""
    target = out.resolve()
    with ExitStack() as stack:
        try:
            stack.enter_context(destination_lock(target))
        except DestinationBusyError as e:
            raise FinetuneError(in_use(out, describe_process(e.owner))) from None
        except ConversionError as e:
            raise FinetuneError(f"--out {out}: {e}") from None
        yield




def check_free_space(out: Path, needed: int, what: str) -> None:
    """Refuse a run whose files (`needed` bytes, made of `what`) do not fit the free space of the
    file system OUT is on, before the first step rather than at a checkpoint hours in."""
    place, free = free_space(out)  # OUT itself may not exist yet: the nearest folder above it
    if free < needed:
        raise FinetuneError(f"--out {out}: the run will write about {human_size(needed)} ({needed} bytes: {what}), "
                            f"but the file system of {place} has {human_size(free)} ({free} bytes) free; free some "
                            "space, choose another --out, or keep fewer checkpoints (--keep-last N)")


def remove_leftovers(out: Path) -> list[Path]:
    """Remove what a killed run's unfinished writes left in OUT (state.leftovers: only our own
    hidden staging names); call it holding OUT's lock, so no live writer owns them."""
    found = leftovers(out)
    for path in found:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return found


@contextmanager
def holding_out(a: FinetuneConfig, resume_dir: Path | None, rank0: bool, world: int,
                report: Callable[[str], None]) -> Iterator[None]:
    """OUT's lock for a run (rank 0 takes it, every rank learns whether it could), the --out rule
    again under it (another run may have written there since), then the removal of a killed
    run's leftovers, reported in one line."""
    with ExitStack() as stack:
        refusal = None
        if rank0:
            try:
                stack.enter_context(out_lock(a.out))
                check_out(a, resume_dir, probe_lock=False)
            except FinetuneError as e:
                refusal = e
            else:  # ours alone now: no live writer owns what a killed run's unfinished writes left
                removed = remove_leftovers(a.out)
                if removed:
                    report(f"removed {len(removed)} unfinished file(s) of an earlier run that was killed: "
                           f"{', '.join(str(p.relative_to(a.out)) for p in removed)}")
        if world > 1:
            box = [str(refusal) if refusal is not None else None]
            dist.broadcast_object_list(box, src=0)
            if refusal is None and box[0] is not None:
                refusal = FinetuneError(box[0])
        if refusal is not None:
            raise refusal
        yield
