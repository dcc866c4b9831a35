"""CPU bf16 linear layers on oneDNN-packed weights (ops.pack_cpu_weights, load_model(pack_cpu=True)):
bit-identical to the plain product, kept by the compiled decode step, and never used once the weight
changed or gradients are wanted."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers.paths import ROOT
from safetensors.torch import load_file

from glm4v_core import checkpoint, cli, config, load_model
from glm4v_core.model import ops as model_ops
from glm4v_core.processing import tokenizer as processing_tokenizer

needs_onednn_bf16 = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    reason="this torch build or CPU has no oneDNN bf16 support")


def packed_linear(in_features=64, out_features=48, bias=True) -> model_ops.Linear:
    layer = model_ops.Linear(in_features, out_features, bias=bias).to(torch.bfloat16).requires_grad_(False)
    assert model_ops.pack_cpu_weights(layer) == 1
    return layer


def count_packed_calls(monkeypatch) -> list[bool]:
    """Records, for every ops.Linear call, whether it ran on the packed weight."""
    seen = []
    original = model_ops.PackedWeight.fits

    def spy(self, x, weight):
        seen.append(original(self, x, weight))
        return seen[-1]

    monkeypatch.setattr(model_ops.PackedWeight, "fits", spy)
    return seen


@needs_onednn_bf16
def test_packed_model_prefill_and_decode_are_bit_identical(fixtures_dir, monkeypatch):
    plain = load_model(fixtures_dir / "tiny", dtype=torch.bfloat16)
    packed = load_model(fixtures_dir / "tiny", dtype=torch.bfloat16, pack_cpu=True)
    linears = [m for m in packed.modules() if isinstance(m, model_ops.Linear)]
    assert linears and all(m.packed is not None for m in linears)  # ViT, projector and decoder
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    seen = count_packed_calls(monkeypatch)
    states = []
    with torch.no_grad():
        for model in (plain, packed):
            prompt = model.check_prompt(ids, max_new_tokens=4)
            state = model.prefill(prompt, prompt.spliced_length + 4)
            logits = [state.logits]
            token, position, slot = state.logits.argmax(-1, keepdim=True), state.positions, state.slot
            for _ in range(3):
                logits.append(model.decode_step(token, position, slot, state.cache))
                token, position, slot = logits[-1].argmax(-1, keepdim=True), position + 1, slot + 1
            states.append(torch.stack(logits))
    assert any(seen) and all(seen[len(seen) // 2:])  # the packed model ran every product packed
    assert torch.equal(states[0], states[1])


@needs_onednn_bf16
def test_packed_weight_is_not_used_once_the_weight_changes(monkeypatch):
    layer = packed_linear()
    x = torch.randn(3, 64).to(torch.bfloat16)
    seen = count_packed_calls(monkeypatch)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
    assert seen == [True]
    layer.weight.mul_(2)  # in place: the version counter moves
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    layer.weight = torch.nn.Parameter(torch.randn(48, 64).to(torch.bfloat16), requires_grad=False)  # replaced
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert seen == [True, False, False]


def weight_over(memory: bytearray, values: torch.Tensor) -> torch.nn.Parameter:
    """A new weight (its own storage, version 0) at the address of `memory`, holding `values`: what
    the allocator gives a later tensor once a packed weight was freed."""
    torch.frombuffer(memory, dtype=torch.int16).copy_(values.view(torch.int16).flatten())
    return torch.nn.Parameter(torch.frombuffer(memory, dtype=torch.bfloat16).view(values.shape), requires_grad=False)


@needs_onednn_bf16
def test_a_new_weight_at_a_freed_weights_address_is_not_taken_for_it():
    memory, x = bytearray(48 * 64 * 2), torch.randn(3, 64).to(torch.bfloat16)
    old, new = (torch.randn(48, 64).to(torch.bfloat16) for _ in range(2))
    layer = model_ops.Linear(64, 48, bias=False)
    layer.weight = weight_over(memory, old)
    model_ops.pack_cpu_weights(layer)
    layer.weight = weight_over(memory, new)  # same address, same version, other storage and values
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, new))


@needs_onednn_bf16
def test_the_compiled_product_never_takes_another_layers_packed_copy():
    """The custom op finds packed copies by address: a layer whose new weight lands where another
    layer's packed weight was (that layer replaced it since) must not run on that layer's copy."""
    memory, x = bytearray(48 * 64 * 2), torch.randn(3, 64).to(torch.bfloat16)
    old, new = (torch.randn(48, 64).to(torch.bfloat16) for _ in range(2))
    first, second = model_ops.Linear(64, 48, bias=False), packed_linear(bias=False)
    first.weight = weight_over(memory, old)
    model_ops.pack_cpu_weights(first)
    first.weight = torch.nn.Parameter(old.clone(), requires_grad=False)  # its packed copy stays, keyed by `memory`
    second.weight = weight_over(memory, new)
    with torch.no_grad():
        assert torch.equal(torch.compile(second)(x), F.linear(x, new))


@needs_onednn_bf16
def test_packed_weight_is_not_used_when_gradients_flow(monkeypatch):
    layer = packed_linear(bias=False)
    x = torch.randn(2, 5, 64).to(torch.bfloat16).requires_grad_(True)
    seen = count_packed_calls(monkeypatch)
    out = layer(x)
    assert seen == []
    assert out.grad_fn is not None  # the plain product, which autograd knows
    out.float().sum().backward()
    torch.testing.assert_close(x.grad.float(), layer.weight.float().sum(0).expand(2, 5, 64), rtol=0.02, atol=0.05)


@needs_onednn_bf16
def test_a_deep_copy_of_a_packed_model_runs_plain_products(fixtures_dir):
    import copy
    packed = load_model(fixtures_dir / "tiny", dtype=torch.bfloat16, pack_cpu=True)
    twin = copy.deepcopy(packed)
    assert all(m.packed is None for m in twin.modules() if isinstance(m, model_ops.Linear))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, packed(ids).logits)


@needs_onednn_bf16
def test_a_model_loaded_in_inference_mode_runs_plain_products(fixtures_dir):
    """Its weights are inference tensors, which have no version counter to tell an in-place edit:
    they are not packed, and loading and running work."""
    with torch.inference_mode():
        model = load_model(fixtures_dir / "tiny", dtype=torch.bfloat16, pack_cpu=True)
        ids = torch.tensor([[5, 6, 7, 8]])
        assert all(m.packed is None for m in model.modules() if isinstance(m, model_ops.Linear))
        assert torch.equal(model(ids).logits, load_model(fixtures_dir / "tiny", dtype=torch.bfloat16)(ids).logits)


@needs_onednn_bf16
def test_a_packed_layer_whose_weight_is_replaced_in_inference_mode_runs_the_plain_product():
    layer, x = packed_linear(), torch.randn(3, 64).to(torch.bfloat16)
    with torch.inference_mode():
        layer.weight = torch.nn.Parameter(torch.randn(48, 64).to(torch.bfloat16), requires_grad=False)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_only_bf16_cpu_weights_are_packed():
    layer = model_ops.Linear(8, 8)
    assert model_ops.pack_cpu_weights(layer) == 0 and layer.packed is None  # fp32: ATen's own products are used


def test_prefill_vs_hf_benchmark_says_why_it_skips(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prefill_vs_hf.py"), "--reference-code",
                          str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "skipped" in out.stdout and ("modeling_chatglm.py" in out.stdout or "transformers" in out.stdout)


@needs_onednn_bf16
@pytest.mark.parametrize("image", [False, True])
def test_compiled_decode_keeps_the_packed_products(fixtures_dir, monkeypatch, image):
    """generate(compile=True) on a packed model: every product of every compiled step runs packed (the
    custom op glm4v::packed_linear; inductor would otherwise trace F.linear), with eager's tokens."""
    from glm4v_core.generation.loop import generate

    model = load_model(fixtures_dir / "tiny", dtype=torch.bfloat16, pack_cpu=True)
    n_linears = sum(isinstance(m, model_ops.Linear) for m in model.text.modules())
    reference = load_file(fixtures_dir / "tiny" / "reference.safetensors")
    ids = reference["input_ids_a" if image else "input_ids_b"]
    pixels = reference["pixel_values_a"].to(torch.bfloat16) if image else None
    eager = generate(model, ids, pixels, max_new_tokens=6, stop_ids=[])
    seen = count_packed_calls(monkeypatch)
    compiled = generate(model, ids, pixels, max_new_tokens=6, stop_ids=[], compile=True)
    assert torch.equal(compiled, eager)
    decode_calls = seen[-5 * n_linears:]  # the last 5 steps (after the prefill): compiled
    assert len(seen) >= 6 * n_linears and all(decode_calls), seen


@needs_onednn_bf16
@pytest.mark.parametrize("compile", [False, True])
def test_bf16_cli_generation_runs_on_packed_weights(capsys, monkeypatch, compile):
    """`glm4v generate --dtype bfloat16` on CPU loads packed weights, eager or compiled, and its answer
    is the unpacked library's; compiled, the stats line gives the compile and the warm rate apart."""
    import re

    from glm4v_core.generation.streaming import stream_text

    loaded = []
    original = checkpoint.load_model
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: loaded.append(original(*a, **k)) or loaded[-1])
    argv = ["generate", "--dtype", "bfloat16", "--device", "cpu", "--max-new-tokens", "6", "Hello"]
    assert cli.main(argv + ["--compile"] * compile) == 0
    out, err = capsys.readouterr()
    warm = re.search(r"compile \+ warm-up \d+\.\d\d s, decode \d+\.\d tok/s \(warm\)", err)
    assert bool(warm) == compile, err
    layers = [m for m in loaded[0].modules() if isinstance(m, model_ops.Linear)]
    assert layers and all(m.packed is not None for m in layers)
    plain = load_model(config.BUNDLED_CHECKPOINT, dtype=torch.bfloat16)
    tokenizer = processing_tokenizer.resolve_tokenizer(None, config.BUNDLED_CHECKPOINT, plain.config)
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}],
                                                      add_generation_prompt=True)])
    assert out == "".join(stream_text(plain, tokenizer, ids, max_new_tokens=6)) + "\n"


# -- quantized folders on CPU -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def int4_folders(tmp_path_factory):
    """The demo quantized int4 with groups of 128 (its 64-wide ViT inputs fall back to int8) and of 32."""
    from glm4v_conversion.quantize import quantize_checkpoint
    root = tmp_path_factory.mktemp("quantized")
    for group in (32, 128):
        quantize_checkpoint(config.BUNDLED_CHECKPOINT, root / f"g{group}", "int4", group)
    return root


def test_generate_on_a_quantized_folder_defaults_to_bf16_and_the_packed_kernels(int4_folders, capsys, monkeypatch):
    loaded, packed_calls = [], []
    original, kernel = checkpoint.load_model, torch._weight_int4pack_mm_for_cpu
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: loaded.append(original(*a, **k)) or loaded[-1])
    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", lambda *a: packed_calls.append(1) or kernel(*a))
    assert cli.main(["generate", "--checkpoint", str(int4_folders / "g32"), "--device", "cpu",
                     "--max-new-tokens", "4", "Hello"]) == 0
    from glm4v_core.transforms.quant import quantized_linears
    layers = quantized_linears(loaded[0]).values()
    assert all(q.compute_dtype == torch.bfloat16 and q._cpu_int4 is not None for q in layers)
    assert len(packed_calls) >= 4 * sum(1 for _ in loaded[0].text.modules() if _ in layers)  # every decoder product
    assert "warning" not in capsys.readouterr().err  # every layer int4 on the fast kernel: nothing to say


def test_int4_layers_stored_int8_are_named_in_one_warning(int4_folders, capsys):
    from glm4v_core.transforms.quant import QuantFallbackWarning
    with pytest.warns(QuantFallbackWarning) as records:
        load_model(int4_folders / "g128")
    assert len(records) == 1
    message = str(records[0].message)
    assert "stored int8, not int4 (input width not a multiple of the group size 128)" in message
    assert "vision.layers.*.attn.qkv (2), vision.layers.*.attn.out (2), vision.layers.*.mlp.fc1 (2)" in message
    assert "fc2" not in message and "text." not in message  # 128-wide inputs stay int4
    assert cli.main(["generate", "--checkpoint", str(int4_folders / "g128"), "--device", "cpu",
                     "--max-new-tokens", "2", "Hello"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("glm4v: warning: ") and "(2)" in warnings[0], warnings


def test_int4_layers_without_the_packed_cpu_kernel_are_named():
    """PyTorch's int4 CPU kernel needs out_features % 16 == 0: a 40-wide layer runs the reference."""
    from glm4v_core.transforms.quant import quantize_model, slower_layers
    model = quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 40), torch.nn.Linear(40, 48)), "int4", 32)
    reasons = slower_layers(model, "int4", 32)
    assert reasons == {"int4 without PyTorch's packed CPU kernel, dequantized at every call (out_features not a "
                       "multiple of 16)": ["0"],
                       "stored int8, not int4 (input width not a multiple of the group size 32)": ["1"]}


def test_serve_on_a_quantized_folder_defaults_to_bf16_as_generate(int4_folders, monkeypatch):
    """glm4v serve --dtype auto picks the dtype glm4v generate picks: bf16 for a quantized folder on CPU."""
    from glm4v_core.serving import cli as serve_cli

    class Loaded(Exception):
        pass

    def load(path, dtype, device):
        raise Loaded(dtype)
    monkeypatch.setattr(checkpoint, "load_model", load)  # serve imports it from glm4v_core.checkpoint when it runs
    for folder, want in ((int4_folders / "g32", torch.bfloat16), (config.BUNDLED_CHECKPOINT, torch.float32)):
        with pytest.raises(Loaded) as loaded:
            serve_cli.serve(serve_cli.build_parser("glm4v serve").parse_args(
                ["--checkpoint", str(folder), "--device", "cpu", "--port", "0"]), "glm4v serve")
        assert loaded.value.args[0] == want, folder
