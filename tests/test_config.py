import json

import pytest

from glm4v_core.config import ConfigError, GLM4VConfig


@pytest.fixture
def real(fixtures_dir):
    return json.loads((fixtures_dir / "real_manifest.json").read_text())["config"]


def test_real_config_sizes(real):
    c = GLM4VConfig.from_hf(real)
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_groups, c.head_dim) == (4096, 40, 32, 2, 128)
    assert (c.vocab_size, c.ffn_hidden_size, c.rope_ratio, c.rotary_dim) == (151552, 13696, 1.0, 64)
    v = c.vision
    assert (v.hidden_size, v.num_layers, v.head_dim, v.grid, v.num_image_tokens) == (1792, 63, 112, 80, 1600)
    assert c.eos_token_ids == (151329, 151336, 151338)


def test_round_trip_through_hf_dict(real):
    c = GLM4VConfig.from_hf(real)
    assert GLM4VConfig.from_hf(c.to_hf()) == c


def test_unknown_key_is_named(real):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['rope_scaling'\]"):
        GLM4VConfig.from_hf({**real, "rope_scaling": {"type": "linear"}})


def test_unknown_vision_key_is_named(real):
    bad = {**real, "vision_config": {**real["vision_config"], "use_rope": True}}
    with pytest.raises(ConfigError, match=r"vision_config: unknown key\(s\) \['use_rope'\]"):
        GLM4VConfig.from_hf(bad)


@pytest.mark.parametrize("key", ["hidden_size", "kv_channels", "layernorm_epsilon", "boi_token_id", "eos_token_id"])
def test_missing_key_is_named(real, key):
    with pytest.raises(ConfigError, match=f"missing required key '{key}'"):
        GLM4VConfig.from_hf({k: v for k, v in real.items() if k != key})


def test_unsupported_switch_is_refused(real):
    with pytest.raises(ConfigError, match="rmsnorm=False is not supported"):
        GLM4VConfig.from_hf({**real, "rmsnorm": False})


def test_inconsistent_sizes_are_refused(real):
    with pytest.raises(ConfigError, match="not a multiple"):
        GLM4VConfig.from_hf({**real, "multi_query_group_num": 3})
    with pytest.raises(ConfigError, match="num_positions is 6400"):
        GLM4VConfig.from_hf({**real, "vision_config": {**real["vision_config"], "num_positions": 6400}})


def test_from_json_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        GLM4VConfig.from_json(path)
    with pytest.raises(ConfigError, match="not found"):
        GLM4VConfig.from_json(tmp_path / "missing.json")


def test_wrong_types_and_ids_are_refused(real):
    with pytest.raises(ConfigError, match="num_layers must be an integer, got 2.5"):
        GLM4VConfig.from_hf({**real, "num_layers": 2.5})
    with pytest.raises(ConfigError, match="hidden_size must be an integer, got '4096'"):
        GLM4VConfig.from_hf({**real, "hidden_size": "4096"})
    with pytest.raises(ConfigError, match=r"eos_token_id 200000 is not a token id in the vocabulary \[0, 151552\)"):
        GLM4VConfig.from_hf({**real, "eos_token_id": [151329, 200000]})
    assert GLM4VConfig.from_hf({**real, "eos_token_id": 151329}).eos_token_ids == (151329,)
    assert GLM4VConfig.from_hf({**real, "layernorm_epsilon": 1}).layernorm_epsilon == 1  # an int is a number
