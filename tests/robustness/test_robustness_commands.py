"""Commands: exit codes (1 refused input or failure, 2 usage), a closed or broken stdout, --device,
--seed, --temperature 0, --version, wrong parity references, strict --json."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers.paths import ROOT

from glm4v_conversion import __version__
from glm4v_conversion import cli as convert_cli
from glm4v_conversion.streams import WriteCounter, quiet_broken_pipe
from glm4v_core import cli
from glm4v_core.parity import cli as parity_cli
from glm4v_core.parity import grads as parity_grads
from glm4v_core.parity import multi_image as parity_multi_image
from glm4v_core.parity import quantized as parity_quantized
from glm4v_core.parity import run as parity_run
from glm4v_core.parity.compare import CaseReport, Stage

ROOT = str(ROOT)


def run(capsys, argv):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def no_model_load(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the weights were loaded before the error was found")
    monkeypatch.setattr(cli, "load_model", forbidden)
    for module in (parity_run, parity_multi_image, parity_quantized, parity_grads):
        monkeypatch.setattr(module, "load_model", forbidden)


# --- stdout closed or piped into a reader that went away --------------------------------------------

COMMANDS = {
    "generate": [sys.executable, "-m", "glm4v_core", "generate", "--max-new-tokens", "3", "hi"],
    "parity": [sys.executable, "-m", "glm4v_core", "parity"],
    "glm4v --help": [sys.executable, "-m", "glm4v_core", "--help"],
    "glm4v --version": [sys.executable, "-m", "glm4v_core", "--version"],
    "convert --help": [sys.executable, "-m", "glm4v_conversion", "--help"],
}


def _run_with_stdout(argv, how: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    if how == "closed":  # `cmd >&-`: fd 1 not open at all
        return subprocess.run(argv, stderr=subprocess.PIPE, text=True, timeout=120, env=env, cwd=tmp_path,
                              preexec_fn=lambda: os.close(1))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    proc.stdout.close()  # the reader is gone before anything is written: every write gets EPIPE
    _, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(argv, proc.returncode, None, err)


@pytest.mark.parametrize("how", ["closed", "broken_pipe"])
@pytest.mark.parametrize("command", COMMANDS)
def test_unwritable_stdout_exits_1_quietly(tmp_path, command, how):
    argv = COMMANDS[command]
    done = _run_with_stdout(argv, how, tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def test_convert_with_a_closed_stdout_still_converts_and_says_so_by_exit_code(fixtures_dir, tmp_path):
    argv = [sys.executable, "-m", "glm4v_conversion", str(fixtures_dir / "tiny"), str(tmp_path / "native"),
            "--no-progress"]
    done = _run_with_stdout(argv, "closed", tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert (tmp_path / "native" / "config.json").is_file()  # the files are complete; only the report was lost


class _Pipe:
    """A stream whose reader leaves after `ok` writes."""

    def __init__(self, ok: int):
        self.ok, self.text = ok, ""

    def write(self, text):
        if self.ok == 0:
            raise BrokenPipeError(32, "Broken pipe")
        self.ok -= 1
        self.text += text
        return len(text)

    def flush(self):
        pass

    def fileno(self):
        raise ValueError("no fd")


@pytest.mark.parametrize("ok,code", [(0, 1), (1, 0), (3, 0)])
def test_reader_leaving_midway_exits_0_if_something_was_written(monkeypatch, ok, code):
    monkeypatch.setattr(sys, "stdout", _Pipe(ok))
    with pytest.raises(SystemExit) as info:
        with quiet_broken_pipe() as out:
            for word in ("a", "b", "c", "d"):
                out.write(word)
    assert info.value.code == code


def test_write_counter_counts():
    pipe = _Pipe(10)
    out = WriteCounter(pipe)
    out.write("abc")
    assert out.written == 3 and pipe.text == "abc"


# --- arguments checked before anything loads ----------------------------------------------------------

@pytest.mark.parametrize("device,words", [("mps", "not supported"), ("xpu", "not supported"), ("meta", "not supported"),
                                          ("tpu0", "unknown device"), ("cuda:99", "cuda:99")])
def test_unusable_device_is_named(capsys, no_model_load, device, words):
    rc, _, err = run(capsys, ["generate", "--device", device, "hi"])
    assert rc == 1 and words in err and "Traceback" not in err, err
    rc, _, err = run(capsys, ["parity", "--device", device])
    assert rc == 1 and words in err, err


@pytest.mark.parametrize("seed", ["-1", str(2**64), str(10**30)])
def test_seed_out_of_range_is_refused_before_loading(capsys, no_model_load, seed):
    rc, _, err = run(capsys, ["generate", "--do-sample", "--seed", seed, "hi"])
    assert rc == 1 and "--seed must be in 0 .. 18446744073709551615" in err, err


@pytest.mark.parametrize("argv,words", [
    (["--temperature", "0", "--do-sample"], "--temperature must be > 0 with --do-sample"),
    (["--temperature", "-1", "--do-sample"], "--temperature must be > 0"),
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--temperature", "inf", "--do-sample"], "--temperature must be a finite number"),
    (["--top-p", "nan", "--do-sample"], "--top-p must be a finite number"),
    (["--repetition-penalty", "inf"], "--repetition-penalty must be a finite number"),
])
def test_bad_sampling_flags_are_refused_before_loading(capsys, no_model_load, argv, words):
    rc, _, err = run(capsys, ["generate", *argv, "hi"])
    assert rc == 1 and words in err, err


def test_temperature_0_without_do_sample_is_greedy(capsys):
    rc, greedy, err = run(capsys, ["generate", "--max-new-tokens", "5", "hi"])
    assert rc == 0, err
    rc, zero, err = run(capsys, ["generate", "--max-new-tokens", "5", "--temperature", "0", "hi"])
    assert rc == 0 and zero == greedy, err


def test_largest_seed_is_accepted(capsys):
    rc, _, err = run(capsys, ["generate", "--max-new-tokens", "2", "--do-sample", "--seed", str(2**64 - 1), "hi"])
    assert rc == 0, err


# --- exit codes, program names, --version ------------------------------------------------------------

@pytest.mark.parametrize("main,argv", [
    (cli.main, ["generate"]), (cli.main, ["generate", "--bogus", "hi"]), (cli.main, ["nope"]),
    (cli.main, ["generate", "--max-new-tokens", "many", "hi"]),
    (cli.main, ["parity", "--bogus"]), (cli.main, ["parity", "--dtype", "float64"]),
    (convert_cli.main, []), (convert_cli.main, ["a", "b", "--to", "gguf"]),
    (convert_cli.main, ["a", "b", "--max-shard-size", "-5"]),
])
def test_usage_errors_exit_2(capsys, main, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("main,argv,name", [(cli.main, ["--version"], "glm4v"),
                                            (cli.main, ["parity", "--version"], "glm4v parity"),
                                            (convert_cli.main, ["--version"], "glm4v-convert")])
def test_version(capsys, main, argv, name):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0 and capsys.readouterr().out == f"{name} {__version__}\n"


def test_parity_uses_the_glm4v_program_name(capsys):
    with pytest.raises(SystemExit):
        cli.main(["parity", "--help"])
    assert capsys.readouterr().out.startswith("usage: glm4v parity ")


def test_refused_inputs_exit_1_from_every_command(capsys, tmp_path, no_model_load):
    missing = str(tmp_path / "missing")
    assert cli.main(["generate", "--checkpoint", missing, "hi"]) == 1
    assert cli.main(["parity", "--checkpoint", missing]) == 1
    assert convert_cli.main([missing, str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("missing") >= 3 and "Traceback" not in err


# --- parity: the wrong reference file -----------------------------------------------------------------

def _no_logits(tmp_path, fixtures_dir):
    return fixtures_dir / "tiny" / "model-00002-of-00002.safetensors"  # a valid safetensors file, no cases


def _broken_json(tmp_path, fixtures_dir):
    (tmp_path / "reference.safetensors").symlink_to(fixtures_dir / "tiny" / "reference.safetensors")
    (tmp_path / "reference.json").write_text("{not json")
    return tmp_path / "reference.safetensors"


def _edited_reference(**changes):
    """The tiny reference with some tensors replaced (a reference made with other inputs or sizes)."""
    def make(tmp_path, fixtures_dir):
        from safetensors.torch import load_file, save_file
        ref = load_file(fixtures_dir / "tiny" / "reference.safetensors")
        ref.update({k: f(ref[k]).contiguous() for k, f in changes.items()})
        save_file(ref, tmp_path / "reference.safetensors")
        return tmp_path / "reference.safetensors"
    return make


REFERENCES = {
    "negative token id": (_edited_reference(input_ids_b=lambda t: t - 10_000), "tiny", "holds token id -"),
    "token id past the vocabulary": (_edited_reference(input_ids_b=lambda t: t + 10_000), "tiny", "outside this"),
    "four-channel pixels": (_edited_reference(pixel_values_a=lambda t: t.repeat(1, 2, 1, 1)[:, :4]), "tiny",
                            "vision_config.in_channels is 3"),
    "pixels of another size": (_edited_reference(pixel_values_a=lambda t: t[..., :28, :28]), "tiny",
                               "vision_config.image_size is 56"),
    "pixels of rank 3": (_edited_reference(pixel_values_a=lambda t: t[0]), "tiny",
                         "pixel_values_a has shape [3, 56, 56]"),
    "hidden states of another width": (_edited_reference(hidden_states_a=lambda t: t[..., :64]), "tiny",
                                       "hidden_size is 128"),
    "float token ids": (_edited_reference(input_ids_b=lambda t: t.float()), "tiny", "needs an integer input_ids_b"),
    "config.json given as the reference": (lambda t, f: f / "tiny" / "config.json", "tiny",
                                           "corrupt safetensors header"),
    "reference of another checkpoint": (lambda t, f: f / "narrow" / "reference.safetensors", "tiny",
                                        "was made for another model"),
    "checkpoint of another reference": (lambda t, f: f / "tiny" / "reference.safetensors", "narrow",
                                        "was made for another model"),
    "a shard, not a reference": (_no_logits, "tiny", "is not a parity reference"),
    "reference metadata not JSON": (_broken_json, "tiny", "reference.json: not valid JSON"),
    "missing reference": (lambda t, f: t / "nope.safetensors", "tiny", "nope.safetensors not found"),
}


@pytest.mark.parametrize("case", REFERENCES)
def test_wrong_reference_is_a_named_error(capsys, tmp_path, fixtures_dir, no_model_load, case):
    make, checkpoint, words = REFERENCES[case]
    reference = make(tmp_path, fixtures_dir)
    rc = parity_cli.main(["--checkpoint", str(fixtures_dir / checkpoint), "--reference", str(reference)])
    err = capsys.readouterr().err
    assert rc == 1 and words in err and "Traceback" not in err, err
    assert err.startswith("glm4v parity: error:")


def test_json_output_is_strict(capsys, monkeypatch):
    stage = Stage("logits", [1, 2, 3], float("inf"), float("nan"), 1e-4, False)
    monkeypatch.setattr(parity_cli, "run_parity", lambda *a, **k: [CaseReport("a", "shape differs", [stage])])

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    assert parity_cli.main(["--json"]) == 1
    out = json.loads(capsys.readouterr().out, parse_constant=no_constants)
    stage = out["cases"]["a"]["stages"][0]
    assert (stage["max_abs"], stage["max_rel"], out["cases"]["a"]["logits_max_abs"]) == ("inf", "nan", "inf")


@pytest.mark.gpu
def test_cuda_index_past_the_last_gpu_is_named(capsys, no_model_load):
    import torch
    device = f"cuda:{torch.cuda.device_count()}"
    rc, _, err = run(capsys, ["generate", "--device", device, "hi"])
    assert rc == 1 and f"only {torch.cuda.device_count()} CUDA device(s) exist" in err, err


@pytest.mark.gpu
def test_parity_json_on_cuda_is_strict(capsys):
    assert parity_cli.main(["--device", "cuda", "--json"]) == 0
    json.loads(capsys.readouterr().out, parse_constant=lambda name: pytest.fail(f"non-standard constant {name}"))
