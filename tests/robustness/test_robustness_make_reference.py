"""`glm4v make-reference` robustness (issue #24): consent before a checkpoint's own code runs and an auto_map
that stays inside the folder; an --out that --overwrite may replace (only a reference make-reference made) and
one that is never written through; Ctrl-C anywhere (130, one line, nothing half-written); the leftovers of a
killed run removed and reported by the next run on that destination (glm4v_conversion.atomic's lock)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers.paths import FIXTURES, STANDIN

from glm4v_conversion.atomic import destination_lock
from glm4v_core import cli
from glm4v_core.parity import capture as parity_capture
from glm4v_core.parity import make_reference as parity_make_reference
from glm4v_core.parity import make_reference_cli
from glm4v_core.parity.make_reference import CaptureError, Case
from glm4v_core.processing import tokenizer as processing_tokenizer

IMAGE = FIXTURES / "images" / "gradient_rgb_97x61.png"
PROMPT = "What is in this picture?"
REMOTE_CODE = ("configuration_chatglm.py", "modeling_chatglm.py", "visual.py")
PREFIX = "glm4v make-reference: "


def standin(folder: Path) -> Path:
    """The tiny fixture checkpoint plus the stand-in remote code (tests/reference_standin/)."""
    shutil.copytree(FIXTURES / "tiny", folder)
    for src in STANDIN.glob("*.py"):
        shutil.copy(src, folder / src.name)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return standin(tmp_path_factory.mktemp("standin") / "standin_robustness")


def argv(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["make-reference", "--checkpoint", str(checkpoint), "--out", str(out), "--image", str(IMAGE),
            "--prompt", PROMPT, "--max-new-tokens", "2", "--layers", "1", *extra]


def run(capsys, args: list[str]) -> tuple[int, str]:
    """cli.main's exit status and stderr; a KeyboardInterrupt that escapes it fails the test (not the session)."""
    capsys.readouterr()
    try:
        code = cli.main(args)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped glm4v make-reference")
    return code, capsys.readouterr().err


def error_line(err: str) -> str:
    """The refusal: the last line of stderr, which must be one `glm4v make-reference: error: ...` line."""
    assert "Traceback" not in err, err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith(PREFIX + "error: "), err
    return last


@pytest.fixture
def no_load(monkeypatch):
    """The checkpoint's code must not run: loading it through transformers fails the test."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the checkpoint's remote code was loaded")
    monkeypatch.setattr(parity_make_reference, "load_reference", forbidden)


def tree(path: Path) -> dict[str, tuple]:
    """What is at `path` and under it (links not followed): kind and content hash of each entry."""
    def entry(p: Path) -> tuple:
        st = os.lstat(p)
        if os.path.islink(p):
            return ("link", os.readlink(p))
        if p.is_dir():
            return ("dir",)
        if p.is_file():
            return ("file", hashlib.sha256(p.read_bytes()).hexdigest())
        return ("special", st.st_mode)
    if not (path.exists() or path.is_symlink()):
        return {}
    found = {".": entry(path)}
    if path.is_dir() and not path.is_symlink():
        for p in sorted(path.rglob("*")):
            found[str(p.relative_to(path))] = entry(p)
    return found


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def made(hf_modules, checkpoint, tmp_path_factory) -> Path:
    """A reference recorded by make-reference itself (through the stand-in)."""
    out = tmp_path_factory.mktemp("made") / "ref"
    assert cli.main(argv(checkpoint, out, "--trust-remote-code")) == 0
    return out


# ---------------------------------------------------------------- 1. consent, and an auto_map inside the folder

@pytest.mark.parametrize("how", ["cli", "python"])
def test_without_trust_remote_code_nothing_runs_and_the_files_are_named(checkpoint, tmp_path, capsys, no_load, how):
    out = tmp_path / "ref"
    if how == "cli":
        code, err = run(capsys, argv(checkpoint, out))
        assert code == 1
        message = error_line(err)
    else:
        with pytest.raises(CaptureError) as e:
            parity_make_reference.make_reference(checkpoint, out, [Case("p00", PROMPT, IMAGE)])
        message = str(e.value)
    assert "--trust-remote-code" in message and "auto_map" in message and str(checkpoint) in message, message
    for name in REMOTE_CODE:  # the auto_map modules and visual.py, which modeling_chatglm.py imports
        assert name in message, message
    assert not out.exists() and not hidden(tmp_path)


def test_with_trust_remote_code_the_files_that_run_are_said_first(checkpoint, tmp_path, capsys, monkeypatch):
    def stop(*args):
        raise CaptureError("stopped before loading")
    monkeypatch.setattr(parity_make_reference, "load_reference", stop)
    code, err = run(capsys, argv(checkpoint, tmp_path / "ref", "--trust-remote-code"))
    assert code == 1 and "stopped before loading" in error_line(err)
    said = next(line for line in err.splitlines() if "--trust-remote-code" in line)
    assert all(name in said for name in REMOTE_CODE) and str(checkpoint) in said, err


def set_auto_map(key: str, value):
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        if value is None:
            del config["auto_map"][key]
        else:
            config["auto_map"][key] = value
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return edit


def link_outside(folder: Path) -> None:
    """modeling_chatglm.py is a link to a file outside the checkpoint folder."""
    outside = folder.parent / f"{folder.name}_elsewhere.py"
    (folder / "modeling_chatglm.py").rename(outside)
    (folder / "modeling_chatglm.py").symlink_to(outside)


def fifo_module(folder: Path) -> None:
    (folder / "configuration_chatglm.py").unlink()
    os.mkfifo(folder / "configuration_chatglm.py")  # reading it would block: it must be refused unread


def import_missing(folder: Path) -> None:
    path = folder / "modeling_chatglm.py"
    path.write_text(path.read_text().replace("from .visual import", "from .vision_tower import"))


def import_parent(folder: Path) -> None:
    path = folder / "modeling_chatglm.py"
    path.write_text(path.read_text().replace("from .visual import", "from ..visual import"))


MODEL = "modeling_chatglm.ChatGLMForConditionalGeneration"
BAD_CODE = {
    "other repository": (set_auto_map("AutoModelForCausalLM", "THUDM/glm-4v-9b--" + MODEL),
                         ["auto_map.AutoModelForCausalLM", "THUDM/glm-4v-9b", "another repository"]),
    "config class in another repository": (set_auto_map("AutoConfig", "org/repo--configuration_chatglm.ChatGLMConfig"),
                                           ["auto_map.AutoConfig", "org/repo", "another repository"]),
    "parent folder": (set_auto_map("AutoModelForCausalLM", "../" + MODEL), ["auto_map.AutoModelForCausalLM",
                                                                            "../" + MODEL, "outside"]),
    "absolute path": (set_auto_map("AutoModelForCausalLM", "/tmp/" + MODEL), ["/tmp/" + MODEL, "outside"]),
    "module not in the folder": (set_auto_map("AutoModelForCausalLM", "modeling_glm.ChatGLMForConditionalGeneration"),
                                 ["auto_map.AutoModelForCausalLM", "modeling_glm.py", "not in"]),
    "no class name": (set_auto_map("AutoModelForCausalLM", "modeling_chatglm"), ["modeling_chatglm", "module.Class"]),
    "not a string": (set_auto_map("AutoModelForCausalLM", 7), ["auto_map.AutoModelForCausalLM", "module.Class"]),
    "no causal LM entry": (set_auto_map("AutoModelForCausalLM", None), ["auto_map.AutoModelForCausalLM"]),
    "link out of the folder": (link_outside, ["modeling_chatglm.py", "outside"]),
    "FIFO module": (fifo_module, ["configuration_chatglm.py", "FIFO"]),
    "relative import of a missing file": (import_missing, ["modeling_chatglm.py", "vision_tower.py", "not in"]),
    "relative import from the parent": (import_parent, ["modeling_chatglm.py", "..visual", "outside"]),
}


@pytest.mark.parametrize("consent", [True, False], ids=["with-flag", "without-flag"])
@pytest.mark.parametrize("case", list(BAD_CODE))
def test_auto_map_must_name_modules_of_the_folder_itself(tmp_path, capsys, no_load, case, consent):
    edit, words = BAD_CODE[case]
    folder = standin(tmp_path / "standin_bad_code")
    edit(folder)
    before = tree(folder)
    code, err = run(capsys, argv(folder, tmp_path / "ref", *(["--trust-remote-code"] if consent else [])))
    message = error_line(err)
    assert code == 1 and all(w in message for w in words), (words, message)
    assert not (tmp_path / "ref").exists() and tree(folder) == before


# ---------------------------------------------------------------- 2. what --out may be, and what --overwrite replaces

def copy_made(made: Path):
    def build(out: Path) -> Path:
        shutil.copytree(made, out)
        return out
    return build


def made_then(change):
    """A copy of a real make-reference output, then `change(out)`."""
    def build_factory(made: Path):
        def build(out: Path) -> Path:
            shutil.copytree(made, out)
            change(out)
            return out
        return build
    return build_factory


def replace_with_fifo(name: str):
    def change(out: Path) -> None:
        (out / name).unlink()
        os.mkfifo(out / name)
    return change


def replace_with_folder(name: str):
    def change(out: Path) -> None:
        (out / name).unlink()
        (out / name).mkdir()
        (out / name / "keep.txt").write_text("mine")
    return change


def regular_file(out: Path) -> Path:
    out.write_text("my notes\n")
    return out


def fifo(out: Path) -> Path:
    os.mkfifo(out)
    return out


def user_folder(out: Path) -> Path:
    (out / "photos").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me\n")
    (out / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 not really")
    return out


def hf_fixture_reference(out: Path) -> Path:
    """reference.safetensors + reference.json, as the fixtures have them: not written by make-reference."""
    out.mkdir()
    for name in ("reference.safetensors", "reference.json"):
        shutil.copy(FIXTURES / "tiny" / name, out / name)
    return out


def forged(out: Path) -> None:
    """make-reference's reference.json beside the fixtures' reference.safetensors."""
    shutil.copy(FIXTURES / "tiny" / "reference.safetensors", out / "reference.safetensors")


NOT_A_FOLDER = {  # refused whether or not --overwrite is given
    "regular file": (lambda made: regular_file, ["a regular file", "not a folder"]),
    "FIFO": (lambda made: fifo, ["FIFO", "not a folder"]),
    "character device": (lambda made: (lambda out: Path("/dev/null")), ["/dev/null", "character device"]),
    "link to a reference": (lambda made: (lambda out: (out.symlink_to(made), out)[1]), ["symbolic link"]),
    "dangling link": (lambda made: (lambda out: (out.symlink_to(out.parent / "gone"), out)[1]), ["symbolic link"]),
}
NOT_A_REFERENCE = {  # refused even with --overwrite; nothing in them is touched
    "user's folder": (lambda made: user_folder, ["notes.txt", "not a reference made by make-reference"]),
    "reference plus the user's report": (made_then(lambda out: (out / "report.png").write_bytes(b"png")),
                                         ["report.png", "not a reference made by make-reference"]),
    "the fixtures' reference": (lambda made: hf_fixture_reference, ["reference.json", "not written by"]),
    "json without its safetensors": (made_then(lambda out: (out / "reference.safetensors").unlink()),
                                     ["no reference.safetensors"]),
    "safetensors of another tool": (made_then(forged), ["reference.safetensors", "not written by"]),
    "safetensors is a folder": (made_then(replace_with_folder("reference.safetensors")),
                                ["reference.safetensors", "a folder"]),
    "json is a FIFO": (made_then(replace_with_fifo("reference.json")), ["reference.json", "FIFO"]),
}


@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "no-overwrite"])
@pytest.mark.parametrize("case", list(NOT_A_FOLDER) + list(NOT_A_REFERENCE))
def test_out_that_is_not_a_reference_is_refused_and_kept(made, checkpoint, tmp_path, capsys, no_load, case,
                                                         overwrite):
    factory, words = {**NOT_A_FOLDER, **NOT_A_REFERENCE}[case]
    out = factory(made)(tmp_path / "ref")
    before, beside = tree(out), hidden(out.parent)
    extra = ["--trust-remote-code", *(["--overwrite"] if overwrite else [])]
    code, err = run(capsys, argv(checkpoint, out, *extra))
    message = error_line(err)
    assert code == 1 and all(w in message for w in words) and str(out) in message, (words, message)
    if case in NOT_A_REFERENCE:  # says what --overwrite would need
        assert "--overwrite" in message, message
    assert tree(out) == before and hidden(out.parent) == beside


def test_existing_reference_needs_overwrite(made, checkpoint, tmp_path, capsys, no_load):
    out = copy_made(made)(tmp_path / "ref")
    before = tree(out)
    code, err = run(capsys, argv(checkpoint, out, "--trust-remote-code"))
    message = error_line(err)
    assert code == 1 and "--overwrite" in message and "made by make-reference" in message, message
    assert tree(out) == before


@pytest.mark.parametrize("case", ["a reference make-reference made", "an empty folder"])
def test_overwrite_replaces_a_reference_or_an_empty_folder(made, hf_modules, checkpoint, tmp_path, capsys, case):
    out = tmp_path / "ref"
    if case == "an empty folder":
        out.mkdir()
    else:
        copy_made(made)(out)
        meta = json.loads((out / "reference.json").read_text())
        meta["inputs"]["p00"]["prompt"] = "an older recording"
        (out / "reference.json").write_text(json.dumps(meta))
    code, err = run(capsys, argv(checkpoint, out, "--trust-remote-code", "--overwrite"))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["reference.json", "reference.safetensors"]
    assert json.loads((out / "reference.json").read_text())["inputs"]["p00"]["prompt"] == PROMPT
    assert not hidden(tmp_path)


# ---------------------------------------------------------------- 3. Ctrl-C anywhere

def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def after_calls(real, n: int):
    """`real`, interrupted at its n-th call (after n - 1 calls went through)."""
    calls = []
    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    return wrapped


def half_written_file(self, path, metadata):
    Path(path).write_bytes(b"\0" * 1000)  # a part of the final file is on disk
    raise KeyboardInterrupt


STEPS = {  # where Ctrl-C comes: (object, attribute, replacement factory, needs the model loaded)
    "parsing the arguments": (make_reference_cli, "build_parser", lambda: interrupt, False),
    "checking the prompts": (make_reference_cli, "cases_from_args", lambda: interrupt, False),
    "reading the tokenizer": (processing_tokenizer, "resolve_tokenizer", lambda: interrupt, False),
    "importing transformers": (parity_make_reference, "import_transformers", lambda: interrupt, False),
    "estimating memory": (parity_make_reference, "memory_report", lambda: interrupt, False),
    "loading the reference": (parity_make_reference, "load_reference", lambda: interrupt, True),
    "capturing tensors": (parity_capture.SpillWriter, "add", lambda: after_calls(parity_capture.SpillWriter.add, 5),
                          True),
    "the bf16 pass": (parity_make_reference, "record_bf16_case", lambda: interrupt, True),
    "writing reference.safetensors": (parity_capture.SpillWriter, "finish", lambda: half_written_file, True),
    "writing reference.json": (parity_make_reference, "write_json", lambda: interrupt, True),
}


@pytest.mark.parametrize("existing", [False, True], ids=["new", "over-an-old-reference"])
@pytest.mark.parametrize("step", list(STEPS))
def test_ctrl_c_anywhere_exits_130_with_one_line_and_writes_nothing(made, hf_modules, checkpoint, tmp_path, capsys,
                                                                    monkeypatch, step, existing):
    owner, attribute, replacement, _ = STEPS[step]
    monkeypatch.setattr(owner, attribute, replacement())
    parent = tmp_path / "new_folder"
    out = parent / "ref"
    if existing:
        copy_made(made)(out)
    before = tree(out)
    code, err = run(capsys, argv(checkpoint, out, "--trust-remote-code", "--overwrite", "--with-bf16"))
    assert code == 130, err
    assert "Traceback" not in err and err.rstrip("\n").splitlines()[-1].startswith(PREFIX + "interrupted"), err
    if existing:
        assert tree(out) == before and hidden(parent) == []  # the old reference, untouched; no staging left
    else:
        assert not parent.exists(), list(parent.rglob("*"))  # not even the folder made for it


# ---------------------------------------------------------------- 4. the leftovers of a killed run

KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from glm4v_core.parity import make_reference as m, make_reference_cli
    real = m.record_case
    def killed(*args, **kwargs):
        real(*args, **kwargs)  # the spill holds the first case's tensors
        os.kill(os.getpid(), signal.SIGKILL)
    m.record_case = killed
    sys.exit(make_reference_cli.main(sys.argv[1:]))
""")


def killed_run(checkpoint: Path, out: Path, hf_modules: Path, *extra: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(hf_modules), "TRITON_INTERPRET": "1"}
    args = argv(checkpoint, out, "--trust-remote-code", *extra)[1:]
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, *args], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def fake_leftovers(kind: str):
    def build(checkpoint: Path, out: Path, hf_modules: Path, *extra: str) -> None:
        parent = out.parent
        parent.mkdir(parents=True, exist_ok=True)
        if kind in ("staging", "lock and staging"):
            staged = parent / f".{out.name}.partial-1a2b3c4d"
            (staged / "spill").mkdir(parents=True)
            (staged / "spill" / "0.bin").write_bytes(b"\0" * 4096)
            (staged / "reference.safetensors").write_bytes(b"\0" * 100)
        if kind == "swap":
            (parent / f".{out.name}.old-5e6f7a8b").mkdir()
            (parent / f".{out.name}.old-5e6f7a8b" / "reference.json").write_text("{}")
        if kind == "lock and staging":
            (parent / f".{out.name}.lock").write_text("999999999\n")  # a dead writer's pid; nobody holds it
    return build


LEFTOVERS = {"a killed run": killed_run, "staging": fake_leftovers("staging"), "swap": fake_leftovers("swap"),
             "lock and staging": fake_leftovers("lock and staging")}


@pytest.mark.parametrize("existing", [False, True], ids=["new", "over-an-old-reference"])
@pytest.mark.parametrize("kind", list(LEFTOVERS))
def test_leftovers_of_a_killed_run_are_removed_and_reported(made, hf_modules, checkpoint, tmp_path, capsys, kind,
                                                            existing):
    out = tmp_path / "ref"
    if existing:
        copy_made(made)(out)
    overwrite = ["--overwrite"] if existing else []
    LEFTOVERS[kind](checkpoint, out, hf_modules, *overwrite)
    left = [n for n in hidden(tmp_path) if n.startswith((".ref.partial-", ".ref.old-"))]
    assert left, hidden(tmp_path)
    (tmp_path / ".ref.notes").write_text("the user's own hidden file")  # not a leftover: kept
    (tmp_path / ".refs.partial-00000000").mkdir()  # another destination's: kept
    code, err = run(capsys, argv(checkpoint, out, "--trust-remote-code", *overwrite))
    assert code == 0, err
    report = next(line for line in err.splitlines() if line.startswith(PREFIX + "warning: removed"))
    assert all(name in report for name in left), report
    assert hidden(tmp_path) == [".ref.notes", ".refs.partial-00000000"]
    assert sorted(p.name for p in out.iterdir()) == ["reference.json", "reference.safetensors"]


def test_a_live_writer_keeps_others_off_its_destination(made, checkpoint, tmp_path, capsys, no_load):
    out = tmp_path / "ref"
    with destination_lock(out):  # as a running make-reference (or glm4v-convert) holds it
        code, err = run(capsys, argv(checkpoint, out, "--trust-remote-code"))
        message = error_line(err)
        assert code == 1 and "being written by another" in message and str(os.getpid()) in message, message
        assert (tmp_path / ".ref.lock").exists()  # the holder's lock is not taken away
    assert not out.exists()
