"""What `glm4v finetune` prints (stderr, rank 0 alone): a line saying what is trained, on what and
where to; the progress bar (tqdm, if installed) with every other line written through it, so a
held-out loss never breaks the bar; and a closing line naming the files written."""
from __future__ import annotations

import sys
from pathlib import Path

from glm4v_core.transforms import lora


def start_line(trainer) -> str:
    a = trainer.options
    parts = a.train.replace(",", ", ")
    if getattr(a, "adapter", None) is not None:
        what = f"the LoRA adapters of {a.adapter} ({len(lora.adapters_of(trainer.model))} layers)"
    elif a.lora_rank > 0:
        what = f"LoRA adapters of rank {a.lora_rank} (alpha {a.lora_alpha:g}) on the {parts}"
    else:
        what = f"the full weights of the {parts}"
    scheme = (trainer.provenance.get("quantization") or {}).get("scheme")
    base = f"{trainer.checkpoint}" + (f" ({scheme}-quantized)" if scheme else "")
    held_out = f" (+ {len(trainer.eval_samples)} held-out of {a.eval_data})" if a.eval_data else ""
    return (f"training {what} of {base}: {len(trainer.samples)} samples of {a.data}{held_out}, "
            f"{trainer.total_steps} steps, into {a.out}")


def end_line(trainer, written: list[Path], loss: float | None, eval_loss: float | None) -> str:
    held_out = f", held-out {eval_loss:.4f}" if eval_loss is not None else ""
    final = f"final loss {loss:.4f}{held_out}; " if loss is not None else ""
    return f"done at step {trainer.step}: {final}wrote {', '.join(map(str, written))}"


def make_progress(total: int, done: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not enabled:
        return NoBar()
    return tqdm(total=total, initial=done, unit="step", dynamic_ncols=True)


class NoBar:
    """The progress bar's interface, drawing nothing: lines go straight to stderr."""

    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw) -> None: ...
    def close(self) -> None: ...

    @staticmethod
    def write(line: str, file=None) -> None:
        print(line, file=file or sys.stderr)
