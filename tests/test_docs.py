"""Every ```python block of README.md and docs/*.md runs, as written, on the bundled demo checkpoint.

Each block runs alone in a fresh interpreter, as a script in an empty temporary folder (so a block
cannot lean on the repository's files or on an earlier block), with TRITON_INTERPRET=1. A block that
must not run (it needs a GPU, the real checkpoint or files of your own) takes another fence language:
```bash, ```text.
"""
import os
import re
import subprocess
import sys
import textwrap

import pytest
from helpers.paths import ROOT

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[^\s`]*)")
TIMEOUT_S = 120


def code_blocks(text: str) -> list[tuple[int, str, str]]:
    """(first line number, language, code) of every fenced block, in order."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, start, body = opening["fence"], i + 1, []
        i += 1
        while i < len(lines) and not re.match(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$", lines[i]):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"the code block opened at line {start} is never closed")
        blocks.append((start, opening["lang"].lower(), textwrap.dedent("\n".join(body)) + "\n"))
        i += 1
    return blocks


def python_blocks() -> list:
    params = []
    for doc in DOCUMENTS:
        name = doc.relative_to(ROOT).as_posix()
        blocks = [b for b in code_blocks(doc.read_text(encoding="utf-8")) if b[1] in ("python", "py")]
        for number, (line, _, code) in enumerate(blocks, 1):
            params.append(pytest.param(name, number, line, code, id=f"{name}#{number}"))
    return params


def test_the_documents_are_there_and_have_python_blocks():
    names = {doc.name for doc in DOCUMENTS}
    assert {"README.md", "architecture.md", "generation.md", "training.md", "parity.md", "checkpoints.md",
            "quantization.md", "distributed.md", "kernels.md", "errors.md"} <= names
    assert any(p.values[0] == "README.md" for p in python_blocks())


def test_every_fence_is_closed():
    for doc in DOCUMENTS:
        try:
            code_blocks(doc.read_text(encoding="utf-8"))
        except AssertionError as e:
            pytest.fail(f"{doc.relative_to(ROOT)}: {e}")


@pytest.mark.parametrize(("doc", "number", "line", "code"), python_blocks())
def test_python_block_runs(doc, number, line, code, tmp_path):
    where = f"{doc}: python block {number} (line {line})"
    script = tmp_path / f"block_{number}.py"  # a file, not -c: spawned ranks re-import their __main__
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    try:
        run = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{where} ran past {TIMEOUT_S} s")
    if run.returncode != 0:
        pytest.fail(f"{where} exited with status {run.returncode}:\n{run.stderr[-4000:]}", pytrace=False)


def test_no_document_points_outside_the_repository():
    """Links and paths in the docs name files of this repository (or none): no web addresses other
    than the PyTorch wheel index a newcomer installs from, and every relative link resolves."""
    allowed = ("https://download.pytorch.org/whl/",)
    for doc in [*DOCUMENTS, ROOT / "benchmarks" / "README.md"]:
        text = doc.read_text(encoding="utf-8")
        for url in re.findall(r"https?://[^\s)`'\"]+", text):
            assert url.startswith(allowed), f"{doc.relative_to(ROOT)} points outside the repository: {url}"
        for target in re.findall(r"\]\(([^)#\s]+)", text):
            path = (doc.parent / target).resolve()
            assert path.is_relative_to(ROOT) and path.exists(), f"{doc.relative_to(ROOT)}: broken link {target}"


def test_the_readme_stays_short_and_names_the_ci_test_command():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    bash = [code.strip() for _, lang, code in code_blocks(text) if lang == "bash"]
    assert "TRITON_INTERPRET=1 python -m pytest -q" in bash  # what CI runs: keep it exactly


def _table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| ---")]


@pytest.mark.parametrize("doc", ["README.md", "docs/training.md"])
def test_the_planned_9b_memory_rows_are_those_of_the_recorded_json(doc):
    """The 9B table is memory_plan_9b.json's rows, none missing, no number retyped differently."""
    import json
    rows = json.loads((ROOT / "benchmarks" / "results" / "memory_plan_9b.json").read_text())["rows"]
    table = {r[0].replace("`", ""): r[1] for r in _table_rows((ROOT / doc).read_text()) if r[1].endswith(" GiB")}
    for row in rows:
        assert table.get(row["what"]) == f"{row['predicted_GiB']:.2f} GiB", (doc, row["what"], table)


def test_the_readme_memory_validation_rows_are_those_of_the_recorded_json():
    import json
    rows = json.loads((ROOT / "benchmarks" / "results" / "memory_plan_cpu.json").read_text())["rows"]
    table = {(r[1], r[2].strip("`")): (r[3], r[4]) for r in _table_rows((ROOT / "README.md").read_text())
             if r[0] == "mid-size"}
    mid = [r for r in rows if r["config"] == "mid"]
    assert len(table) == len(mid) == 6, table
    for r in mid:
        assert table[(r["mode"], r["flags"])] == (f"{r['predicted_bytes'] / 2**20:.1f} MiB",
                                                  f"{r['measured_bytes'] / 2**20:.1f} MiB"), r
