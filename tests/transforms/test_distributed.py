"""Tensor-parallel inference and FSDP2 / DDP training on 2 gloo ranks (CPU), tiny fixture.

One group of ranks does all the sharded work of the module (starting ranks and warming DTensor's
sharding rules cost more than the tiny model); the tests then compare its results with one
process and with the HF reference. The fine-tuning command under --fsdp: test_distributed_finetune."""
import dataclasses
import json
import re
import time
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from glm4v_core import GLM4V, GLM4VConfig, cli, load_model
from glm4v_core.generation.loop import generate
from glm4v_core.model import ops as model_ops
from glm4v_core.parity import cli as parity_cli
from glm4v_core.parity import exact_kernels as parity_exact_kernels
from glm4v_core.parity import grads as parity_grads
from glm4v_core.parity import reference as parity_reference
from glm4v_core.training import cli as training_cli
from glm4v_core.transforms import distributed as transforms_distributed

CASES = ["a", "b", "c", "d"]  # image, text, padded image batch, padded text batch
COMPILED_CASE = "c"
QUANTIZED = {"int8": None, "int4-32": 32}  # scheme -> group size
NEW_TOKENS = 8


def greedy_and_logits(model, ref: dict) -> dict:
    out = {}
    with torch.no_grad():
        for case in CASES:
            inputs = parity_reference.case_inputs(ref, case)
            out[case] = (model(**inputs).logits, generate(model, **inputs, max_new_tokens=NEW_TOKENS, stop_ids=[]))
    return out


def sharded_runs(checkpoint: str, quantized: dict[str, str]) -> dict:
    """On every rank: TP logits and greedy tokens (float, compiled step, quantized folders); FSDP2
    (with checkpointing) and DDP gradients."""
    ref = load_file(f"{checkpoint}/reference.safetensors")
    grads, meta = load_file(f"{checkpoint}/grads.safetensors"), json.loads(open(f"{checkpoint}/grads.json").read())
    cpu = torch.device("cpu")
    tp_model = transforms_distributed.tensor_parallel(load_model(checkpoint), transforms_distributed.mesh(cpu))
    local = tp_model.text.layers[0].attn
    result = {"tp": greedy_and_logits(tp_model, ref),
              "tp_local": (local.num_heads, local.num_kv, tuple(local.qkv.weight.to_local().shape))}
    with torch.no_grad():  # the decode step compiled whole (fullgraph), its all-reduces inside
        result["tp_compiled"] = generate(tp_model, **parity_reference.case_inputs(ref, COMPILED_CASE),
                                         max_new_tokens=NEW_TOKENS, stop_ids=[], compile=True)
        # bf16 on CPU as `glm4v generate --tp` loads it: packed weights, then sharded
        packed = transforms_distributed.tensor_parallel(load_model(checkpoint, dtype=torch.bfloat16, pack_cpu=True),
                                             transforms_distributed.mesh(cpu))
        inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                  for k, v in parity_reference.case_inputs(ref, COMPILED_CASE).items() if v is not None}
        result["tp_packed_bf16"] = [generate(packed, **inputs, max_new_tokens=NEW_TOKENS, stop_ids=[], compile=c)
                                    for c in (False, True)]
    sharded = transforms_distributed.fsdp(load_model(checkpoint, dtype=torch.bfloat16, pack_cpu=True),
                                          transforms_distributed.mesh(cpu))
    result["fsdp_packed_copies"] = sum(m.packed is not None for m in sharded.modules()
                                       if isinstance(m, model_ops.Linear))
    result["quantized"] = {
        scheme: greedy_and_logits(transforms_distributed.tensor_parallel(load_model(folder),
                                                                         transforms_distributed.mesh(cpu)), ref)
        for scheme, folder in quantized.items()}
    one_head_vit = GLM4V.from_config(one_head_vit_config(checkpoint))
    transforms_distributed.tensor_parallel(one_head_vit, transforms_distributed.mesh(cpu))
    with torch.no_grad():
        result["vit_replicated"] = (one_head_vit(**parity_reference.case_inputs(ref, "a")).logits,
                                    type(one_head_vit.vision.layers[0].attn.qkv.weight).__name__,
                                    type(one_head_vit.text.layers[0].attn.qkv.weight).__name__)
    with parity_exact_kernels.reference_kernels(torch.float32):
        model = load_model(checkpoint).requires_grad_(True).gradient_checkpointing()
        model = transforms_distributed.fsdp(model, transforms_distributed.mesh(cpu))
        result["fsdp"] = [parity_grads.run_grad_case(model, grads, ref, meta, case) for case in CASES]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result["ddp"] = ddp_errors(load_model(checkpoint).requires_grad_(True), grads, ref, meta["cases"]["a"])
        result["ddp_warnings"] = [str(w.message) for w in caught]
    return result


def one_head_vit_config(checkpoint: str) -> GLM4VConfig:
    """The tiny config with a 1-head ViT: a head count that 2 ranks cannot share."""
    c = GLM4VConfig.from_json(f"{checkpoint}/config.json")
    return dataclasses.replace(c, vision=dataclasses.replace(c.vision, num_heads=1))


def ddp_errors(model, grads: dict, ref: dict, info: dict) -> tuple[float, float]:
    """Case a (batch of one image prompt, where the stride warning showed) through DDP: the loss
    error and the worst gradient error (relative to its max-abs) against the HF reference."""
    from glm4v_conversion.names import native_to_hf
    take = lambda name: grads[f"{name}_a"]  # noqa: E731
    ddp = transforms_distributed.ddp(model, torch.device("cpu"))  # kept alive: its reducer runs in backward
    out = ddp(take("input_ids"), ref[info["image"]], take("attention_mask"), take("position_ids"),
              labels=take("labels"))
    out.loss.backward()
    worst = max(parity_grads.grad_error(p.grad, grads.get(f"grad_a.{native_to_hf(n)}"),
                                        info["grad_norm"][native_to_hf(n)], info["grad_maxabs"][native_to_hf(n)])
                for n, p in model.named_parameters())
    return abs(out.loss.item() - info["loss"]), worst


@pytest.fixture(scope="module")
def quantized(fixtures_dir, tmp_path_factory) -> dict[str, str]:
    """The tiny checkpoint as glm4v-convert --quantize writes it: int8, and int4 in groups of 32."""
    from glm4v_conversion.quantize import quantize_checkpoint
    folders = {}
    for scheme, group in QUANTIZED.items():
        folders[scheme] = str(tmp_path_factory.mktemp("q") / scheme)
        quantize_checkpoint(fixtures_dir / "tiny", folders[scheme], scheme.split("-")[0], group)
    return folders


@pytest.fixture(scope="module")
def two_ranks(fixtures_dir, quantized):
    return transforms_distributed.run_ranks(sharded_runs, 2, str(fixtures_dir / "tiny"), quantized, device_type="cpu")


@pytest.fixture(scope="module")
def one_process(fixtures_dir):
    tiny = fixtures_dir / "tiny"
    return greedy_and_logits(load_model(tiny), load_file(tiny / "reference.safetensors"))


@pytest.mark.parametrize("case", CASES)
def test_tensor_parallel_logits_and_greedy_tokens_match_one_process(two_ranks, one_process, fixtures_dir, case):
    tp_logits, tp_tokens = two_ranks["tp"][case]
    logits, tokens = one_process[case]
    assert tp_logits.shape == logits.shape
    assert (tp_logits - logits).abs().max().item() <= 1e-4
    assert torch.equal(tp_tokens, tokens)
    ref = load_file(fixtures_dir / "tiny" / "reference.safetensors")  # and the HF reference itself
    rows = ref.get(f"attention_mask_expanded_{case}", ref.get(f"attention_mask_{case}"))  # real rows only
    diff = (tp_logits - ref[f"logits_{case}"]).abs()
    assert (diff[rows.bool()] if rows is not None else diff).max().item() <= 1e-4
    if f"gen_tokens_{case}" in ref:
        assert torch.equal(tp_tokens, ref[f"gen_tokens_{case}"][:, :NEW_TOKENS])


def test_tensor_parallel_with_the_compiled_decode_step_gives_the_eager_tokens(two_ranks, one_process):
    assert torch.equal(two_ranks["tp_compiled"], one_process[COMPILED_CASE][1])


def test_tensor_parallel_on_a_packed_bf16_model_compiles_to_the_eager_tokens(two_ranks):
    """pack_cpu=True then tensor_parallel (what `glm4v generate --tp N --dtype bfloat16 --compile` does
    on CPU): the shards run plain products, eager and compiled alike."""
    eager, compiled = two_ranks["tp_packed_bf16"]
    assert torch.equal(compiled, eager)
    assert two_ranks["fsdp_packed_copies"] == 0  # FSDP's shards drop the packed copies too


@pytest.mark.parametrize("scheme", QUANTIZED)
def test_tensor_parallel_on_a_quantized_folder_matches_one_process(two_ranks, quantized, fixtures_dir, scheme):
    """Packed int8 codes / int4 pairs split with their per-row scales or per-group scales and zeros."""
    ref = load_file(fixtures_dir / "tiny" / "reference.safetensors")
    one = greedy_and_logits(load_model(quantized[scheme]), ref)
    for case in CASES:
        (tp_logits, tp_tokens), (logits, tokens) = two_ranks["quantized"][scheme][case], one[case]
        assert (tp_logits - logits).abs().max().item() <= 1e-4, (scheme, case)
        assert torch.equal(tp_tokens, tokens), (scheme, case)


def test_an_int4_split_inside_a_group_is_refused_by_name(fixtures_dir, tmp_path, capsys):
    """Group 128 over attn.out's 128 inputs: 64 per rank is half a group."""
    from glm4v_conversion.quantize import quantize_checkpoint
    pass
    quantize_checkpoint(fixtures_dir / "tiny", tmp_path / "int4-128", "int4", 128)
    code = cli.main(["generate", "--checkpoint", str(tmp_path / "int4-128"), "--tp", "2", "--device", "cpu",
                     "--max-new-tokens", "2", "Hi"])
    assert code == 1
    err = capsys.readouterr().err
    assert re.search(r"glm4v: error: rank \d of 2: tensor-parallel degree 2 splits the 128 inputs of int4 layer "
                     r"[\w.]+ into 64 per rank, not whole groups of 128", err), err
    assert "Traceback" not in err  # an input error reads as one, not as a crash


def test_tensor_parallel_shards_attention_by_kv_group(two_ranks, fixtures_dir):
    """tiny: 4 query heads in 2 KV groups, head dim 32: each rank 2 heads + 1 group, qkv rows (2+1+1)*32."""
    assert two_ranks["tp_local"] == (2, 1, ((2 + 1 + 1) * 32, 128))


def test_vit_with_an_indivisible_head_count_is_replicated(two_ranks, fixtures_dir):
    logits, vit_weight, decoder_weight = two_ranks["vit_replicated"]
    assert (vit_weight, decoder_weight) == ("Parameter", "DTensor")  # whole on every rank / sharded
    ref = load_file(fixtures_dir / "tiny" / "reference.safetensors")
    one = GLM4V.from_config(one_head_vit_config(str(fixtures_dir / "tiny")))
    with torch.no_grad():
        assert (logits - one(**parity_reference.case_inputs(ref, "a")).logits).abs().max().item() <= 1e-4


def test_tensor_parallel_degree_must_divide_heads_and_groups(fixtures_dir):
    model = load_model(fixtures_dir / "tiny")  # 4 heads, 2 KV groups
    with pytest.raises(transforms_distributed.DistributedError,
                       match=r"degree 4 must divide the model's KV groups .* = 2"):
        transforms_distributed.check_tp_degree(model, 4)
    with pytest.raises(transforms_distributed.DistributedError, match=r"degree 3 must divide the model's query heads"):
        transforms_distributed.check_tp_degree(model, 3)
    transforms_distributed.check_tp_degree(model, 2)


def test_fsdp2_loss_and_gradients_match_the_reference(two_ranks):
    """FSDP2 per block with gradient checkpointing: loss within 1e-5, gradients within 1e-4 x max-abs."""
    reports = two_ranks["fsdp"]
    assert [r.name for r in reports] == CASES
    for r in reports:
        assert r.loss_abs_err <= 1e-5 and r.grad_max_rel_err <= 1e-4, (r.name, r.worst_param, r.grad_max_rel_err)


def test_ddp_gradients_match_without_the_stride_warning(two_ranks):
    loss_err, grad_err = two_ranks["ddp"]
    assert loss_err <= 1e-5 and grad_err <= 1e-4, (loss_err, grad_err)
    assert not [w for w in two_ranks["ddp_warnings"] if "strides" in w], two_ranks["ddp_warnings"]


def raise_on_rank1() -> None:
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 gave up on purpose")
    dist.all_reduce(torch.ones(1))  # rank 0 waits here for a peer that is gone


def stall_on_rank1() -> None:
    if dist.get_rank() == 1:
        time.sleep(600)  # alive but silent
    dist.all_reduce(torch.ones(1))


def test_a_failing_rank_ends_the_run_with_its_error():
    start = time.monotonic()
    with pytest.raises(transforms_distributed.DistributedError,
                       match=r"(?s)rank 1 of 2 failed.*rank 1 gave up on purpose"):
        # collectives would wait 120 s: the run must not
        transforms_distributed.run_ranks(raise_on_rank1, 2, device_type="cpu")
    assert time.monotonic() - start < 90


def test_a_silent_rank_times_the_collective_out():
    start = time.monotonic()
    with pytest.raises(transforms_distributed.DistributedError, match=r"(?si)rank 0 of 2 failed.*time"):
        transforms_distributed.run_ranks(stall_on_rank1, 2, device_type="cpu", timeout=timedelta(seconds=3))
    assert time.monotonic() - start < 90


def test_parity_cli_refuses_tp_with_grads(fixtures_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        parity_cli.main(["--checkpoint", str(fixtures_dir / "tiny"), "--grads", "--tp", "2"])
    assert exit_.value.code == 2  # a usage error
    assert "--fsdp N with --grads" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_command_with_tp_writes_the_one_process_answer_once(fixtures_dir):
    import subprocess
    import sys
    command = [sys.executable, "-m", "glm4v_core", "generate", "--checkpoint", str(fixtures_dir / "tiny"),
               "--image", str(fixtures_dir / "images" / "gradient_rgb_97x61.png"), "--max-new-tokens", "8",
               "--device", "cpu", "Hi"]
    one = subprocess.run(command, capture_output=True, text=True, timeout=300)
    two = subprocess.run([*command, "--tp", "2"], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert one.stdout.strip() and two.stdout == one.stdout  # rank 0 alone writes, the same text


def quantized_greedy_eager_and_compiled(folder: str, checkpoint: str) -> tuple:
    ref = load_file(f"{checkpoint}/reference.safetensors")
    model = transforms_distributed.tensor_parallel(load_model(folder), transforms_distributed.mesh(torch.device("cpu")))
    inputs = parity_reference.case_inputs(ref, COMPILED_CASE)
    with torch.no_grad():
        return tuple(generate(model, **inputs, max_new_tokens=NEW_TOKENS, stop_ids=[], compile=c)
                     for c in (False, True))


@pytest.mark.slow
@pytest.mark.parametrize("scheme", QUANTIZED)
def test_quantized_tensor_parallel_compiles_to_the_eager_tokens(quantized, fixtures_dir, scheme):
    """The hand-split layers' functional all-reduce / all-gather inside the compiled step (~30 s a scheme)."""
    eager, compiled = transforms_distributed.run_ranks(quantized_greedy_eager_and_compiled, 2, quantized[scheme],
                                            str(fixtures_dir / "tiny"), device_type="cpu")
    assert torch.equal(compiled, eager)


def nccl_rank_report() -> tuple:
    t = torch.ones(1, device=torch.cuda.current_device())
    dist.all_reduce(t)
    return dist.get_backend(), t.item(), torch.cuda.current_device()


@pytest.mark.gpu
def test_forked_cuda_ranks_run_nccl_collectives():
    """Ranks are forked from a server that imported torch and glm4v_core: nothing there may touch
    CUDA, or the ranks could not. One rank per GPU (up to 2); NCCL is picked for CUDA."""
    world = min(2, torch.cuda.device_count())
    assert transforms_distributed.run_ranks(nccl_rank_report, world, device_type="cuda") == ("nccl", float(world), 0)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (one per rank); the one-GPU check is above")
def test_tensor_parallel_and_fsdp_on_gpus_match_one_process(fixtures_dir, tmp_path):
    """With 2+ GPUs: TP parity (logits and tokens vs the HF reference) and finetune --fsdp 2 losses
    on NCCL, fp32, as on gloo."""
    pass
    from glm4v_core.training.state import read_log
    assert parity_cli.main(["--checkpoint", str(fixtures_dir / "tiny"), "--tp", "2", "--device", "cuda",
                        "--dtype", "float32"]) == 0
    data = fixtures_dir / "finetune" / "train.jsonl"
    args = ["--data", str(data), "--batch-size", "2", "--max-steps", "2", "--dtype", "float32", "--no-progress"]
    assert training_cli.main([*args, "--out", str(tmp_path / "one"), "--device", "cuda"]) == 0
    assert training_cli.main([*args, "--out", str(tmp_path / "two"), "--device", "cuda", "--fsdp", "2"]) == 0
    losses = [[r["loss"] for r in read_log(tmp_path / run / "loss.jsonl")[0]] for run in ("one", "two")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
