"""benchmarks/generate.py: each run's bandwidth is judged against the copy measurements that bracket it."""
import sys

import pytest
import torch
from helpers.paths import BENCHMARKS  # noqa: E402

sys.path.insert(0, str(BENCHMARKS))
import generate as bench  # noqa: E402

from glm4v_core import load_model  # noqa: E402


def test_each_run_is_judged_against_the_bandwidth_around_it_not_the_best_earlier(monkeypatch, fixtures_dir):
    """An earlier measurement of 80 GB/s, then 40 GB/s around every run: every run of the same speed
    gets the same share of the bandwidth around it (the row's roofline stays the best, 80)."""
    measurements = iter([40e9] * 10)
    monkeypatch.setattr(bench, "CPU_COPY_MEASURED", [80e9])
    monkeypatch.setattr(bench, "copy_bandwidth", lambda: next(measurements))
    monkeypatch.setattr(bench, "run_once", lambda *a, **k: (0.01, 0.002, 0.0))  # no generation: fixed timings
    monkeypatch.setattr(bench, "step_only", lambda *a, **k: 0.002)
    row = bench.measure(load_model(fixtures_dir / "tiny", dtype=torch.float32), 4, 1, False, 4, repeat=2)
    for mode in ("eager", "compiled"):
        around = row[mode]["pct_of_copy_bandwidth_around_each_run"]
        expected = pytest.approx(2 * row[mode]["pct_of_bandwidth_roofline"])
        assert around["min"] == around["max"] == expected, (mode, around)
