"""Will it fit in a given device memory, and if not, with which switches: the search behind
`--device-memory` of `glm4v finetune --plan` and `glm4v memory`.

Each switch lowers the peak (never raises it) at a price, its cost here: gradient checkpointing 1
(about a third more compute), a smaller micro-batch with more accumulation 1 per step (same effective
batch, slower), an int8 base 3 and an int4 base 5 (quantization error, int4's larger; the base is
converted once with glm4v-convert), a frozen ViT 4 (the vision tower stops learning), a shorter
--max-length 6 per step (longer samples are skipped). The search:
1. every switch at its strongest: if even that does not fit, nothing will (the answer names what it needs);
2. for each switch, the weakest level that still fits with every other switch at its strongest: a set
   with a weaker level cannot fit (that is what "lowers, never raises" buys), so it is never planned;
3. the remaining sets cheapest first (ties: the earlier switches weaker), until one fits, at most
   MAX_PLANS plans in all (the strongest set then stands).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from glm4v_core.training.memory import Plan
from glm4v_core.training.memory_plan import (
    InferenceRequest,
    TrainingRequest,
    plan_inference,
    plan_training,
    resolve_base,
)

MAX_LENGTH_STEPS = (3 / 4, 1 / 2, 1 / 4)  # shares of the sample's decoder rows tried as --max-length
MAX_PLANS = 16  # a 9B plan takes ~10 s on 2 cores


@dataclass
class Fit:
    """The answer for a device of `memory` bytes: does the run as asked fit, and the cheapest switches."""
    memory: int
    asked: Plan                 # the plan of the run as asked
    best: Plan                  # the plan with the switches below (the asked one when it fits as it is)
    flags: list[str]            # the flags to add (empty: fits as asked, or nothing fits)
    switches: list[str]         # the same in words
    plans_made: int

    @property
    def fits(self) -> bool:
        return self.asked.peak_bytes <= self.memory

    @property
    def fits_with_switches(self) -> bool:
        return self.best.peak_bytes <= self.memory


@dataclass(frozen=True)
class Switch:
    """One dimension of the search: its levels (level 0 = as asked) and the cost of each step up."""
    name: str
    levels: list      # what the request becomes at each level: a dict of TrainingRequest fields
    cost: tuple[int, ...]
    words: list[str]
    flags: list[list[str]]


def training_switches(r: TrainingRequest, sample_rows: int, image_rows: int, base_quantized: bool) -> list[Switch]:
    switches = []
    if not r.gradient_checkpointing:
        switches.append(Switch("checkpointing", [{}, {"gradient_checkpointing": True}], (0, 1),
                               ["", "gradient checkpointing"], [[], ["--gradient-checkpointing"]]))
    sizes = [b for b in range(r.batch_size, 0, -1) if r.batch_size % b == 0]  # divisors: the same effective batch
    if len(sizes) > 1:
        levels = [{"batch_size": b, "grad_accum": r.grad_accum * r.batch_size // b} for b in sizes]
        switches.append(Switch("batch", levels, tuple(range(len(sizes))),
                               ["", *(f"micro-batch {b} x {lv['grad_accum']} accumulated" for b, lv in
                                      zip(sizes[1:], levels[1:], strict=True))],
                               [[], *([f"--batch-size {lv['batch_size']}", f"--grad-accum {lv['grad_accum']}"]
                                      for lv in levels[1:])]))
    if not base_quantized:
        switches += quantize_switch(r.quantize, "an {} base (convert it once: glm4v-convert BASE OUT --quantize {}, "
                                                "then --checkpoint OUT)")
    parts = r.train.split(",")
    if "vision" in parts and len(parts) > 1:
        rest = ",".join(p for p in parts if p != "vision")
        switches.append(Switch("freeze", [{}, {"train": rest}], (0, 4), ["", "a frozen ViT"],
                               [[], [f"--train {rest}"]]))
    lengths = sorted({int(sample_rows * f) for f in MAX_LENGTH_STEPS if int(sample_rows * f) > image_rows + 16},
                     reverse=True)
    if lengths:
        switches.append(Switch("max_length", [{}, *({"max_length": n} for n in lengths)],
                               tuple(6 * i for i in range(len(lengths) + 1)),
                               ["", *(f"samples of at most {n} decoder rows" for n in lengths)],
                               [[], *([f"--max-length {n}"] for n in lengths)]))
    return switches


def search(memory: int, asked: Plan, request, switches: list[Switch], plan) -> Fit:
    """The cheapest set of switch levels whose plan fits `memory` (see the module docstring)."""
    if asked.peak_bytes <= memory or not switches:
        return Fit(memory, asked, asked, [], [], 1)
    made, plans = 1, {}

    def planned(levels: tuple[int, ...]) -> Plan:
        nonlocal made
        if levels not in plans:
            changes = {k: v for s, lv in zip(switches, levels, strict=True) for k, v in s.levels[lv].items()}
            plans[levels] = plan(dataclasses.replace(request, **changes))
            made += 1
        return plans[levels]

    def answer(levels: tuple[int, ...]) -> Fit:
        chosen = [(s, lv) for s, lv in zip(switches, levels, strict=True) if lv]
        return Fit(memory, asked, planned(levels), [f for s, lv in chosen for f in s.flags[lv]],
                   [s.words[lv] for s, lv in chosen], made)

    strongest = tuple(len(s.levels) - 1 for s in switches)
    if planned(strongest).peak_bytes > memory:
        return answer(strongest)
    needed = [next(lv for lv in range(top + 1) if planned((*strongest[:d], lv, *strongest[d + 1:])).peak_bytes
                   <= memory) for d, top in enumerate(strongest)]
    ranges = (range(low, top + 1) for low, top in zip(needed, strongest, strict=True))
    by_cost = sorted(itertools.product(*ranges), key=lambda lv: (sum(s.cost[i] for s, i in zip(switches, lv,
                                                                                                 strict=True)), lv))
    for levels in by_cost:
        if levels in plans or made < MAX_PLANS:
            if planned(levels).peak_bytes <= memory:
                return answer(levels)
    return answer(strongest)


def fit_training(memory: int, request: TrainingRequest, asked: Plan) -> Fit:
    base = resolve_base(request.checkpoint, request.quantize)
    image_rows = 2 + base.config.vision.num_image_tokens if base.config.has_vision else 0
    stored = base.scheme is not None and request.quantize is None
    return search(memory, asked, request, training_switches(request, asked.sample_rows, image_rows, stored),
                  plan_training)


def fit_inference(memory: int, request: InferenceRequest, asked: Plan) -> Fit:
    stored = resolve_base(request.checkpoint, request.quantize).scheme is not None and request.quantize is None
    switches = [] if stored else quantize_switch(request.quantize, "{} weights (glm4v-convert CKPT OUT --quantize {})")
    return search(memory, asked, request, switches, plan_inference)


def quantize_switch(current: str | None, words: str) -> list[Switch]:
    """[the switch to int8 then int4 weights (those stronger than `current`)], or [] when int4 already."""
    schemes = {None: ("int8", "int4"), "int8": ("int4",)}.get(current, ())
    if not schemes:
        return []
    cost = {"int8": 3, "int4": 5}
    return [Switch("quantize", [{}, *({"quantize": q} for q in schemes)], (0, *(cost[q] for q in schemes)),
                   ["", *(words.format(q, q) for q in schemes)], [[], *([f"--quantize {q}"] for q in schemes)])]
