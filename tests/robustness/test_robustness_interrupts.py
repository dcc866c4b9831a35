"""Ctrl-C while a command loads (issue #24): whatever the moment (importing torch or the command's
module, reading the weights, building the model, tokenizing, drawing a report) every command prints
one `PROG: interrupted` line on stderr and exits 130, with no traceback and nothing written.

In-process: each command's `main(argv)` with one loader replaced by a Ctrl-C (the replacement must
run, so a case that no longer reaches its moment fails). Real processes: SIGINT sent while the
process is inside `import torch` (seen in its `-X importtime` lines), for every command."""
from __future__ import annotations

import io
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.paths import FIXTURES, STANDIN

from glm4v_conversion import cli as convert_cli
from glm4v_conversion.convert import convert
from glm4v_conversion.safetensors_io import MappedFiles
from glm4v_core import cli
from glm4v_core.model.glm4v import GLM4V
from glm4v_core.parity import report as parity_report
from glm4v_core.processing.tokenizer import Tokenizer

TINY = FIXTURES / "tiny"
DATA = FIXTURES / "finetune" / "train.jsonl"
WAIT_S = 60


class Interrupt:
    """Stands in for a function: a Ctrl-C arrives while it runs. Remembers that it ran."""

    def __init__(self):
        self.fired = False

    def __call__(self, *args, **kwargs):
        self.fired = True
        raise KeyboardInterrupt


class InterruptedImport(Interrupt):
    """A Ctrl-C while module `name` is being imported (torch with it, in a fresh process)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            self()
        return None


def interrupt_import(monkeypatch, name: str) -> InterruptedImport:
    finder = InterruptedImport(name)
    parent, _, child = name.rpartition(".")
    monkeypatch.delitem(sys.modules, name, raising=False)  # imported again, now through the finder
    if parent in sys.modules:
        monkeypatch.delattr(sys.modules[parent], child, raising=False)
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    return finder


def interrupt(monkeypatch, owner, name: str) -> Interrupt:
    stand_in = Interrupt()
    monkeypatch.setattr(owner, name, stand_in)
    return stand_in


MOMENTS = {  # what is interrupted -> how (monkeypatch, command's module) -> Interrupt
    "import": lambda mp, module: interrupt_import(mp, module),
    "weights": lambda mp, module: interrupt(mp, MappedFiles, "tensor"),  # every safetensors mmap goes through it
    "model": lambda mp, module: interrupt(mp, GLM4V, "__init__"),
    "tokenizer": lambda mp, module: interrupt(mp, Tokenizer, "apply_chat_template"),
    "plot": lambda mp, module: interrupt(mp, parity_report, "import_pyplot"),  # after parity ran: no handler of its own
}


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> Path:
    """The tiny fixture in the native layout, the source of `glm4v-convert --to hf`."""
    out = tmp_path_factory.mktemp("native") / "tiny"
    convert(TINY, out)
    return out


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    """The tiny fixture plus the stand-in remote code make-reference runs."""
    folder = tmp_path_factory.mktemp("standin") / "ckpt"
    shutil.copytree(TINY, folder)
    for src in STANDIN.glob("*.py"):
        shutil.copy(src, folder / src.name)
    return folder


def glm4v(*argv: str):
    return lambda tmp, paths: (cli.main, list(argv))


def parity_module(*argv: str):
    """`python -m glm4v_core.parity ARGS`, run in this process."""
    def run(_argv):
        with pytest.raises(SystemExit) as e:
            runpy.run_module("glm4v_core.parity", run_name="__main__")
        return e.value.code
    return lambda tmp, paths: (run, list(argv))


def converter(*extra: str, source: str = "tiny"):
    return lambda tmp, paths: (convert_cli.main, [str(paths[source]), str(tmp / "out" / "dst"), "--no-progress",
                                                  *extra])


COMMANDS = {  # name -> (prog, module it imports lazily, argv builder, moments it reaches)
    "generate": ("glm4v", "glm4v_core.generation.cli", glm4v("generate", "Hello", "--max-new-tokens", "2"),
                 ["import", "weights", "model", "tokenizer"]),
    "chat": ("glm4v", "glm4v_core.generation.cli", glm4v("chat", "--max-new-tokens", "2"),
             ["import", "weights", "model", "tokenizer"]),
    "parity": ("glm4v parity", "glm4v_core.parity.cli", glm4v("parity"), ["import", "weights", "model"]),
    "parity --grads": ("glm4v parity", "glm4v_core.parity.cli", glm4v("parity", "--grads"),
                       ["import", "weights", "model"]),
    "parity --plot": ("glm4v parity", "glm4v_core.parity.cli",
                      lambda tmp, paths: (cli.main, ["parity", "--plot", str(tmp / "out.png")]), ["plot"]),
    "python -m glm4v_core.parity": ("python -m glm4v_core.parity", "glm4v_core.parity.cli", parity_module(),
                                    ["import", "weights", "model"]),
    "python -m glm4v_core.parity --grads": ("python -m glm4v_core.parity", "glm4v_core.parity.cli",
                                            parity_module("--grads"), ["weights"]),
    "make-reference": ("glm4v make-reference", "glm4v_core.parity.make_reference_cli",
                       lambda tmp, paths: (cli.main, ["make-reference", "--checkpoint", str(paths["standin"]),
                                                      "--out", str(tmp / "out" / "ref"), "--trust-remote-code",
                                                      "--max-new-tokens", "2"]),
                       ["import", "tokenizer"]),
    "finetune": ("glm4v finetune", "glm4v_core.training.cli",
                 lambda tmp, paths: (cli.main, ["finetune", "--data", str(DATA), "--out", str(tmp / "out" / "run"),
                                                "--no-progress"]),
                 ["import", "weights", "model", "tokenizer"]),
    "glm4v-convert": ("glm4v-convert", "glm4v_conversion.convert", converter(), ["import", "weights"]),
    "glm4v-convert --to hf": ("glm4v-convert", "glm4v_conversion.convert", converter("--to", "hf", source="native"),
                              ["import", "weights"]),
    "glm4v-convert --quantize int8": ("glm4v-convert", "glm4v_conversion.quantize", converter("--quantize", "int8"),
                                      ["import", "weights"]),
    "glm4v-convert --quantize int4": ("glm4v-convert", "glm4v_conversion.quantize",
                                      converter("--quantize", "int4", "--group-size", "32"), ["import", "weights"]),
}
CASES = [(command, moment) for command, (_, _, _, moments) in COMMANDS.items() for moment in moments]


def assert_one_interrupted_line(err: str, prog: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith(f"{prog}: interrupted"), err


@pytest.mark.parametrize("command,moment", CASES, ids=[f"{c}-{m}" for c, m in CASES])
def test_ctrl_c_while_loading_is_one_line_exit_130_and_writes_nothing(command, moment, tmp_path, monkeypatch, capsys,
                                                                       request):
    prog, module, build, _ = COMMANDS[command]
    paths = {"tiny": TINY}
    if "--to hf" in command:
        paths["native"] = request.getfixturevalue("native")
    if command == "make-reference":
        request.getfixturevalue("hf_modules")
        paths["standin"] = request.getfixturevalue("standin")
    main, argv = build(tmp_path, paths)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))  # chat's one message
    monkeypatch.setattr(sys, "argv", [prog, *argv])  # python -m glm4v_core.parity reads it
    stand_in = MOMENTS[moment](monkeypatch, module)
    capsys.readouterr()
    try:
        code = main(argv)
    except KeyboardInterrupt:
        pytest.fail(f"the Ctrl-C escaped {command}")
    err = capsys.readouterr().err
    assert stand_in.fired, f"{command} never reached the {moment} moment (rc {code}): {err}"
    assert code == 130, err
    assert_one_interrupted_line(err, prog)
    assert sorted(os.listdir(tmp_path)) == [], os.listdir(tmp_path)  # not even the folder made for the output


def test_the_converters_choices_are_those_of_quantize_and_torch():
    """conversion/cli.py spells its choices to parse without importing torch: they must stay the real ones."""
    import torch

    from glm4v_conversion import quantize
    assert (convert_cli.SCHEMES, convert_cli.GROUP_SIZES, convert_cli.METHODS) == (
        quantize.SCHEMES, quantize.GROUP_SIZES, quantize.METHODS)
    assert all(isinstance(getattr(torch, name), torch.dtype) for name in convert_cli.DTYPE_NAMES)


def test_the_converter_parses_without_importing_torch():
    """A Ctrl-C during `import torch` can only be caught if torch loads inside main, not when the module does."""
    code = ("import sys, glm4v_conversion.cli as c\n"
            "c.build_parser().parse_args(['a', 'b', '--quantize', 'int4', '--dtype', 'float16'])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT_S)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- real processes, SIGINT inside `import torch`

SUBPROCESS = {  # name -> (prog, argv after `python`)
    "generate": ("glm4v", ["-m", "glm4v_core", "generate", "Hello"]),
    "chat": ("glm4v", ["-m", "glm4v_core", "chat"]),
    "parity": ("glm4v parity", ["-m", "glm4v_core", "parity"]),
    "parity --grads": ("glm4v parity", ["-m", "glm4v_core", "parity", "--grads"]),
    "python -m glm4v_core.parity": ("python -m glm4v_core.parity", ["-m", "glm4v_core.parity"]),
    "make-reference": ("glm4v make-reference", ["-m", "glm4v_core", "make-reference", "--checkpoint", str(TINY),
                                                "--out", "{out}", "--trust-remote-code"]),
    "finetune": ("glm4v finetune", ["-m", "glm4v_core", "finetune", "--data", str(DATA), "--out", "{out}"]),
    "glm4v-convert": ("glm4v-convert", ["-m", "glm4v_conversion", str(TINY), "{out}"]),
    "glm4v-convert --quantize": ("glm4v-convert", ["-m", "glm4v_conversion", str(TINY), "{out}", "--quantize", "int8"]),
}


@pytest.mark.parametrize("command", list(SUBPROCESS))
def test_sigint_while_importing_torch(command, tmp_path):
    prog, argv = SUBPROCESS[command]
    out = tmp_path / "out" / "dst"
    argv = [a.replace("{out}", str(out)) for a in argv]
    proc = subprocess.Popen([sys.executable, "-X", "importtime", *argv], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, end = [], time.monotonic() + WAIT_S
    try:
        for line in proc.stderr:  # an import line is printed as each module finishes: torch's own come first
            seen.append(line)
            if "| " in line and line.split("| ")[-1].strip().startswith("torch."):
                proc.send_signal(signal.SIGINT)
                break
            if time.monotonic() > end:
                break
        else:
            pytest.fail(f"{command} never imported torch: rc={proc.wait()} {''.join(seen)[-2000:]}")
        rest = proc.communicate(timeout=WAIT_S)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    err = "".join(line for line in [*seen, *rest.splitlines(True)] if not line.startswith("import time:"))
    assert proc.returncode == 130, err
    assert_one_interrupted_line(err, prog)
    assert not (tmp_path / "out").exists()
