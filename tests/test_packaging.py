"""The package installed from a wheel (not the source tree) runs the demo from any directory: the
demo checkpoint and vocabulary ship as package data, and every room is in the wheel."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from helpers.paths import ROOT

ROOMS = ("model", "processing", "generation", "transforms", "training", "parity", "serving")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    wheels, target, source = (tmp_path_factory.mktemp(name) for name in ("wheel", "site", "source"))
    for part in ("src", "kernels", "conversion", "pyproject.toml", "README.md"):  # a clean copy: no stale build/
        if (ROOT / part).is_dir():
            shutil.copytree(ROOT / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / part, source / part)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(wheels)], check=True, capture_output=True, timeout=300)
    wheel = next(wheels.glob("glm4v_core-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return wheel, target


def run_installed(target, *args):
    env = {**os.environ, "PYTHONPATH": str(target)}  # ahead of the editable install of the source tree
    return subprocess.run([sys.executable, *args], cwd=target.parent, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_wheel_holds_every_room_and_the_demo(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for room in ROOMS:
        assert f"glm4v_core/{room}/__init__.py" in names, room
    assert {"glm4v_core/demo/tiny/config.json", "glm4v_core/demo/tiny/reference.safetensors",
            "glm4v_core/demo/tokenizer/tokenizer.model"} <= names


def test_generate_and_parity_run_from_the_installed_package(installed):
    _, target = installed
    where = run_installed(target, "-c", "import glm4v_core; print(glm4v_core.__file__)")
    assert where.stdout.strip().startswith(str(target)), where.stdout  # not the source checkout
    gen = run_installed(target, "-m", "glm4v_core", "generate", "Hello", "--max-new-tokens", "3")
    assert gen.returncode == 0 and "3 tokens" in gen.stderr, gen.stderr
    parity = run_installed(target, "-m", "glm4v_core.parity")
    assert parity.returncode == 0 and "parity PASSED: 7/7 cases" in parity.stdout, parity.stdout + parity.stderr
