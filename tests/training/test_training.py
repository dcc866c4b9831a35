"""Training path: gradient parity with the HF reference, trainable loading, activation checkpointing,
random init, save_model round trips, and the training example of docs/training.md."""
import json
import re
import subprocess
import sys

import pytest
import torch
from helpers.paths import ROOT
from helpers.triton_env import needs_triton
from safetensors.torch import load_file, save_file

from glm4v_core import GLM4V, checkpoint, generate, load_model, save_model
from glm4v_core.model import ops as model_ops
from glm4v_core.model.init import InitError, init_parameters
from glm4v_core.parity import cli as parity_cli
from glm4v_core.parity import grads as parity_grads

BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]  # triton: kernels' forward and backward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fixture", ["tiny", "narrow"])
def test_gradients_match_the_reference(fixtures_dir, fixture, backend):
    """Loss within 1e-5 and every parameter's gradient within 1e-4 x its max-abs, cases a-d (full
    tensors where the fixture stores them, else each gradient's L2 norm and max-abs)."""
    with model_ops.use_backend(backend):
        reports = parity_grads.run_grad_parity(fixtures_dir / fixture)
    assert [r.name for r in reports] == ["a", "b", "c", "d"]
    for r in reports:
        assert r.loss_abs_err <= 1e-5, (r.name, r.loss_abs_err)
        assert r.grad_max_rel_err <= 1e-4, (r.name, r.worst_param, r.grad_max_rel_err)
        assert r.ok


def test_grad_parity_cli_json_and_exit_code(fixtures_dir, tmp_path, capsys):
    assert parity_cli.main(["--grads", "--json", "--checkpoint", str(fixtures_dir / "tiny")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and set(report["cases"]) == {"a", "b", "c", "d"}
    assert all(c["loss_abs_err"] <= 1e-5 and c["grad_max_rel_err"] <= 1e-4 for c in report["cases"].values())
    # a wrong reference loss must fail the tool (exit 1) and name the case
    bad = tmp_path / "tiny"
    bad.mkdir()
    for f in (fixtures_dir / "tiny").iterdir():
        (bad / f.name).symlink_to(f)
    (bad / "grads.json").unlink()
    meta = json.loads((fixtures_dir / "tiny" / "grads.json").read_text())
    meta["cases"]["b"]["loss"] += 1e-3
    meta["cases"]["d"]["grad_norm"]["transformer.output_layer.weight"] *= 1 + 2e-4  # a recorded norm, no tensor
    (bad / "grads.json").write_text(json.dumps(meta))
    assert parity_cli.main(["--grads", "--checkpoint", str(bad)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"\n  b .*FAIL", out) and re.search(r"\n  d .*transformer\.output_layer\.weight +FAIL", out)
    assert re.search(r"\n  a .* ok", out)
    # so must one full gradient tensor off by 2e-4 x its max-abs, named by its HF name
    (bad / "grads.json").unlink()
    (bad / "grads.json").symlink_to(fixtures_dir / "tiny" / "grads.json")
    grads = load_file(str(fixtures_dir / "tiny" / "grads.safetensors"))
    key = "grad_a.transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"
    grads[key][3, 5] += 2e-4 * grads[key].abs().max()
    (bad / "grads.safetensors").unlink()
    save_file(grads, str(bad / "grads.safetensors"))
    assert parity_cli.main(["--grads", "--checkpoint", str(bad)]) == 1
    assert re.search(r"\n  a .*layers\.1\.mlp\.dense_4h_to_h\.weight +FAIL", capsys.readouterr().out)


def test_load_model_is_frozen_until_asked(fixtures_dir):
    model = load_model(fixtures_dir / "tiny")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    grads = load_file(str(fixtures_dir / "tiny" / "grads.safetensors"))
    generate(model, grads["input_ids_b"][:, :8], max_new_tokens=2)  # inference first leaves nothing behind
    model.requires_grad_(True).train()
    pixels = load_file(str(fixtures_dir / "tiny" / "reference.safetensors"))["pixel_values_a"]
    model(grads["input_ids_a"], pixels, labels=grads["labels_a"]).loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while fn() runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_less(fixtures_dir):
    model = load_model(fixtures_dir / "narrow").requires_grad_(True)
    grads = load_file(str(fixtures_dir / "narrow" / "grads.safetensors"))
    pixels = load_file(str(fixtures_dir / "narrow" / "reference.safetensors"))["pixel_values_c"]
    args = (grads["input_ids_c"], pixels, grads["attention_mask_c"], grads["position_ids_c"])
    results = []
    for enabled in (False, True):
        model.gradient_checkpointing(enabled)
        model.zero_grad(set_to_none=True)
        out, kept = saved_bytes(lambda: model(*args, labels=grads["labels_c"]))
        out.loss.backward()
        results.append((out.loss.item(), kept, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss0, kept0, g0), (loss1, kept1, g1) = results
    assert loss0 == loss1
    assert kept1 < kept0 / 2, (kept0, kept1)  # the blocks' activations were not kept
    for name in g0:
        err = ((g0[name] - g1[name]).abs().max() / g0[name].abs().max()).item()
        assert err <= 1e-6, (name, err)


def test_from_config_initializes_every_parameter_by_the_scheme(fixtures_dir):
    config = load_model(fixtures_dir / "narrow").config
    a, b = GLM4V.from_config(config, seed=1), GLM4V.from_config(config, seed=1)
    other = GLM4V.from_config(config, seed=2)
    sa, sb, so = a.state_dict(), b.state_dict(), other.state_dict()
    assert all(torch.equal(sa[n], sb[n]) for n in sa)
    assert not torch.equal(sa["text.layers.0.mlp.down.weight"], so["text.layers.0.mlp.down.weight"])
    assert a.training and all(p.requires_grad for p in a.parameters())
    down = sa["text.layers.0.mlp.down.weight"]  # fan_in = ffn = 688
    assert abs(down.std().item() * config.ffn_hidden_size ** 0.5 - 1) < 0.02
    assert abs(sa["text.embed.weight"].std().item() - 1) < 0.02
    assert torch.equal(sa["text.final_norm.weight"], torch.ones(config.hidden_size))
    assert not sa["text.layers.0.attn.qkv.bias"].any() and not sa["vision.layers.0.attn_norm.bias"].any()
    with torch.no_grad():
        logits = a(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all() and 0.3 < logits.std().item() < 3


def test_a_parameter_without_an_init_rule_is_refused(fixtures_dir):
    model = GLM4V.from_config(load_model(fixtures_dir / "tiny").config)
    model.text.extra = torch.nn.Parameter(torch.empty(3))  # a fork's new parameter
    with pytest.raises(InitError, match="text.extra"):
        init_parameters(model, seed=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["hf", "native"])
def test_save_model_round_trips_bit_exactly(fixtures_dir, tmp_path, layout, dtype):
    model = load_model(fixtures_dir / "tiny", dtype=dtype)
    with torch.no_grad():  # a trained model: weights no checkpoint file holds
        model.text.lm_head.weight.add_(0.125)
    out = save_model(model, tmp_path / "out", layout=layout, max_shard_size=400_000)
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 2
    names = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert all(n.startswith("transformer.") == (layout == "hf") for n in names)
    back = load_model(out, dtype=dtype)
    for name, t in model.state_dict().items():
        assert torch.equal(t.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           back.state_dict()[name].view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), name
    config = json.loads((out / "config.json").read_text())
    source = json.loads((fixtures_dir / "tiny" / "config.json").read_text())
    assert config["auto_map"] == source["auto_map"]
    assert config["torch_dtype"] == str(dtype).removeprefix("torch.")
    assert {k: v for k, v in config.items() if k != "torch_dtype"} == \
        {k: v for k, v in source.items() if k != "torch_dtype"}
    with pytest.raises(checkpoint.SaveError, match="already exists"):
        save_model(model, out, layout=layout)


def test_save_model_is_atomic(fixtures_dir, tmp_path, monkeypatch):
    model = load_model(fixtures_dir / "tiny")
    calls = []

    def failing_write(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write(path, *args, **kwargs)
    real_write = checkpoint.write_file
    monkeypatch.setattr(checkpoint, "write_file", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, tmp_path / "out", max_shard_size=400_000)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a half-written sibling


def training_doc_example() -> str:
    """The first python block of docs/training.md's "Train from Python" section."""
    text = (ROOT / "docs" / "training.md").read_text()
    section = text.split("## Train from Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_training_doc_example_runs_and_overfits(tmp_path):
    code = training_doc_example()
    assert len(code.splitlines()) <= 30
    # in an empty folder, as a reader runs it: the demo checkpoint ships in the package
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    loss = float(re.search(r"loss after \d+ steps: ([\d.]+)", run.stdout).group(1))
    assert loss < 0.05, run.stdout
    assert "answer: [301, 302, 303, 304]" in run.stdout
    assert load_model(tmp_path / "tiny-finetuned").config.vocab_size == 1024


@pytest.mark.gpu
@pytest.mark.parametrize("fixture", ["tiny", "narrow"])
def test_gradients_match_the_reference_on_cuda(fixtures_dir, fixture):
    """The default CUDA path (Triton RMSNorm forward + backward, TF32 off): same bound as on CPU."""
    if not torch.cuda.is_available():
        pytest.fail("the gpu marker needs a CUDA device")
    reports = parity_grads.run_grad_parity(fixtures_dir / fixture, device="cuda")
    bad = [(r.name, r.loss_abs_err, r.worst_param, r.grad_max_rel_err) for r in reports if not r.ok]
    assert not bad, bad


def test_save_over_the_folder_it_was_loaded_from_and_a_from_config_model(fixtures_dir, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for f in ("config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
              "model-00002-of-00002.safetensors"):
        (folder / f).write_bytes((fixtures_dir / "tiny" / f).read_bytes())
    model = load_model(folder)  # parameters are memory maps of the files about to be replaced
    want = {n: t.clone() for n, t in model.state_dict().items()}
    save_model(model, folder, layout="native", overwrite=True)
    back = load_model(folder)
    assert all(torch.equal(want[n], t) for n, t in back.state_dict().items())
    fresh = GLM4V.from_config(model.config, seed=3, dtype=torch.bfloat16)
    save_model(fresh, tmp_path / "fresh", layout="hf")
    again = load_model(tmp_path / "fresh", dtype=torch.bfloat16)
    assert all(torch.equal(fresh.state_dict()[n], t) for n, t in again.state_dict().items())
    assert again.config == model.config
