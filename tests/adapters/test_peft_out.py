"""Our adapters out as PEFT folders: save_adapters(model, DIR, format="peft") writes what
peft.PeftModel.from_pretrained loads onto the HF-layout stand-in with our logits (fp32, 1e-4), through
peft's forward and through peft's merge_and_unload loaded back as a checkpoint. Per-part adapters on a
fused layer become one adapter of the summed rank (A stacked, B block-diagonal)."""
import json

import pytest
import torch
from helpers.adapters import TOL, hf_logits, inputs, ours_logits, randomize, save_merged
from helpers.paths import FIXTURES
from safetensors.torch import load_file

import glm4v_core
from glm4v_core.transforms import adapter_files, lora, peft_config, peft_format
from glm4v_core.transforms.lora import LoRAConfig, LoRAError

peft = pytest.importorskip("peft")


def nonzero_b(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in lora.adapters_of(model).values():
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.05)


def adapted(fixture, config, seed=0):
    model = glm4v_core.load_model(FIXTURES / fixture)
    glm4v_core.add_lora(model, config, seed=seed)
    nonzero_b(model, seed)
    return model


CASES = {
    "per-part fused, every part": ("tiny", LoRAConfig.from_presets(["decoder", "vision", "projector"], rank=3,
                                                                   alpha=7.0)),
    "shared fused": ("tiny", LoRAConfig.from_presets(["decoder"], rank=4, alpha=8.0, split_fused=False)),
    "some layers": ("tiny", LoRAConfig(rank=2, alpha=2.0, targets=("text.layers.1.attn.qkv", "projector.glu.proj",
                                                                    "vision.layers.0.mlp.fc1"))),
    "text-only checkpoint": ("text_tiny", LoRAConfig.from_presets(["decoder"], rank=4, alpha=16.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_our_adapters_with_our_logits(hf_base, tmp_path, case):
    fixture, config = CASES[case]
    ours = adapted(fixture, config)
    folder = glm4v_core.save_adapters(ours, tmp_path / "peft", format="peft", base_model_name_or_path="base")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["peft"]  # nothing staged left behind
    peft_model = peft.PeftModel.from_pretrained(hf_base(fixture), folder)
    batch = inputs(ours.config)
    torch.testing.assert_close(hf_logits(peft_model, batch), ours_logits(ours, batch), rtol=0, atol=TOL)
    wrapped = {n for n, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.Linear)}
    assert wrapped == {f"base_model.model.{peft_format.hf_module(n)}" for n in lora.adapters_of(ours)}
    merged = glm4v_core.load_model(save_merged(peft_model, fixture, tmp_path / "merged"))  # peft's own merge
    torch.testing.assert_close(ours_logits(merged, batch), ours_logits(ours, batch), rtol=0, atol=TOL)


def test_the_config_is_peft_s_with_one_scale_for_every_module(tmp_path):
    """Ranks 3 / 9 (q | k | v) / 6 (gate | up): r is the most common rank, rank_pattern and alpha_pattern
    name the others with the layer index as `.*`, and every module's alpha / r is lora_alpha / r (the one
    scale vLLM applies); target_modules are the suffixes peft's rule maps back to exactly these modules."""
    ours = adapted("tiny", LoRAConfig.from_presets(["decoder"], rank=3, alpha=6.0))
    folder = glm4v_core.save_adapters(ours, tmp_path / "peft", format="peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "CAUSAL_LM", 3, 6)
    assert config["rank_pattern"] == {"encoder.layers.*.self_attention.query_key_value": 9,
                                      "encoder.layers.*.mlp.dense_h_to_4h": 6}
    assert config["alpha_pattern"] == {"encoder.layers.*.self_attention.query_key_value": 18,
                                       "encoder.layers.*.mlp.dense_h_to_4h": 12}
    assert config["target_modules"] == ["mlp.dense_4h_to_h", "mlp.dense_h_to_4h", "self_attention.dense",
                                        "self_attention.query_key_value"]  # not the ViT's dense, the GLU's up
    tensors = load_file(folder / "adapter_model.safetensors")
    qkv = ours.text.layers[0].attn.qkv
    B = tensors["base_model.model.transformer.encoder.layers.0.self_attention.query_key_value.lora_B.weight"]
    A = tensors["base_model.model.transformer.encoder.layers.0.self_attention.query_key_value.lora_A.weight"]
    assert torch.equal(A, qkv.lora_A) and B.shape == (qkv.out_features, 9)
    assert torch.equal(B, torch.block_diag(*qkv.lora_B.split(qkv.parts)))  # q's rows see only q's rank slice


def test_a_peft_adapter_read_and_written_again_loads_in_peft_alike(hf_base, tmp_path):
    """peft -> ours -> peft with rank_pattern, alpha_pattern and rsLoRA: per-layer scales folded into B so
    that one lora_alpha / r holds for every module, logits unchanged; the glm4v format refuses them."""
    source = peft.get_peft_model(hf_base(), peft.LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, target_modules=["query_key_value", "dense_4h_to_h", "fc1"],
        rank_pattern={"encoder.layers.1.self_attention.query_key_value": 2}, alpha_pattern={"fc1": 3}))
    randomize(source)
    source.save_pretrained(tmp_path / "source")
    ours = glm4v_core.load_model(FIXTURES / "tiny")
    glm4v_core.load_adapters(ours, tmp_path / "source")
    assert ours.lora_config is None
    with pytest.raises(LoRAError, match="per-layer ranks or scales"):
        glm4v_core.save_adapters(ours, tmp_path / "a.safetensors")
    folder = glm4v_core.save_adapters(ours, tmp_path / "again", format="peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    for key, t in tensors.items():
        if key.endswith("lora_B.weight"):
            hf = key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
            settings = peft_config.PeftSettings(config["r"], config["lora_alpha"], [], config["rank_pattern"],
                                                config["alpha_pattern"], False, 0.0)
            old, new = peft_config.pattern_values(settings, hf)
            assert old == new and old[0] == t.shape[1] and old[1] / old[0] == pytest.approx(config["lora_alpha"] /
                                                                                           config["r"])
    again = peft.PeftModel.from_pretrained(hf_base(), folder)
    batch = inputs(ours.config)
    torch.testing.assert_close(hf_logits(again, batch), hf_logits(source, batch), rtol=0, atol=TOL)
    torch.testing.assert_close(ours_logits(ours, batch), hf_logits(source, batch), rtol=0, atol=TOL)


def test_pattern_keys_single_out_their_modules_under_both_peft_rules():
    """layers.1 must not catch layers.11; a generic `.*` key only when all it matches share the rank."""
    name = "transformer.encoder.layers.{}.self_attention.query_key_value"
    ranks = {name.format(i): 2 for i in range(12)}
    ranks[name.format(1)] = 6
    assert peft_format.pattern_keys(ranks, 2) == {"encoder.layers.1.self_attention.query_key_value": 6}
    ranks = {name.format(i): 6 for i in range(12)}
    assert peft_format.pattern_keys(ranks, 2) == {"encoder.layers.*.self_attention.query_key_value": 6}


def test_our_format_round_trip_is_unchanged_and_a_folder_with_other_files_is_kept(tmp_path):
    ours = adapted("tiny", LoRAConfig.from_presets(["decoder", "projector"], rank=2, alpha=4.0))
    path = glm4v_core.save_adapters(ours, tmp_path / "adapter.safetensors")
    fresh = glm4v_core.load_model(FIXTURES / "tiny")
    glm4v_core.load_adapters(fresh, path)
    assert fresh.lora_config == ours.lora_config
    for name, t in lora.adapter_state(ours).items():
        assert torch.equal(lora.adapter_state(fresh)[name], t)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(LoRAError, match="holds files other than a PEFT adapter's"):
        glm4v_core.save_adapters(ours, busy, format="peft")
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    glm4v_core.save_adapters(ours, tmp_path / "peft", format="peft")
    glm4v_core.save_adapters(ours, tmp_path / "peft", format="peft")  # an adapter folder is replaced
    with pytest.raises(LoRAError, match="choose from"):
        adapter_files.save_adapters(ours, tmp_path / "x", format="lora")


def test_a_failed_peft_write_leaves_nothing_and_a_killed_one_is_a_known_leftover(tmp_path, monkeypatch):
    from glm4v_core.training import state
    ours = adapted("tiny", LoRAConfig(rank=2))

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(peft_format, "save_file", full_disk)
    with pytest.raises(OSError):
        glm4v_core.save_adapters(ours, tmp_path / "adapter", format="peft")
    assert list(tmp_path.iterdir()) == []  # the hidden staging folder went with the error
    staged = tmp_path / ".adapter.partial-0123abcd"  # what a SIGKILL mid-write leaves in a finetune OUT
    staged.mkdir()
    (staged / "adapter_config.json").write_text("{}")
    assert state.leftovers(tmp_path) == [staged]  # the next run on OUT removes it
