"""Bad model inputs get named errors from the model / generate API before any compute, and NaN
logits stop generation with an error naming the first stage that is not finite."""
import pytest
import torch
from safetensors.torch import load_file

import glm4v_core
from glm4v_core import InputError
from glm4v_core.generation.sampling import NonFiniteLogitsError, Sampling


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    return glm4v_core.load_model(fixtures_dir / "tiny"), load_file(str(fixtures_dir / "tiny" / "reference.safetensors"))


@pytest.fixture
def no_compute(tiny, monkeypatch):
    model, ref = tiny

    def forbidden(*args, **kwargs):
        raise AssertionError("the model ran before the input error was raised")
    for unit in ("prefill", "embed", "decode_step", "encode_images"):
        monkeypatch.setattr(model, unit, forbidden)
    return model, ref


def case(ref, name):
    return dict(input_ids=ref[f"input_ids_{name}"], pixel_values=ref.get(f"pixel_values_{name}"),
                attention_mask=ref.get(f"attention_mask_{name}"), position_ids=ref.get(f"position_ids_in_{name}"))


def bad_pixels(ref, kind):
    px = ref["pixel_values_a"].clone()
    return {"uint8": (px.abs() * 50).to(torch.uint8), "bool": px > 0, "int64": px.long(),
            "nan": px.index_fill(0, torch.tensor([0]), float("nan")),
            "inf": px.index_fill(0, torch.tensor([0]), float("inf"))}[kind]


@pytest.mark.parametrize("entry", ["forward", "generate"])
@pytest.mark.parametrize("kind,match", [("uint8", "normalized float pixels"), ("bool", "normalized float pixels"),
                                        ("int64", "normalized float pixels"), ("nan", "NaN or inf"),
                                        ("inf", "NaN or inf")])
def test_pixel_values_that_are_not_normalized_finite_floats(no_compute, entry, kind, match):
    model, ref = no_compute
    inputs = dict(case(ref, "a"), pixel_values=bad_pixels(ref, kind))
    with pytest.raises(InputError, match=match):
        model(**inputs) if entry == "forward" else glm4v_core.generate(model, **inputs)


@pytest.mark.parametrize("mask_of,match", [
    (lambda m: m * 2, "only 0 and 1"),
    (lambda m: m.float(), "integer or bool tensor"),
    (lambda m: m[0], "attention_mask shape"),
    (lambda m: m[:, None], "attention_mask shape"),
    (lambda m: m.flip(1), "left padding"),
    (lambda m: torch.cat([torch.zeros_like(m[:1]), m[1:]]), "a row with no real token"),
])
def test_attention_masks_that_are_not_left_padding_of_0_and_1(no_compute, mask_of, match):
    model, ref = no_compute
    inputs = case(ref, "c")
    inputs["attention_mask"] = mask_of(inputs["attention_mask"])
    for run in (lambda: model(**inputs), lambda: glm4v_core.generate(model, **inputs)):
        with pytest.raises(InputError, match=match):
            run()


def test_a_bool_mask_is_the_same_as_an_integer_mask(tiny):
    model, ref = tiny
    inputs = case(ref, "c")
    with torch.no_grad():
        want = model(**inputs).logits
        got = model(**dict(inputs, attention_mask=inputs["attention_mask"].bool())).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("positions,match", [(lambda p: p.float(), "position_ids must be an integer tensor"),
                                             (lambda p: p - 100, "position_ids must be >= 0"),
                                             (lambda p: p[:, 1:], "position_ids shape")])
def test_bad_position_ids(no_compute, positions, match):
    model, ref = no_compute
    inputs = case(ref, "c")
    inputs["position_ids"] = positions(inputs["position_ids"])
    with pytest.raises(InputError, match=match):
        glm4v_core.generate(model, **inputs)


@pytest.mark.parametrize("stop_ids", ["801", 801, [801.0], [-1], [10 ** 9], [True], b"x"])
def test_wrong_typed_stop_ids(no_compute, stop_ids):
    model, ref = no_compute
    with pytest.raises(InputError, match="stop_ids"):
        glm4v_core.generate(model, ref["input_ids_b"], stop_ids=stop_ids)


@pytest.mark.parametrize("sampling", [dict(do_sample=True), "greedy", None])
def test_sampling_must_be_a_sampling_object(no_compute, sampling):
    model, ref = no_compute
    with pytest.raises(InputError, match="sampling must be a glm4v_core.Sampling"):
        glm4v_core.generate(model, ref["input_ids_b"], sampling=sampling)


@pytest.mark.parametrize("dtype", ["float64", torch.int8, "bf16", 16])
def test_unsupported_dtypes_are_named(fixtures_dir, dtype):
    with pytest.raises(ValueError, match="dtype"):
        glm4v_core.load_model(fixtures_dir / "tiny", dtype=dtype)


@pytest.mark.parametrize("layer", [0, 1])
def test_nan_logits_stop_generation_naming_the_first_bad_stage(fixtures_dir, layer):
    """A NaN weight must not print '!!!' and exit 0: generation stops and names the stage."""
    model = glm4v_core.load_model(fixtures_dir / "tiny")
    ref = load_file(str(fixtures_dir / "tiny" / "reference.safetensors"))
    with torch.no_grad():
        model.text.layers[layer].mlp.down.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLogitsError,
                       match=f"first non-finite stage of the prompt's forward: decoder layer {layer}"):
        glm4v_core.generate(model, ref["input_ids_b"], max_new_tokens=4, sampling=Sampling())
