"""--adapter on glm4v generate, chat and parity: the adapters of a `glm4v finetune` run (its --out folder
or the adapter file), applied as load_adapters applies them; a bad one is one named line, exit 1."""
import io

import pytest
import torch
from safetensors.torch import load_file, save_file

import glm4v_core
from glm4v_core import cli
from glm4v_core.config import BUNDLED_CHECKPOINT
from glm4v_core.generation.cli import shown
from glm4v_core.generation.streaming import stream_text
from glm4v_core.parity import cli as parity_cli
from glm4v_core.processing.tokenizer import resolve_tokenizer
from glm4v_core.transforms.adapter_files import ADAPTER_FILE, load_adapters, save_adapters
from glm4v_core.transforms.lora import LoRAConfig, add_lora, remove_lora

ARGV = ["generate", "--device", "cpu", "--max-new-tokens", "8", "Hello"]


@pytest.fixture(scope="module")
def run_out(tmp_path_factory):
    """A finetune --out folder as a LoRA run leaves it: OUT/adapter.safetensors (save_adapters, what
    the trainer calls), with adapters far from zero so that they change the answer."""
    out = tmp_path_factory.mktemp("run")
    model = glm4v_core.load_model(BUNDLED_CHECKPOINT)
    adapters = add_lora(model, LoRAConfig(rank=2, alpha=4.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for adapter in adapters.values():
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g))
    save_adapters(model, out / ADAPTER_FILE)
    return out


def api_answer(adapter=None) -> str:
    model = glm4v_core.load_model(BUNDLED_CHECKPOINT)
    if adapter is not None:
        load_adapters(model, adapter)
    tokenizer = resolve_tokenizer(None, BUNDLED_CHECKPOINT, model.config)
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}],
                                                      add_generation_prompt=True)])
    return "".join(stream_text(model, tokenizer, ids, max_new_tokens=8))


@pytest.mark.parametrize("as_file", [False, True])
def test_generate_with_an_adapter_answers_as_the_library_does(run_out, capsys, as_file):
    adapter = run_out / ADAPTER_FILE if as_file else run_out
    assert cli.main([*ARGV, "--adapter", str(adapter)]) == 0
    out = capsys.readouterr().out
    want = api_answer(run_out / ADAPTER_FILE)
    assert out == want + "\n"
    assert want != api_answer()  # the adapters matter: without them the answer differs


def test_chat_with_an_adapter_answers_as_the_library_does(run_out, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    assert cli.main(["chat", "--device", "cpu", "--max-new-tokens", "8", "--adapter", str(run_out)]) == 0
    assert capsys.readouterr().out == shown(api_answer(run_out / ADAPTER_FILE)) + "\n"  # as chat shows text


def bad_adapters(run_out, tmp_path) -> dict:
    empty = tmp_path / "empty"
    empty.mkdir()
    full = tmp_path / "full"
    (full / "model").mkdir(parents=True)
    tensors = load_file(run_out / ADAPTER_FILE)
    from safetensors import safe_open
    with safe_open(str(run_out / ADAPTER_FILE), "pt") as f:
        metadata = f.metadata()
    wrong = tmp_path / "wrong_shape.safetensors"
    save_file({k: (v[:1] if k.endswith("lora_A") else v) for k, v in tensors.items()}, str(wrong), metadata)
    return {"missing": (tmp_path / "nope", "does not exist"),
            "folder without adapters": (empty, f"has no {ADAPTER_FILE}"),
            "full fine-tune folder": (full, "full fine-tune"),
            "not an adapter": (BUNDLED_CHECKPOINT / "reference.safetensors", "not a glm4v-core adapter file"),
            "wrong shapes": (wrong, "has shape")}


@pytest.mark.parametrize("case", ["missing", "folder without adapters", "full fine-tune folder", "not an adapter",
                                  "wrong shapes"])
def test_a_bad_adapter_is_one_named_line_before_the_weights_load(run_out, tmp_path, capsys, monkeypatch, case):
    path, why = bad_adapters(run_out, tmp_path)[case]
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    assert cli.main([*ARGV, "--adapter", str(path)]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1, captured.err
    assert lines[0].startswith(f"glm4v: error: --adapter {path}: ") and why in lines[0], lines[0]


def test_adapter_and_tensor_parallel_are_refused(run_out, capsys):
    assert cli.main([*ARGV, "--tp", "2", "--adapter", str(run_out)]) == 1
    assert "--adapter does not go with --tp 2" in capsys.readouterr().err


@pytest.fixture(scope="module")
def adapted_reference(run_out, tmp_path_factory):
    """A reference of text case b recorded on the adapted model with its adapters merged into the
    weights (what glm4v make-reference on OUT/merged records; here our own fp32 forward stands in)."""
    ref = load_file(BUNDLED_CHECKPOINT / "reference.safetensors")
    model = glm4v_core.load_model(BUNDLED_CHECKPOINT)
    load_adapters(model, run_out / ADAPTER_FILE)
    remove_lora(model)  # merged
    with torch.no_grad():
        logits = model(ref["input_ids_b"]).logits
    path = tmp_path_factory.mktemp("ref") / "adapted.safetensors"
    save_file({"input_ids_b": ref["input_ids_b"], "logits_b": logits.contiguous()}, str(path))
    return path


def test_parity_with_the_adapter_matches_a_reference_of_the_adapted_model(run_out, adapted_reference, capsys):
    assert parity_cli.main(["--reference", str(adapted_reference), "--adapter", str(run_out)]) == 0
    assert parity_cli.main(["--reference", str(adapted_reference)]) == 1  # the base model does not match it
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("extra", [[], ["--grads"], ["--tp", "2"]])
def test_parity_adapter_without_an_adapted_reference_is_a_usage_error(run_out, adapted_reference, capsys, extra):
    reference = [] if extra == [] else ["--reference", str(adapted_reference)]
    with pytest.raises(SystemExit) as e:
        parity_cli.main(["--adapter", str(run_out), *reference, *extra])
    assert e.value.code == 2 and "--adapter" in capsys.readouterr().err


def test_parity_refuses_a_bad_adapter_by_name(run_out, adapted_reference, tmp_path, capsys):
    path, why = bad_adapters(run_out, tmp_path)["wrong shapes"]
    assert parity_cli.main(["--reference", str(adapted_reference), "--adapter", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why in err[0] and str(path) in err[0], err
