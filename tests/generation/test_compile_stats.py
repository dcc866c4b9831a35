"""GenerationStats: the decode rate counts only warm steps; compile and warm-up steps are reported apart."""
import re

import pytest
import torch

import glm4v_core
from glm4v_core import cli
from glm4v_core.config import BUNDLED_CHECKPOINT
from glm4v_core.generation import loop
from glm4v_core.generation.loop import GenerationStats, stream_tokens
from glm4v_core.generation.step import compiled_graphs

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def demo():
    return glm4v_core.load_model(BUNDLED_CHECKPOINT)


def slow_first_steps(monkeypatch, clock: FakeClock, build_s: float, recompiling: int, recompile_s: float,
                     step_s: float) -> None:
    """Decode steps on the fake clock: building the step takes build_s, each call step_s, and the
    `recompiling` calls after the first also recompile (recompile_s more, and dynamo's graph count grows). The real
    step runs eagerly underneath: no torch.compile, the loop cannot tell."""
    graphs = [0]
    real_runner = loop.decode_step_runner

    def runner(model, rule, cache, example, compile):
        clock.now += build_s
        step, calls = real_runner(model, rule, cache, example, False), [0]

        def timed(*inputs):
            calls[0] += 1
            clock.now += step_s
            if 1 < calls[0] <= 1 + recompiling:
                clock.now += recompile_s
                graphs[0] += 1
            return step(*inputs)
        return timed

    monkeypatch.setattr(loop, "decode_step_runner", runner)
    monkeypatch.setattr(loop, "compiled_graphs", lambda: graphs[0])


def test_the_warm_rate_leaves_out_the_compile_and_every_recompiling_step(demo, monkeypatch):
    clock = FakeClock()
    slow_first_steps(monkeypatch, clock, build_s=10.0, recompiling=2, recompile_s=2.0, step_s=0.01)
    stats = GenerationStats(clock=clock)
    steps = list(stream_tokens(demo, IDS, max_new_tokens=10, stop_ids=[], compile=True, stats=stats))
    assert len(steps) == 10
    # token 0: the prefill; step 1 builds the step (10 s); steps 2 and 3 recompile; steps 4..9 are warm
    assert stats.warm_tokens == 6
    assert stats.warm_s == pytest.approx(0.06)
    assert stats.decode_tokens_per_s == pytest.approx(100.0)
    assert stats.compile_s == pytest.approx(10.01 + 2 * 2.01)
    stats.new_tokens = 10
    assert "compile + warm-up 14.03 s, decode 100.0 tok/s (warm)" in stats.summary()


def test_eager_decoding_counts_every_step_after_the_first_token(demo, monkeypatch):
    clock = FakeClock()
    slow_first_steps(monkeypatch, clock, build_s=0.0, recompiling=0, recompile_s=0.0, step_s=0.05)
    stats = GenerationStats(clock=clock)
    list(stream_tokens(demo, IDS, max_new_tokens=5, stop_ids=[], stats=stats))
    assert (stats.warm_tokens, stats.compile_s) == (4, 0.0)
    assert stats.decode_tokens_per_s == pytest.approx(20.0)
    assert "decode 20.0 tok/s (prompt" in stats.summary() and "warm" not in stats.summary()


def test_a_run_that_ends_in_the_warm_up_reports_no_rate(demo, monkeypatch):
    clock = FakeClock()
    slow_first_steps(monkeypatch, clock, build_s=5.0, recompiling=0, recompile_s=0.0, step_s=0.01)
    stats = GenerationStats(clock=clock)
    list(stream_tokens(demo, IDS, max_new_tokens=2, stop_ids=[], compile=True, stats=stats))
    assert stats.warm_tokens == 0 and stats.decode_tokens_per_s == 0.0
    assert "compile + warm-up 5.01 s, no warm decode step to time" in stats.summary()


def test_the_graph_count_grows_when_dynamo_recompiles():
    """The loop's recompile signal: dynamo's count of compiled graphs grows with each new shape."""
    f = torch.compile(lambda x: x * 2 + 1, backend="eager", dynamic=False)
    before = compiled_graphs()
    f(torch.ones(3))
    f(torch.ones(3))  # cached: no new graph
    assert compiled_graphs() == before + 1
    f(torch.ones(5))  # a guard fails: recompiled
    assert compiled_graphs() == before + 2


@pytest.mark.slow  # torch.compile of the demo's decode step: about 5-20 s of CPU
def test_generate_compile_prints_the_compile_and_the_warm_rate(capsys):
    assert cli.main(["generate", "--compile", "--device", "cpu", "--max-new-tokens", "8", "Hello"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"compile \+ warm-up \d+\.\d\d s, decode \d+\.\d tok/s \(warm\)", err), err
