"""`glm4v parity --plot/--html`: the reports are written, show what failed, and need matplotlib only for the plot."""
import errno
import os
import struct
import sys

import pytest
from helpers.parity import half_split_rotary
from helpers.robustness import SPECIAL_KINDS, make_special

from glm4v_conversion import atomic
from glm4v_core.model import decoder as model_decoder
from glm4v_core.parity import cli as parity_cli
from glm4v_core.parity import report as parity_report
from glm4v_core.parity import run as parity_run


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def test_plot_and_html_of_a_passing_run(fixtures_dir, tmp_path, capsys):
    png, page = tmp_path / "report.png", tmp_path / "report.html"
    code = parity_cli.main(["--checkpoint", str(fixtures_dir / "tiny"), "--plot", str(png), "--html", str(page)])
    out = capsys.readouterr().out
    assert code == 0 and "parity PASSED" in out  # the numeric report is still printed
    width, height = png_size(png.read_bytes())
    assert width >= 900 and height >= 4 * 200, (width, height)  # one readable panel per case
    html = page.read_text()
    assert "PASSED</b>: 7/7 cases" in html  # a-d and the multi_image cases m1-m3 and "data:image/png;base64," in html
    for name in ("case a", "vision.vit_out", "decoder.layer1", "greedy_tokens"):
        assert name in html
    assert "class='fail'" not in html
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_failing_run_is_marked_in_both_reports(fixtures_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(model_decoder, "apply_rotary", half_split_rotary)
    page = tmp_path / "report.html"
    code = parity_cli.main(["--checkpoint", str(fixtures_dir / "tiny"), "--plot", str(tmp_path / "r.png"),
                            "--html", str(page)])
    assert code == 1
    html = page.read_text()
    assert "FAILED</b>: 0/7 cases" in html
    assert "<tr class='fail'><td>decoder.layer0</td>" in html and "<tr class=''><td>embeddings</td>" in html


def test_plot_draws_values_tolerances_and_failures(fixtures_dir, monkeypatch):
    monkeypatch.setattr(model_decoder, "apply_rotary", half_split_rotary)
    (report_a, *_) = parity_run.run_parity(fixtures_dir / "tiny")
    plt = parity_report.import_pyplot()
    fig, ax = plt.subplots()
    parity_report.draw_case(ax, report_a)
    stages = parity_report.float_stages(report_a)
    lines = {line.get_label(): line for line in ax.lines}
    assert list(lines["max-abs"].get_ydata()) == [max(s.max_abs, parity_report.EXACT_FLOOR) for s in stages]
    failed = [s.max_abs for s in stages if not s.ok]
    assert failed and list(lines["fails"].get_ydata()) == failed
    assert [t.get_text() for t in ax.get_xticklabels()][-2:] == ["final_norm", "logits"]
    assert "FAIL" in ax.get_title(loc="left") and "greedy DIFFER" in ax.get_title(loc="left")
    plt.close(fig)


def test_without_matplotlib_the_plot_names_the_extra_and_the_rest_works(fixtures_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code = parity_cli.main(["--checkpoint", str(fixtures_dir / "tiny"), "--plot", str(tmp_path / "r.png")])
    captured = capsys.readouterr()
    assert code == 1 and "pip install -e '.[plot]'" in captured.err
    assert "parity PASSED" in captured.out and not (tmp_path / "r.png").exists()
    assert parity_cli.main(["--checkpoint", str(fixtures_dir / "tiny"), "--html", str(tmp_path / "r.html")]) == 0
    assert "no plot: --plot needs matplotlib" in (tmp_path / "r.html").read_text()


# --- the paths given to --plot / --html, and --grads -----------------------------------------------------------

@pytest.fixture
def parity_never_runs(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("parity ran before the report path was checked")
    monkeypatch.setattr(parity_cli, "run_parity", forbidden)


@pytest.mark.parametrize("flag", ["--plot", "--html"])
@pytest.mark.parametrize("kind", ["folder", "fifo", "char_device", "socket", "symlink_loop"])
def test_a_report_path_that_is_not_a_regular_file_is_refused_before_running(tmp_path, capsys, parity_never_runs,
                                                                            flag, kind):
    path = tmp_path / "report"
    make_special(path, kind)
    before = os.lstat(path)
    code = parity_cli.main([flag, str(path)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"glm4v parity: error: {flag} {path}: ") and len(err.splitlines()) == 1, err
    assert SPECIAL_KINDS[kind] in err and "regular file" in err, err
    after = os.lstat(path)  # never replaced
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


@pytest.mark.parametrize("flag", ["--plot", "--html"])
def test_a_report_in_a_missing_folder_is_refused_before_running(tmp_path, capsys, parity_never_runs, flag):
    path = tmp_path / "missing" / "report"
    assert parity_cli.main([flag, str(path)]) == 1
    err = capsys.readouterr().err
    assert err == f"glm4v parity: error: {flag} {path}: the folder {path.parent} does not exist\n"


@pytest.mark.parametrize("flag", ["--plot", "--html"])
def test_a_failed_write_leaves_no_temporary_file(tmp_path, capsys, monkeypatch, flag):
    def no_space(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "_fsync", no_space)  # after the bytes went into the hidden temporary file
    path = tmp_path / "report"
    code = parity_cli.main([flag, str(path)])
    err = capsys.readouterr().err
    assert code == 1 and f"glm4v parity: error: cannot write {flag} {path}: no space left on the device\n" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags", [["--plot", "r.png"], ["--html", "r.html"], ["--plot", "r.png", "--html", "r.html"]])
def test_grads_with_a_report_file_is_a_usage_error(tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as info:
        parity_cli.main(["--grads", *flags])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "usage:" in err and "--grads" in err and flags[0] in err, err


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_report_path_taken_while_parity_ran_is_not_replaced(tmp_path, capsys, monkeypatch, kind):
    path = tmp_path / "report.html"
    real = parity_cli.run_parity

    def run_then_take_the_name(*args, **kwargs):
        reports = real(*args, **kwargs)
        make_special(path, kind)
        return reports

    monkeypatch.setattr(parity_cli, "run_parity", run_then_take_the_name)
    assert parity_cli.main(["--html", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"glm4v parity: error: --html {path}: is {'a folder' if kind == 'folder' else 'a FIFO'}" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"] and not path.is_file()
