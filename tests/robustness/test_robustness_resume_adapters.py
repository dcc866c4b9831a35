"""Resume is honest, adapters are checked before they touch the model.

- `glm4v finetune --resume` refuses a checkpoint whose run trained from another base checkpoint,
  --data or --eval-data (trainer.json keeps their sha256 under `sources`), naming what changed; a
  damaged checkpoint (trainer.json keys missing or of the wrong type, a step that is negative or not
  an integer, truncated or replaced safetensors, RNG states of the wrong shape or dtype, optimizer
  moments of the wrong shape, non-finite tensors) is one line naming the file and the key, exit 1.
- `load_adapters` checks the metadata and every tensor before it changes the model: a refused
  file leaves the model's state_dict exactly as it was, adapters or not.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.paths import FIXTURES
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from glm4v_core import load_model
from glm4v_core.training import cli as training_cli
from glm4v_core.transforms import adapter_files, lora
from glm4v_core.transforms.lora import LoRAConfig, LoRAError

TINY = FIXTURES / "tiny"
DATA = FIXTURES / "finetune" / "train.jsonl"
EVAL = FIXTURES / "finetune" / "eval.jsonl"


# -- resume ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 2-step run from copies of the base checkpoint and the data, checkpointed at steps 1 and 2."""
    tmp = tmp_path_factory.mktemp("resume")
    copy_sources(tmp)
    assert finetune(tmp, tmp / "out", "--max-steps", "2", "--save-every", "1") == 0
    return tmp


def copy_sources(tmp: Path) -> None:
    """base/, finetune/{train,eval}.jsonl and images/ (the records name ../images/...)."""
    shutil.copytree(TINY, tmp / "base")
    shutil.copytree(FIXTURES / "images", tmp / "images")
    (tmp / "finetune").mkdir()
    shutil.copy(DATA, tmp / "finetune" / "train.jsonl")
    shutil.copy(EVAL, tmp / "finetune" / "eval.jsonl")


def finetune(src: Path, out: Path, *args: str, data: Path | None = None, eval_data: Path | None = None,
             base: Path | None = None) -> int:
    data, eval_data = data or src / "finetune" / "train.jsonl", eval_data or src / "finetune" / "eval.jsonl"
    return training_cli.main(["--data", str(data), "--eval-data", str(eval_data), "--checkpoint",
                              str(base or src / "base"), "--out", str(out), "--no-progress", "--lr", "1e-2", *args])


def edit_json(path: Path, change) -> None:
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state))


def edit_tensors(path: Path, change) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, str(path), metadata=meta)


def first(tensors: dict, suffix: str) -> str:
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def set_key(key, value):
    return lambda s: s.__setitem__(key, value)


def nan_first(suffix):
    def change(t):
        k = first(t, suffix)
        t[k] = t[k].clone()
        t[k].view(-1)[0] = float("nan")
    return change


DAMAGED = {  # case: (file, how it is damaged, words the message must hold)
    "step missing": ("trainer.json", lambda s: s.pop("step"), "'step'"),
    "step negative": ("trainer.json", set_key("step", -1), "'step'"),
    "step not an integer": ("trainer.json", set_key("step", 1.5), "'step'"),
    "step a string": ("trainer.json", set_key("step", "1"), "'step'"),
    "step past the end": ("trainer.json", set_key("step", 9), "'step'"),
    "args not an object": ("trainer.json", set_key("args", [1]), "'args'"),
    "sources missing": ("trainer.json", lambda s: s.pop("sources"), "'sources'"),
    "param_groups not a list": ("trainer.json", set_key("param_groups", {}), "'param_groups'"),
    "param group key unknown": ("trainer.json", lambda s: s["param_groups"][0].update(bogus=1), "'bogus'"),
    "param group lr a string": ("trainer.json", lambda s: s["param_groups"][0].update(lr="fast"), "'lr'"),
    "trainer.json not JSON": ("trainer.json", "{", "trainer.json"),
    "trainable truncated": ("trainable.safetensors", "truncate", "trainable.safetensors"),
    "optimizer replaced": ("optimizer.safetensors", "replace", "optimizer.safetensors"),
    "rng replaced": ("rng.safetensors", "replace", "rng.safetensors"),
    "rng dtype": ("rng.safetensors", lambda t: t.update(cpu=t["cpu"].float()), "'cpu'"),
    "rng shape": ("rng.safetensors", lambda t: t.update(cpu=t["cpu"][:100]), "'cpu'"),
    "rng cpu missing": ("rng.safetensors", lambda t: t.update(gpu=t.pop("cpu")), "'cpu'"),
    "moment shape": ("optimizer.safetensors",
                     lambda t: t.update({first(t, ".exp_avg"): t[first(t, ".exp_avg")][:1]}), ".exp_avg'"),
    "moment dtype": ("optimizer.safetensors",
                     lambda t: t.update({first(t, ".exp_avg_sq"): t[first(t, ".exp_avg_sq")].double()}), "dtype"),
    "moment non-finite": ("optimizer.safetensors", nan_first(".exp_avg"), "non-finite"),
    "optimizer step missing": ("optimizer.safetensors", lambda t: t.pop(first(t, ".step")), ".step"),
    "optimizer key unknown": ("optimizer.safetensors", lambda t: t.update(bogus=torch.zeros(1)), "'bogus'"),
    "trained non-finite": ("trainable.safetensors", nan_first(".lora_B"), "non-finite"),
    "trained dtype": ("trainable.safetensors",
                      lambda t: t.update({first(t, ".lora_A"): t[first(t, ".lora_A")].double()}), "dtype"),
    "trained shape": ("trainable.safetensors",
                      lambda t: t.update({first(t, ".lora_A"): t[first(t, ".lora_A")].T.contiguous()}), "shape"),
}


def refused_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_key(run_dir, tmp_path, capsys, case):
    name, damage, words = DAMAGED[case]
    folder = tmp_path / "step-000001"
    shutil.copytree(run_dir / "out" / "checkpoints" / "step-000001", folder)
    path = folder / name
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-40])
    elif damage == "replace":
        path.write_text("not a safetensors file\n")
    elif isinstance(damage, str):
        path.write_text(damage)
    elif name.endswith(".json"):
        edit_json(path, damage)
    else:
        edit_tensors(path, damage)
    capsys.readouterr()
    assert finetune(run_dir, tmp_path / "out", "--max-steps", "2", "--save-every", "1", "--resume", str(folder)) == 1
    line = refused_line(capsys)
    assert name in line and words in line and "Traceback" not in line, line
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())  # refused before any file was written


def changed_data(run_dir: Path, tmp: Path) -> dict:
    copy_sources(tmp)
    path = tmp / "finetune" / "train.jsonl"
    path.write_text(path.read_text() + path.read_text().splitlines()[-1] + "\n")  # one more record
    return {"data": path}


def changed_eval(run_dir: Path, tmp: Path) -> dict:
    copy_sources(tmp)
    path = tmp / "finetune" / "eval.jsonl"
    path.write_text(path.read_text() * 2)
    return {"eval_data": path}


def changed_base(run_dir: Path, tmp: Path) -> dict:
    """Same weights, another header (metadata): the fingerprint is content-based, not the path."""
    shutil.copytree(run_dir / "base", tmp / "base")
    shard = sorted((tmp / "base").glob("model*.safetensors"))[0]
    with safe_open(str(shard), framework="pt") as f:
        meta = f.metadata() or {}
    save_file(load_file(shard), str(shard), metadata={**meta, "edited": "yes"})
    return {"base": tmp / "base"}


CHANGED = {"data": (changed_data, "--data"), "eval data": (changed_eval, "--eval-data"),
           "base checkpoint": (changed_base, "the base checkpoint")}


@pytest.mark.parametrize("case", list(CHANGED))
def test_a_resume_from_other_files_is_refused_naming_what_changed(run_dir, tmp_path, capsys, case):
    make, words = CHANGED[case]
    files = make(run_dir, tmp_path)
    capsys.readouterr()
    resume = str(run_dir / "out" / "checkpoints" / "step-000001")
    assert finetune(run_dir, tmp_path / "out", "--max-steps", "2", "--save-every", "1", "--resume", resume,
                    **files) == 1
    line = refused_line(capsys)
    assert words in line and "differ from what the interrupted run trained from" in line, line


def test_the_same_files_elsewhere_resume(run_dir, tmp_path):
    copy_sources(tmp_path)
    resume = str(run_dir / "out" / "checkpoints" / "step-000001")
    assert finetune(tmp_path, tmp_path / "out", "--max-steps", "2", "--save-every", "1", "--resume", resume) == 0


# -- adapters -------------------------------------------------------------------------------------

CONFIG = LoRAConfig(rank=2, alpha=4.0, targets=("text.layers.*.attn.qkv", "projector.glu.up"))


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory) -> Path:
    model = load_model(TINY)
    lora.add_lora(model, CONFIG, seed=1)
    with torch.no_grad():
        for adapter in lora.adapters_of(model).values():
            adapter.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    return adapter_files.save_adapters(model, tmp_path_factory.mktemp("adapters") / "adapter.safetensors")


def config_json(**change) -> str:
    fields = {**json.loads(CONFIG.to_json()), **change}
    return json.dumps({k: v for k, v in fields.items() if v is not DROP})


DROP = object()


def meta_case(**meta):
    return lambda t, m: m.update(meta)


def tensor_case(change):
    def apply(t, m):
        change(t)
    return apply


BAD_ADAPTERS = {
    "unknown config key": meta_case(lora_config=config_json(bias="none")),
    "config not JSON": meta_case(lora_config="{rank: 2"),
    "config not an object": meta_case(lora_config="[2]"),
    "config missing": lambda t, m: m.pop("lora_config"),
    "alpha missing": meta_case(lora_config=config_json(alpha=DROP)),
    "alpha nan": meta_case(lora_config=config_json(alpha=float("nan"))),
    "alpha inf": meta_case(lora_config=config_json(alpha=float("inf"))),
    "alpha zero": meta_case(lora_config=config_json(alpha=0)),
    "alpha negative": meta_case(lora_config=config_json(alpha=-1.0)),
    "rank a bool": meta_case(lora_config=config_json(rank=True)),
    "rank mismatch": meta_case(lora_config=config_json(rank=3)),
    "targets match nothing": meta_case(lora_config=config_json(targets=["text.nothing"])),
    "format missing": lambda t, m: m.pop("format"),
    "tensor shape": tensor_case(lambda t: t.update({first(t, "lora_A"): t[first(t, "lora_A")][:1]})),
    "tensor dtype": tensor_case(lambda t: t.update({first(t, "lora_B"): t[first(t, "lora_B")].to(torch.int32)})),
    "tensor nan": tensor_case(nan_first("lora_B")),
    "tensor inf": tensor_case(lambda t: t.update({first(t, "lora_A"): t[first(t, "lora_A")] * float("inf")})),
    "tensor missing": tensor_case(lambda t: t.pop(first(t, "lora_A"))),
    "tensor unexpected": tensor_case(lambda t: t.update({"text.lm_head.lora_A": torch.zeros(2, 2)})),
    "truncated": "truncate",
    "not safetensors": "replace",
}


def bad_file(source: Path, dst: Path, case: str) -> Path:
    damage = BAD_ADAPTERS[case]
    if damage == "truncate":
        dst.write_bytes(source.read_bytes()[:-64])
    elif damage == "replace":
        dst.write_text("{}\n")
    else:
        with safe_open(str(source), framework="pt") as f:
            meta = dict(f.metadata())
        tensors = load_file(source)
        damage(tensors, meta)
        save_file(tensors, str(dst), metadata=meta)
    return dst


def snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("start", ["base model", "adapted model"])
@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_a_refused_adapter_file_leaves_the_model_as_it_was(adapter_file, tmp_path, case, start):
    model = load_model(TINY)
    if start == "adapted model":
        lora.add_lora(model, CONFIG, seed=5)
    before, config = snapshot(model), getattr(model, "lora_config", None)
    path = bad_file(adapter_file, tmp_path / "bad.safetensors", case)
    with pytest.raises(LoRAError, match="bad.safetensors|matches no Linear") as e:
        adapter_files.load_adapters(model, path)
    assert "\n" not in str(e.value)
    after = snapshot(model)
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before), case
    assert getattr(model, "lora_config", None) == config
    assert len(lora.adapters_of(model)) == (0 if start == "base model" else len(lora.adapters_of(model)))


def test_a_good_adapter_file_still_loads_into_both(adapter_file):
    for adapted in (False, True):
        model = load_model(TINY)
        if adapted:
            lora.add_lora(model, CONFIG, seed=5)
        adapter_files.load_adapters(model, adapter_file)
        expected = load_file(adapter_file)
        assert all(torch.equal(t, expected[k]) for k, t in lora.adapter_state(model).items())
