"""PEFT LoRA folders into our model: peft 0.13.2 adapts the HF-layout stand-in and saves the folder,
glm4v_core.load_adapters reads it into load_model(fixture). Logits equal peft's forward and, independent
of the stand-in's forward, those of peft's merge_and_unload loaded back as a checkpoint (fp32, 1e-4)."""
import json

import pytest
import torch
from helpers.adapters import TOL, hf_logits, inputs, ours_logits, randomize, save_merged
from helpers.paths import FIXTURES

import glm4v_core
from glm4v_core.transforms import lora, peft_config, peft_format
from glm4v_core.transforms.lora import LoRAError

peft = pytest.importorskip("peft")

DECODER = ["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]
CASES = {  # name: (fixture, LoraConfig keywords)
    "decoder list": ("tiny", dict(r=4, lora_alpha=8, target_modules=DECODER)),
    "vit + decoder + projector list": ("tiny", dict(r=3, lora_alpha=5, target_modules=[
        "query_key_value", "dense", "fc1", "fc2", "gate_proj", "dense_h_to_4h"])),
    "regex": ("tiny", dict(r=4, lora_alpha=16, target_modules=r".*\.(encoder|vision\.transformer)\.layers\.\d+\."
                                                                r"(self_attention|attention)\.query_key_value")),
    "rank and alpha patterns": ("tiny", dict(r=4, lora_alpha=8, target_modules=["query_key_value", "dense_4h_to_h"],
                                             rank_pattern={"encoder.layers.1.self_attention.query_key_value": 2,
                                                           "vision.transformer.layers.*.attention.query_key_value": 6},
                                             alpha_pattern={"dense_4h_to_h": 32})),
    "rslora": ("tiny", dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["query_key_value", "dense_h_to_4h"],
                            rank_pattern={"encoder.layers.0.mlp.dense_h_to_4h": 2})),
    "fused layers only, rank a multiple of the parts": ("tiny", dict(r=6, lora_alpha=8, target_modules=[
        "encoder.layers.0.self_attention.query_key_value", "dense_h_to_4h"])),  # still one shared adapter each
    "text-only checkpoint": ("text_tiny", dict(r=4, lora_alpha=8, target_modules=DECODER)),
}


def peft_folder(hf_base, tmp_path, fixture, seed=0, **config):
    """peft's own adapters (nonzero A and B) on the stand-in, saved with save_pretrained."""
    model = peft.get_peft_model(hf_base(fixture), peft.LoraConfig(**config))
    randomize(model, seed)
    model.save_pretrained(tmp_path / "peft")
    return model, tmp_path / "peft"


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapters_give_peft_logits(hf_base, tmp_path, case):
    fixture, config = CASES[case]
    peft_model, folder = peft_folder(hf_base, tmp_path, fixture, **config)
    ours = glm4v_core.load_model(FIXTURES / fixture)
    batch = inputs(ours.config)
    base = ours_logits(ours, batch)
    adapters = glm4v_core.load_adapters(ours, folder)
    assert len(adapters) == len([m for m in peft_model.modules() if isinstance(m, peft.tuners.lora.Linear)])
    got, want = ours_logits(ours, batch), hf_logits(peft_model, batch)
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    assert (got - base).abs().max() > 100 * TOL  # the adapters do change the logits
    merged = glm4v_core.load_model(save_merged(peft_model, fixture, tmp_path / "merged"))
    torch.testing.assert_close(got, ours_logits(merged, batch), rtol=0, atol=TOL)


def test_a_lora_on_a_fused_layer_is_one_shared_adapter(hf_base, tmp_path):
    """peft's one adapter over query_key_value (q | k | v) / dense_h_to_4h (gate | up): our shared adapter,
    A (r, in) and B (out, r) as peft holds them, the scale alpha / r."""
    _, folder = peft_folder(hf_base, tmp_path, "tiny", r=4, lora_alpha=6, target_modules=["query_key_value",
                                                                                         "dense_h_to_4h"])
    ours = glm4v_core.load_model(FIXTURES / "tiny")
    glm4v_core.load_adapters(ours, folder)
    for adapter in (ours.text.layers[0].attn.qkv, ours.text.layers[1].mlp.gate_up, ours.vision.layers[0].attn.qkv):
        assert adapter.parts == (adapter.out_features,) and adapter.lora_A.shape[0] == 4 and adapter.scale == 1.5
    assert ours.lora_config == lora.LoRAConfig(rank=4, alpha=6.0, targets=ours.lora_config.targets,
                                               split_fused=False)  # one rank, one scale: savable as glm4v too


def test_patterns_that_peft_versions_read_differently_are_refused(hf_base, tmp_path):
    """peft 0.13 takes the first key of rank_pattern + alpha_pattern that matches with a dot before it
    (else the module's whole name) and looks both values up with it; later peft looks each up on its own.
    Files they read differently: a whole-name rank key beside a suffix alpha key, a rank key and another
    alpha key on one module, and an alternation (in peft 0.13's `.*\\.self_attention.query|fc1$` the first
    branch has no `$`: it matches query_key_value by its start)."""
    _, folder = peft_folder(hf_base, tmp_path, "tiny", r=4, lora_alpha=8, target_modules=["query_key_value"])
    path = folder / "adapter_config.json"
    original = json.loads(path.read_text())
    for patterns in ({"rank_pattern": {"transformer.encoder.layers.0.self_attention.query_key_value": 8},
                      "alpha_pattern": {"query_key_value": 2}},
                     {"rank_pattern": {"query_key_value": 4},
                      "alpha_pattern": {"layers.0.self_attention.query_key_value": 2}},
                     {"alpha_pattern": {"self_attention.query|fc1": 2}}):
        path.write_text(json.dumps({**original, **patterns}))
        with pytest.raises(LoRAError, match="peft 0.13's key rule") as e:
            glm4v_core.load_adapters(glm4v_core.load_model(FIXTURES / "tiny"), folder)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


REFUSED = {  # adapter_config.json key: (value, words of the message)
    "use_dora": (True, "DoRA"),
    "modules_to_save": (["output_layer"], "modules_to_save"),
    "bias": ("lora_only", "trained biases"),
    "lora_bias": (True, "a bias on lora_B"),
    "fan_in_fan_out": (True, "fan_in_fan_out"),
    "layers_to_transform": ([0], "layers_to_transform"),
    "layers_pattern": ("layers", "layers_pattern"),
    "layer_replication": ([[0, 1]], "layer_replication"),
    "exclude_modules": (["dense"], "exclude_modules"),
    "some_future_feature": ({"on": 1}, "does not know"),
    "peft_type": ("LOHA", "only 'LORA'"),
    "init_lora_weights": ("pissa", "convert them to a plain LoRA"),
    "target_modules": ("all-linear", "expands before saving"),
    "target_modules ": (["word_embeddings", "query_key_value"], "an embedding"),
    "target_modules  ": (["output_layer"], "the output layer"),
    "target_modules   ": (["conv"], "a convolution"),
    "target_modules    ": (["linear_proj"], "a container"),
    "target_modules     ": (["nothing_like_it"], "matches no module"),
    "r": (0, "expected an integer >= 1"),
    "lora_alpha": (float("nan"), "finite number > 0"),
    "use_rslora": ("yes", "true or false"),
}


@pytest.mark.parametrize("key", list(REFUSED))
def test_each_unsupported_feature_is_one_line_naming_the_file_and_key(hf_base, tmp_path, key):
    _, folder = peft_folder(hf_base, tmp_path, "tiny", r=2, lora_alpha=4, target_modules=["query_key_value"])
    path = folder / "adapter_config.json"
    value, words = REFUSED[key]
    path.write_text(json.dumps({**json.loads(path.read_text()), key.strip(): value}))
    model = glm4v_core.load_model(FIXTURES / "tiny")
    with pytest.raises(LoRAError) as e:
        glm4v_core.load_adapters(model, folder)
    message = str(e.value)
    assert words in message and str(path) in message and key.strip() in message and "\n" not in message, message
    assert not lora.adapters_of(model)  # nothing half-applied


def test_tensor_problems_are_named(hf_base, tmp_path):
    from safetensors.torch import load_file, save_file
    _, folder = peft_folder(hf_base, tmp_path, "tiny", r=2, lora_alpha=4, target_modules=["query_key_value"])
    weights = folder / peft_format.PEFT_WEIGHTS
    tensors = load_file(weights)
    key = "base_model.model.transformer.encoder.layers.0.self_attention.query_key_value.lora_A.weight"
    model = glm4v_core.load_model(FIXTURES / "tiny")
    for broken, words in (({**tensors, key: tensors[key][:1]}, "has shape (1, 128), expected (2, 128)"),
                          ({k: v for k, v in tensors.items() if k != key}, "missing"),
                          ({**tensors, "base_model.model.transformer.output_layer.lora_A.weight": tensors[key].clone()},
                           "unexpected"),
                          ({**tensors, key: tensors[key] * float("inf")}, "non-finite")):
        save_file(broken, str(weights))
        with pytest.raises(LoRAError) as e:
            glm4v_core.load_adapters(model, folder)
        assert words in str(e.value) and str(weights) in str(e.value), e.value
    weights.unlink()
    (folder / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(LoRAError, match="pickle, which is never read"):
        glm4v_core.load_adapters(model, folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoRAError, match="adapter_config.json: not valid JSON"):
        glm4v_core.load_adapters(model, folder)
    assert not lora.adapters_of(model)


def test_the_matching_rules_are_peft_s(hf_base):
    """targeted() picks what peft 0.13's check_target_module_exists picks, on every module of the stand-in."""
    from peft.tuners.tuners_utils import check_target_module_exists
    names = [n for n, _ in hf_base("tiny").named_modules()]
    kinds = peft_format.hf_module_kinds(glm4v_core.load_model(FIXTURES / "tiny").config)
    assert set(names) == set(kinds)  # our picture of the HF module tree is the HF model's
    for target in (["dense"], ["query_key_value", "fc2"], ["layers.1.mlp.dense_h_to_4h"], r".*\.dense",
                   r"transformer\.vision.*\.(fc1|dense)", ["linear_proj.linear_proj"], ["4h", "_proj"]):
        config = peft.LoraConfig(target_modules=target)
        settings = peft_config.PeftSettings(4, 8, config.target_modules, {}, {}, False, 0.0)
        assert set(peft_config.targeted(settings, names)) == {n for n in names if check_target_module_exists(config, n)}
