"""`glm4v-convert --quantize` with real processes: it takes the float converter's destination lock (a second
run on the same DST, quantized or float, is refused naming the writer, and never replaces its output); the
staging folder of a killed --quantize run is removed and reported by the next run on that destination;
Ctrl-C, SIGTERM and SIGHUP remove the unfinished output, as for the float converter."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

# A glm4v-convert run that pauses after writing its first shard (touching MARKER), so a test can act there.
SLOW = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import glm4v_conversion.convert as convert_module
    import glm4v_conversion.quantize as quantize_module
    from glm4v_conversion.cli import main
    marker = Path(sys.argv[1])
    def slowed(real):
        def write(path, *args, **kwargs):
            n = real(path, *args, **kwargs)
            marker.touch()
            time.sleep(60)
            return n
        return write
    convert_module.write_file = slowed(convert_module.write_file)
    quantize_module.write_file = slowed(quantize_module.write_file)
    sys.exit(main(sys.argv[2:]))
""")
TIMEOUT = 60


def start_slow(argv: list[str], marker: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SLOW, str(marker), *argv, "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + TIMEOUT
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            _, err = proc.communicate(timeout=TIMEOUT)
            pytest.fail(f"the run never reached its first shard: rc={proc.returncode} {err}")
        time.sleep(0.05)
    return proc


def finish(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=TIMEOUT)
        pytest.fail(f"the run did not stop on {signal.Signals(sig).name}")
    return proc.returncode, err


def convert_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glm4v_conversion", *argv, "--no-progress"], capture_output=True,
                          text=True, timeout=TIMEOUT)


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


QUANTIZE = {"int8": ["--quantize", "int8"], "int4": ["--quantize", "int4", "--group-size", "32"]}


@pytest.mark.parametrize("sig,code,words", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "SIGTERM"),
                                            (signal.SIGHUP, 129, "SIGHUP")])
@pytest.mark.parametrize("scheme", QUANTIZE)
def test_signal_mid_quantize_leaves_nothing(fixtures_dir, tmp_path, scheme, sig, code, words):
    dst = tmp_path / "out" / "int"
    proc = start_slow([str(fixtures_dir / "tiny"), str(dst), *QUANTIZE[scheme]], tmp_path / "marker")
    assert ".int.lock" in hidden(dst.parent)  # the float converter's lock, held while it runs
    rc, err = finish(proc, sig)
    assert rc == code and words in err and "was not written" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()  # staging folder, lock and the folder made for them: all gone


# (first run, second run): each waits for the other's lock, quantized or float, --force or not
PAIRS = {
    "int8 then int8": ("int8", ["--quantize", "int8"]),
    "int8 then int4 --force": ("int8", [*QUANTIZE["int4"], "--force"]),
    "int4 then float": ("int4", []),
    "int4 then float --force": ("int4", ["--force"]),
    "float then int8": ("float", ["--quantize", "int8"]),
    "float then int4 --force": ("float", [*QUANTIZE["int4"], "--force"]),
}


@pytest.mark.parametrize("pair", PAIRS)
def test_second_run_on_the_same_destination_is_refused_naming_the_first(fixtures_dir, tmp_path, pair):
    first, second = PAIRS[pair]
    dst = tmp_path / "dst"
    proc = start_slow([str(fixtures_dir / "tiny"), str(dst), *QUANTIZE.get(first, [])], tmp_path / "marker")
    try:
        staged = [n for n in hidden(tmp_path) if ".partial-" in n]
        done = convert_cli(str(fixtures_dir / "tiny"), str(dst), *second)
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith("glm4v-convert: error: ") and done.stderr.count("\n") == 1, done.stderr
        assert f"being written by another glm4v-convert (pid {proc.pid}" in done.stderr, done.stderr
        assert not dst.exists() and [n for n in hidden(tmp_path) if ".partial-" in n] == staged  # untouched
    finally:
        rc, err = finish(proc)
    assert rc == 143, err
    assert hidden(tmp_path) == [] and not dst.exists()
    done = convert_cli(str(fixtures_dir / "tiny"), str(dst), *second)  # the lock went with its owner
    assert done.returncode == 0 and (dst / "config.json").is_file(), done.stderr


@pytest.mark.parametrize("next_run", ["int8", "int4", "float"])
def test_leftovers_of_a_killed_quantize_are_removed_and_reported_by_the_next_run(fixtures_dir, tmp_path, next_run):
    dst = tmp_path / "int"
    proc = start_slow([str(fixtures_dir / "tiny"), str(dst), *QUANTIZE["int8"]], tmp_path / "marker")
    finish(proc, signal.SIGKILL)  # no clean-up can run
    left = hidden(tmp_path)
    assert any(".partial-" in n for n in left) and ".int.lock" in left, left  # what a killed run leaves
    done = convert_cli(str(fixtures_dir / "tiny"), str(dst), *QUANTIZE.get(next_run, []))
    assert done.returncode == 0, done.stderr
    assert "glm4v-convert: warning: removed 1 unfinished folder(s) of an earlier interrupted run" in done.stderr, \
        done.stderr
    assert hidden(tmp_path) == [] and (dst / "config.json").is_file()
