"""The memory planner (glm4v finetune --plan, glm4v memory): predictions against measured trainer steps,
the JSON, the fit search, the flags, and the memory fixes it found (frozen ViT without a graph, QLoRA
without dense weight copies)."""
import json
import sys
from pathlib import Path

import pytest
import torch
from helpers.paths import BENCHMARKS, FIXTURES

from glm4v_core import BUNDLED_CHECKPOINT, GLM4V, GLM4VConfig, cli, save_model
from glm4v_core.model import ops
from glm4v_core.training import memory_cli, memory_search
from glm4v_core.training.memory_plan import TrainingRequest, plan_inference, plan_training
from glm4v_core.transforms import quant

sys.path.insert(0, str(BENCHMARKS))
import memory_plan as bench  # noqa: E402  (benchmarks/memory_plan.py: the measurement the benchmark records)

MiB = 2**20


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The bundled demo checkpoint, its int4 copy, and a one-sample JSONL (an image + ~60 text tokens)."""
    from glm4v_conversion.quantize import quantize_checkpoint
    root = tmp_path_factory.mktemp("memory")
    quantize_checkpoint(BUNDLED_CHECKPOINT, root / "tiny-int4", "int4", 128)
    data = root / "one.jsonl"
    data.write_text(json.dumps({"messages": [
        {"role": "user", "content": "What is in the picture?", "image": str(FIXTURES / "images" /
                                                                            "gradient_rgb_97x61.png")},
        {"role": "assistant", "content": " ".join(["a smooth red to blue gradient"] * 10)}]}) + "\n")
    return {"float": BUNDLED_CHECKPOINT, "int4": root / "tiny-int4", "data": data, "root": root}


def predicted_and_measured(checkpoint: Path, data: Path, out: Path, **flags) -> tuple[int, dict]:
    plan = plan_training(TrainingRequest(checkpoint=checkpoint, data=data, device="cpu", **flags))
    return plan.run_peak_bytes, bench.measure_trainer(checkpoint, data, out, flags)


@pytest.mark.parametrize("mode, flags", [
    ("float", {"lora_rank": 8}), ("float", {"lora_rank": 8, "gradient_checkpointing": True}),
    ("float", {"lora_rank": 0}), ("float", {"lora_rank": 0, "gradient_checkpointing": True}),
    ("int4", {"lora_rank": 8}), ("int4", {"lora_rank": 8, "gradient_checkpointing": True})],
    ids=["lora", "lora-ckpt", "full", "full-ckpt", "qlora", "qlora-ckpt"])
def test_the_plan_is_within_10_percent_of_two_measured_trainer_steps(folders, tmp_path, mode, flags):
    predicted, measured = predicted_and_measured(folders[mode], folders["data"], tmp_path / "out", **flags)
    assert abs(predicted / measured["measured_bytes"] - 1) < 0.10, (predicted, measured)
    assert abs(predicted / measured["measured_tensor_bytes"] - 1) < 0.01, (predicted, measured)


@pytest.mark.slow
def test_the_plan_of_the_mid_size_model_matches_a_measured_step(tmp_path):
    """~40 s on 2 cores: the mid-size random model (benchmarks/generate.py), saved, then LoRA with checkpointing."""
    sys.path.insert(0, str(BENCHMARKS))
    from generate import mid_size_config
    folder = tmp_path / "mid"
    save_model(GLM4V.from_config(GLM4VConfig.from_hf(mid_size_config()), seed=0), folder, dtype=torch.bfloat16)
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "a red gradient " * 30}]}) + "\n")
    predicted, measured = predicted_and_measured(folder, data, tmp_path / "out", gradient_checkpointing=True)
    assert measured["measured_bytes"] > 20 * MiB  # a real step of a real size: the match is not an accident
    assert abs(predicted / measured["measured_bytes"] - 1) < 0.10, (predicted, measured)


def test_checkpointing_and_the_frozen_vit_shrink_the_plan_as_measured():
    plain = plan_training(TrainingRequest(device="cpu"))
    ckpt = plan_training(TrainingRequest(device="cpu", gradient_checkpointing=True))
    assert ckpt.components["recomputed_layer"] > 0 and plain.components["recomputed_layer"] == 0
    assert ckpt.components["activations_kept"] < plain.components["activations_kept"] / 4
    assert sum(plain.components.values()) == plain.peak_bytes


def test_cuda_plans_the_triton_ops_not_the_cpu_references(monkeypatch):
    """The CUDA plan runs the Triton custom ops (attention keeps O and the log-sum-exp, K/V never
    expanded to the query heads): their register_fake, never the torch references the CPU runs."""
    called = []
    real = ops._planned_op
    monkeypatch.setattr(ops, "_planned_op", lambda name: called.append(name) or real(name))
    monkeypatch.setattr(ops.K, "attention_ref", lambda *a, **k: pytest.fail("the CPU attention was planned"))
    cuda = plan_training(TrainingRequest(device="cuda", train="vision,decoder", text_tokens=8))
    assert {"attention", "rms_norm", "add_rms_norm"} <= set(called)
    assert cuda.components["cuda_overhead"] >= 512 * MiB
    called.clear()
    monkeypatch.undo()
    cpu = plan_training(TrainingRequest(device="cpu", text_tokens=8))
    assert not called and cpu.components["cuda_overhead"] == 0


def test_finetune_plan_json_on_the_bundled_demo(capsys):
    assert cli.main(["finetune", "--plan", "--json", "--device-memory", "1GiB"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is True and "needs_bytes" not in out
    assert sum(out["components"].values()) == out["peak_bytes"] > out["components"]["cuda_overhead"] > 0
    assert set(out["components"]) == set(memory_cli_components())


def memory_cli_components():
    from glm4v_core.training.memory import TRAINING_COMPONENTS
    return TRAINING_COMPONENTS


def test_does_not_fit_says_what_it_needs_and_which_switches_fit(capsys):
    args = ["finetune", "--plan", "--device", "cpu", "--plan-text-tokens", "512", "--lora-rank", "0"]
    assert cli.main([*args, "--json"]) == 0
    asked = json.loads(capsys.readouterr().out)["peak_bytes"]
    ckpt = plan_training(TrainingRequest(device="cpu", text_tokens=512, lora_rank=0, gradient_checkpointing=True))
    between = (asked + ckpt.peak_bytes) // 2
    assert cli.main([*args, "--json", "--device-memory", str(between)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and out["needs_bytes"] == asked
    assert out["suggestion"]["fits"] and out["suggestion"]["peak_bytes"] <= between
    assert out["suggestion"]["flags"] == ["--gradient-checkpointing"]  # the cheapest switch that is enough
    assert cli.main([*args, "--device-memory", "1MiB"]) == 0
    text = capsys.readouterr().out
    assert "does not fit 1.00 MiB: needs" in text and "with every switch" in text


def test_the_search_plans_the_cheapest_set_that_fits_and_no_set_that_cannot():
    """Two switches with made-up costs and peaks: a (levels 0-2, cost 1 each, -10 a level) and b (levels
    0-1, cost 5, -30). At 65 only a >= 1 with b = 1 fits; (0, 0) and (1, 0) must never be planned."""
    from dataclasses import dataclass, replace

    from glm4v_core.training.memory import Plan

    @dataclass(frozen=True)
    class R:
        a: int = 0
        b: int = 0

    planned = []

    def plan(r):
        planned.append((r.a, r.b))
        return Plan("training", "cpu", "", {"weights": 100 - 10 * r.a - 30 * r.b}, 0)

    switches = [memory_search.Switch(n, [{n: i} for i in range(k)], tuple(c * i for i in range(k)),
                                     [f"{n}{i}" for i in range(k)], [[f"--{n} {i}"] for i in range(k)])
                for n, k, c in (("a", 3, 1), ("b", 2, 5))]
    fit = memory_search.search(65, plan(R()), R(), switches, plan)
    assert fit.flags == ["--a 1", "--b 1"] and fit.best.peak_bytes == 60 and fit.fits_with_switches
    assert (1, 0) not in planned and planned.count((0, 0)) == 1  # (0, 0): the plan as asked
    planned.clear()
    fit = memory_search.search(40, plan(R()), R(), switches, plan)
    assert not fit.fits_with_switches and fit.best.peak_bytes == 50 and planned == [(0, 0), (2, 1)]
    assert replace(R(), a=1) == R(1, 0)


@pytest.mark.parametrize("size, expected", [("24GiB", 24 * 2**30), ("24G", 24 * 2**30), ("24GB", 24 * 10**9),
                                            ("1.5 TiB", int(1.5 * 2**40)), ("8000", 8000), ("512mib", 512 * MiB)])
def test_sizes(size, expected):
    assert memory_cli.parse_size(size) == expected


@pytest.mark.parametrize("argv", [["finetune", "--plan", "--device-memory", "24 parsecs"],
                                  ["memory", "--device-memory", "0GB"], ["memory", "--device-memory=-3G"]])
def test_a_bad_device_memory_is_one_usage_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--device-memory" in err and "24GiB" in err and "Traceback" not in err


def test_a_run_needs_data_and_out_and_plan_flags_need_plan(capsys, tmp_path):
    for argv, words in ((["finetune"], "--data, --out (only --plan runs without them)"),
                        (["finetune", "--data", "x.jsonl", "--out", str(tmp_path), "--quantize", "int4"],
                         "--quantize goes with --plan: to train on a quantized base")):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2 and words in capsys.readouterr().err


def test_memory_on_a_folder_holding_only_config_json(tmp_path, capsys):
    """No weight is read: a config.json alone is enough, as a folder or as the file."""
    (tmp_path / "config.json").write_text((BUNDLED_CHECKPOINT / "config.json").read_text())
    assert cli.main(["memory", "--checkpoint", str(tmp_path), "--max-new-tokens", "64", "--quantize", "int4"]) == 0
    text = capsys.readouterr().out
    assert "int4 weights" in text and "64 new tokens" in text and "predicted peak" in text
    assert cli.main(["memory", "--checkpoint", str(tmp_path / "config.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "inference"
    assert cli.main(["finetune", "--plan", "--checkpoint", str(tmp_path), "--gradient-checkpointing"]) == 0
    assert "gradient checkpointing" in capsys.readouterr().out


def test_refused_plans_are_one_line(tmp_path, capsys):
    assert cli.main(["memory", "--checkpoint", str(tmp_path)]) == 1  # no config.json
    assert cli.main(["finetune", "--plan", "--train", "eyes"]) == 1
    assert cli.main(["finetune", "--plan", "--plan-text-tokens", "0"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and "--train 'eyes'" in lines[1] and "--plan-text-tokens must be >= 1" in lines[2]


def test_inference_plan_counts_the_static_kv_cache():
    plan = plan_inference(memory_plan_request(max_new_tokens=2016))  # long: the peak holds the cache
    c = GLM4VConfig.from_json(BUNDLED_CHECKPOINT / "config.json")
    slots = plan.sample_rows + 2016
    assert plan.components["kv_cache"] == c.num_layers * 2 * c.num_kv_groups * slots * c.head_dim * 4  # fp32 K, V


def memory_plan_request(**kw):
    from glm4v_core.training.memory_plan import InferenceRequest
    return InferenceRequest(device="cpu", **kw)


def test_the_mirrored_choices_are_the_library_ones():
    from glm4v_conversion.quantize import SCHEMES
    from glm4v_core.training.config import DTYPE_CHOICES
    assert memory_cli.QUANTIZE == SCHEMES and set(DTYPE_CHOICES) <= set(memory_cli.PLAN_DTYPES)


# --- what the planner found ---------------------------------------------------------------------------

def test_a_frozen_vit_runs_without_a_graph_and_a_trained_one_with(folders):
    seen = []
    for train in ("decoder", "vision"):
        model = GLM4V.from_config(GLM4VConfig.from_json(BUNDLED_CHECKPOINT / "config.json"))
        model.requires_grad_(False)
        getattr(model, {"decoder": "text", "vision": "vision"}[train]).requires_grad_(True)
        handle = model.vision.register_forward_pre_hook(lambda *_: seen.append(torch.is_grad_enabled()))
        c = model.config
        ids = torch.tensor([[c.boi_token_id, c.pad_token_id, c.eoi_token_id, 5, 6]])
        model(ids, torch.zeros(1, 3, c.vision.image_size, c.vision.image_size), labels=ids).loss.backward()
        handle.remove()
    assert seen == [False, True]


def test_qlora_keeps_no_dense_weight_for_backward(monkeypatch):
    """DequantizedMatmul: the gradient of the reference's product, without keeping dequant(W), which
    is made again in backward a few rows at a time (here 16 of 64)."""
    monkeypatch.setattr(ops, "DEQUANTIZE_ROWS", 16)
    torch.manual_seed(0)
    layer = quant.QuantLinear.from_linear(torch.nn.Linear(256, 64), "int4", 128)
    x = torch.randn(3, 256, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y = layer(x)
    assert all(t.dtype in (torch.uint8, torch.bfloat16) and t.numel() <= 64 * 128 for t in kept), \
        [(t.dtype, t.shape) for t in kept]
    (grad,) = torch.autograd.grad(y.sum(), x)
    with ops.use_backend("torch"), torch.no_grad():
        w = layer.dequantized_weight(torch.float32)
    torch.testing.assert_close(grad, torch.ones(3, 64) @ w, rtol=0, atol=0)


def test_dequantized_weight_by_row_chunks_is_the_whole_dequantization(monkeypatch):
    from glm4v_conversion.quantize import dequantize
    layer = quant.QuantLinear.from_linear(torch.nn.Linear(128, 40), "int4", 32)
    monkeypatch.setattr(ops, "DEQUANTIZE_ROWS", 16)  # 40 rows: three chunks, the last a short one
    whole = dequantize(dict(layer.named_buffers()), 32).to(torch.bfloat16)
    assert torch.equal(layer.dequantized_weight(torch.bfloat16), whole)


def test_a_quantized_head_enters_the_loss_chunk_by_chunk_never_whole(monkeypatch):
    """The chunked loss over a QuantLinear head dequantizes one vocabulary chunk at a time (in
    forward and again in backward) and keeps none of it for backward; loss and gradient are those
    of the dense dequantized weight, bit for bit."""
    from glm4v_core.model.loss import linear_cross_entropy
    torch.manual_seed(0)
    head = quant.QuantLinear.from_linear(torch.nn.Linear(64, 40, bias=False), "int4", 32)
    hidden = torch.randn(5, 64, requires_grad=True)
    targets = torch.tensor([0, 7, 39, 16, 15])
    made, dequantize = [], head.dequantized_weight
    monkeypatch.setattr(head, "dequantized_weight", lambda *a: made.append(dequantize(*a).shape[0]) or dequantize(*a))
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        loss = linear_cross_entropy(hidden, head.weight_rows(torch.float32), targets, chunk_size=16)
    (grad,) = torch.autograd.grad(loss, hidden)
    assert made == [16, 16, 8] * 2, made  # three chunks, the last short; forward, then backward
    assert all(t.shape[0] != 40 for t in kept), [t.shape for t in kept]
    dense = dequantize(torch.float32)
    ref_hidden = hidden.detach().clone().requires_grad_(True)
    ref = linear_cross_entropy(ref_hidden, dense, targets, chunk_size=16)
    (ref_grad,) = torch.autograd.grad(ref, ref_hidden)
    assert torch.equal(loss, ref) and torch.equal(grad, ref_grad)


@pytest.mark.slow
def test_the_real_9b_goals(tmp_path):
    """The 9B goals (docs/training.md): predicted, a bare config.json, ~10 s a plan on 2 cores."""
    config = bench.real_config_file(tmp_path)
    GiB = 2**30
    for _, flags, goal in bench.GOALS_9B[:3]:
        assert plan_training(TrainingRequest(checkpoint=config, **flags)).peak_bytes <= goal * GiB, flags
    for _, flags, goal in bench.INFERENCE_9B:
        from glm4v_core.training.memory_plan import InferenceRequest
        assert plan_inference(InferenceRequest(checkpoint=config, **flags)).peak_bytes <= goal * GiB, flags
