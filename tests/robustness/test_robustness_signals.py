"""Signals during conversion, with real processes: SIGINT, SIGTERM and SIGHUP remove the unfinished
output; the leftovers of a SIGKILLed run are removed (and reported) by the next run on that
destination; a second conversion to a destination being written is refused, naming the writer."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from glm4v_conversion.atomic import LeftoversWarning
from glm4v_conversion.convert import ConversionError, convert

# A glm4v-convert run that pauses after its first shard (touching MARKER), so a test can signal it there.
SLOW_CONVERT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import glm4v_conversion.convert as convert_module
    from glm4v_conversion.cli import main
    real_write = convert_module.write_file
    def slow_write(path, *args, **kwargs):
        n = real_write(path, *args, **kwargs)
        Path(sys.argv[3]).touch()
        time.sleep(60)
        return n
    convert_module.write_file = slow_write
    sys.exit(main([sys.argv[1], sys.argv[2], "--no-progress"]))
""")


def start_slow_convert(src: Path, dst: Path, marker: Path, ignore_hup: bool = False) -> subprocess.Popen:
    argv = [sys.executable, "-c", SLOW_CONVERT, str(src), str(dst), str(marker)]
    ignore = (lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) if ignore_hup else None  # as nohup does
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ignore)
    end = time.monotonic() + 60
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the conversion never reached its first shard: rc={proc.returncode} {err}")
        time.sleep(0.05)
    return proc


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("sig,code,words", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "SIGTERM"),
                                            (signal.SIGHUP, 129, "SIGHUP")])
def test_signal_mid_conversion_leaves_nothing(fixtures_dir, tmp_path, sig, code, words):
    dst = tmp_path / "out" / "native"
    proc = start_slow_convert(fixtures_dir / "tiny", dst, tmp_path / "marker")
    assert hidden(dst.parent)  # the staging folder and the lock exist while it runs
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the conversion did not stop on the signal")
    assert proc.returncode == code and words in err and "was not written" in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # staging folder, lock and the folder made for them: all gone


def test_sighup_stays_ignored_under_nohup(fixtures_dir, tmp_path):
    dst = tmp_path / "native"
    proc = start_slow_convert(fixtures_dir / "tiny", dst, tmp_path / "marker", ignore_hup=True)
    try:
        proc.send_signal(signal.SIGHUP)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=2)  # still running: the hangup was ignored, as nohup asked
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert proc.returncode == 143 and hidden(tmp_path) == []


def test_leftovers_of_a_killed_run_are_removed_by_the_next(fixtures_dir, tmp_path):
    dst = tmp_path / "native"
    proc = start_slow_convert(fixtures_dir / "tiny", dst, tmp_path / "marker")
    proc.kill()  # SIGKILL: no clean-up can run
    proc.communicate(timeout=30)
    left = hidden(tmp_path)
    assert any(".partial-" in n for n in left) and ".native.lock" in left  # what a killed run leaves
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert(fixtures_dir / "tiny", dst)
    reported = [str(w.message) for w in caught if issubclass(w.category, LeftoversWarning)]
    assert len(reported) == 1 and "interrupted run" in reported[0], reported
    assert hidden(tmp_path) == [] and (dst / "config.json").is_file()


def test_second_conversion_to_the_same_destination_is_refused(fixtures_dir, tmp_path):
    dst = tmp_path / "native"
    proc = start_slow_convert(fixtures_dir / "tiny", dst, tmp_path / "marker")
    try:
        with pytest.raises(ConversionError, match=rf"being written by another glm4v-convert \(pid {proc.pid}"):
            convert(fixtures_dir / "narrow", dst)
        with pytest.raises(ConversionError, match="being written by another"):
            convert(fixtures_dir / "narrow", dst, force=True)  # --force does not override a live writer
        assert any(".partial-" in n for n in hidden(tmp_path))  # the first run's work is untouched
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert hidden(tmp_path) == [] and not dst.exists()
    convert(fixtures_dir / "narrow", dst)  # the lock went with its owner


def test_a_stale_lock_file_alone_does_not_block(fixtures_dir, tmp_path):
    (tmp_path / ".native.lock").write_text("999999999\n")  # a dead process's lock: nobody holds it
    convert(fixtures_dir / "tiny", tmp_path / "native")
    assert hidden(tmp_path) == []
