"""`glm4v parity --plot/--html`: the reports are written, show what failed, and need matplotlib only for the plot."""
import struct
import sys

from helpers.parity import half_split_rotary

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
