"""benchmarks/serve.py runs end to end on a small load and writes the JSON it prints as its last line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve.py"


def test_serve_benchmark_smoke_run(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--requests", "4", "--max-tokens", "2", "--concurrency", "1,2",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads((tmp_path / "serve_cpu.json").read_text())
    assert json.loads(run.stdout.strip().splitlines()[-1]) == record
    (result,) = record["runs"]
    assert result["sequential"]["largest_batch"] == 1 and result["sequential"]["requests"] == 4
    assert [row["clients"] for row in result["concurrent"]] == [1, 2]
    for row in [result["sequential"], *result["concurrent"]]:
        assert 0 < row["latency_p50_s"] <= row["latency_p95_s"] and 0 < row["completion_tokens"] <= 8
    assert {"device", "date", "commit", "command"} <= set(record)
