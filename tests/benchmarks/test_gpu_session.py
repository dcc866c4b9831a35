"""benchmarks/gpu_session.sh, run with stand-ins for python and nvidia-smi: the steps it promises
run in order, results reach OUT_DIR, a failed step is counted and does not stop the rest."""
import os
import shutil
import stat
import subprocess
import tarfile

from helpers.paths import BENCHMARKS

SCRIPT = BENCHMARKS / "gpu_session.sh"

FAKE_PYTHON = """#!/bin/bash
echo "$*" >> "$CALLS"
case "$*" in
  *"import glm4v_core"*) exit 1 ;;                      # as if the editable install had failed
  *generate.py*) echo '{}' > benchmarks/results/generate_fake-gpu.json ;;
  *kernel_resources.py*) exit 3 ;;                      # one failing step
esac
exit 0
"""


def run_session(tmp_path, only: str | None = None):
    repo, bin_dir, out = tmp_path / "repo", tmp_path / "bin", tmp_path / "out"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    (repo / "benchmarks" / "results" / "generate_cpu.json").write_text("{}")  # an older result: not collected
    shutil.copy(SCRIPT, repo / "benchmarks")
    bin_dir.mkdir()
    for name, body in (("python", FAKE_PYTHON), ("nvidia-smi", "#!/bin/bash\necho 'NVIDIA H100'\n")):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(stat.S_IRWXU)
    calls = tmp_path / "calls"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls), "OUT": str(out)}
    env.pop("TRITON_INTERPRET", None)
    env.pop("ONLY", None)
    if only is not None:
        env["ONLY"] = only
    run = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_session.sh")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    steps = [line for line in calls.read_text().splitlines() if "import xdist" not in line]
    return run, steps, out


def test_gpu_session_runs_every_step_and_collects_results(tmp_path):
    run, steps, out = run_session(tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr  # exactly one step failed
    order = ["pip install", "import glm4v_core", "import torch", "pytest -v -rf --tb=line -m gpu or not gpu",
             "pytest -v -rf --tb=short -m gpu", "kernels.py --out", "generate.py --real", "quant.py --real",
             "train.py --device cuda", "finetune.py --real", "memory_plan.py --device cuda", "multi_image.py --real",
             "serve.py --mid --device cuda", "kernel_resources.py"]
    assert len(steps) == len(order) and all(want in got for want, got in zip(order, steps, strict=True)), steps
    assert sorted(p.name for p in out.iterdir()) == ["gpu_session.log", "results.tgz"]
    with tarfile.open(out / "results.tgz") as tar:
        assert tar.getnames() == ["benchmarks/results/generate_fake-gpu.json"]
    log = (out / "gpu_session.log").read_text()
    assert "install failed: packages linked from" in log and "== 1 step(s) failed" in log
    assert "exit 3: python benchmarks/kernel_resources.py" in log


def test_gpu_session_runs_only_the_named_steps(tmp_path):
    run, steps, _ = run_session(tmp_path, only="generate")
    assert run.returncode == 0, run.stdout + run.stderr
    assert not any("pip install" in s or "kernels.py" in s for s in steps)
    assert any("generate.py --real" in s for s in steps)
