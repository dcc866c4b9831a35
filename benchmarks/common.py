"""Shared benchmark bookkeeping: where results go and what every result file records."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# Vendor datasheet peaks by device-name fragment, first match wins: (fragment, dense bf16 TFLOP/s or
# None if unknown, memory GB/s). Device names: "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB", ...
DATASHEET_PEAKS = [("H200", 989.0, 4800.0), ("H100 NVL", 835.0, 3900.0), ("H100 PCIe", 756.0, 2000.0),
                   ("H100", 989.0, 3350.0), ("A100-SXM4-80GB", 312.0, 2039.0), ("A100 80GB PCIe", 312.0, 1935.0),
                   ("A100", 312.0, 1555.0), ("L40S", 362.0, 864.0), ("A10G", None, 600.0)]


def datasheet_peaks(device_name: str) -> tuple[str, float | None, float] | None:
    """The DATASHEET_PEAKS entry of a CUDA device name, or None for a device not listed."""
    return next((row for row in DATASHEET_PEAKS if row[0] in device_name), None)


def git_commit() -> str:
    """HEAD's hash, with '+dirty' when the working tree has uncommitted changes."""
    try:
        git = ["git", "-C", str(Path(__file__).parent)]
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_name() -> str:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu: {cpu_name()} ({os.cpu_count()} cores)"


def copy_bandwidth(n_bytes: int = 1 << 29, repeat: int = 7) -> float:
    """CPU: bytes read + written per second by a 512 MiB tensor copy, best of `repeat` (on a shared
    machine the best run is the least disturbed): the roofline of the CPU benchmarks."""
    import torch
    src, dst = torch.ones(n_bytes // 4), torch.empty(n_bytes // 4)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * n_bytes / min(times)


def read_bandwidth(n_bytes: int = 1 << 29, repeat: int = 7) -> float:
    """CPU: bytes read per second by a sum over a 512 MiB tensor, best of `repeat`."""
    import torch
    src = torch.ones(n_bytes // 4)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        src.sum()
        times.append(time.perf_counter() - start)
    return n_bytes / min(times)


def write_result(name: str, numbers: dict, out_dir: Path | None = None) -> dict:
    """Write benchmarks/results/<name>.json atomically, print it as the last stdout line, return it.

    `numbers` may override the common fields (e.g. a richer `device` record)."""
    import torch
    record = {
        "device": device_name(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **numbers,
    }
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")
    print(json.dumps(record))
    return record
