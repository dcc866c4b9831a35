"""The model's shape changes are einops patterns: named axes, checked at run time. Only two plain
view chains remain (the rotary's pair split, the packed CPU kernels' 2-D input), each saying why;
the patterns compile into the decode step and the vision tower without a graph break."""
import ast

import pytest
import torch
from helpers.paths import ROOT

import glm4v_core
from glm4v_core.generation.sampling import Sampling, TokenRule
from glm4v_core.generation.step import decode_and_choose
from glm4v_core.model.cache import KVCache

MODEL = ROOT / "src" / "glm4v_core" / "model"
SHAPE_METHODS = {"view", "permute", "transpose", "flatten", "unflatten", "reshape", "movedim"}


def functions_with_shape_calls() -> dict[str, str]:
    """'file:function' -> its source, for each function of model/ that calls a view/permute-like method."""
    found = {}
    for path in sorted(MODEL.glob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            calls = [n for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                     and n.func.attr in SHAPE_METHODS]
            if calls:
                found[f"{path.name}:{fn.name}"] = ast.get_source_segment(path.read_text(), fn)
    return found


def test_vision_and_decoder_use_einops():
    for name in ("vision.py", "decoder.py"):
        tree = ast.parse((MODEL / name).read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert "einops" in imported, name


def test_at_most_two_plain_view_chains_each_with_its_reason():
    found = functions_with_shape_calls()
    assert set(found) <= {"decoder.py:apply_rotary", "ops.py:_on_rows"}, sorted(found)
    for name, source in found.items():
        assert "not a rearrange" in source, f"{name}: say why it is not a rearrange"


def test_a_layout_that_does_not_fit_is_caught_by_the_pattern(fixtures_dir, monkeypatch):
    """The pattern checks the layout at run time: a q|k|v width that is not 3 whole heads is an error
    naming the pattern, where a view chain would silently mix heads or fail far from the cause."""
    model = glm4v_core.load_model(fixtures_dir / "tiny")
    attn = model.vision.layers[0].attn
    monkeypatch.setattr(attn, "head_dim", attn.head_dim + 1)
    with pytest.raises(Exception, match="three nh hd"):
        attn(torch.zeros(1, 4, attn.qkv.in_features))


def test_decode_step_and_vision_tower_compile_without_graph_breaks(fixtures_dir):
    model = glm4v_core.load_model(fixtures_dir / "tiny")
    config = model.config
    cache = KVCache(config.num_layers, 1, config.num_kv_groups, 32, config.head_dim, model.dtype, model.device)
    rule = TokenRule(Sampling(), stops=torch.tensor([config.pad_token_id]), pad=config.pad_token_id, unknown=None)
    args = (torch.tensor([5]), torch.tensor([[3]]), torch.tensor([3]), torch.zeros(1, dtype=torch.bool), None, None)
    with torch.no_grad():
        step = torch._dynamo.explain(decode_and_choose)(model, rule, cache, *args)
        pixels = torch.zeros(1, config.vision.in_channels, config.vision.image_size, config.vision.image_size)
        vision = torch._dynamo.explain(lambda px: model.projector(model.vision(px)))(pixels)
    assert step.graph_break_count == 0, step.break_reasons
    assert vision.graph_break_count == 0, vision.break_reasons
