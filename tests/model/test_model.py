"""Model-level behaviour beyond the fixtures: bad inputs, mixed batches, long positions, caching."""
import pytest
import torch
from safetensors.torch import load_file

from glm4v_core import InputError, load_model
from glm4v_core.model import ops as model_ops
from glm4v_core.model.decoder import apply_rotary, rotary_tables
from glm4v_core.model.glm4v import first_valid_key


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    return load_model(fixtures_dir / "tiny")


@pytest.fixture(scope="module")
def ref(fixtures_dir):
    return load_file(str(fixtures_dir / "tiny" / "reference.safetensors"))


def test_pixels_of_the_wrong_size(tiny, ref):
    with pytest.raises(InputError, match=r"pixel_values must have shape \(N, 3, 56, 56\).*\(1, 3, 64, 64\)"):
        tiny(ref["input_ids_a"], torch.zeros(1, 3, 64, 64))


def test_pixels_without_placeholder(tiny, ref):
    with pytest.raises(InputError, match="no image placeholder"):
        tiny(ref["input_ids_b"], ref["pixel_values_a"])


def test_placeholder_without_pixels(tiny, ref):
    with pytest.raises(InputError, match="no image was given"):
        tiny(ref["input_ids_a"])


def test_more_images_than_placeholders(tiny, ref):
    with pytest.raises(InputError, match="2 image.*1 row"):
        tiny(ref["input_ids_a"], ref["pixel_values_c"])


def test_broken_placeholder_block(tiny, ref):
    ids = ref["input_ids_a"].clone()
    boi = int((ids[0] == tiny.config.boi_token_id).nonzero()[0])
    ids[0, boi + 1] = 5  # not <|endoftext|> between boi and eoi
    with pytest.raises(InputError, match="consecutive positions"):
        tiny(ids, ref["pixel_values_a"])


@pytest.mark.parametrize("bad", [-1, 1024, 10**6])
def test_ids_outside_vocabulary(tiny, ref, bad):
    ids = ref["input_ids_b"].clone()
    ids[0, 3] = bad
    with pytest.raises(InputError, match=rf"input_ids\[0, 3\] = {bad} is outside the vocabulary \[0, 1024\)"):
        tiny(ids)


def test_float_ids_and_empty_ids(tiny):
    with pytest.raises(InputError, match="integer tensor"):
        tiny(torch.zeros(1, 4))
    with pytest.raises(InputError, match="empty"):
        tiny(torch.zeros(1, 0, dtype=torch.long))


def test_right_padding_is_refused(tiny, ref):
    mask = torch.ones_like(ref["input_ids_b"])
    mask[0, -2:] = 0
    with pytest.raises(InputError, match="left padding"):
        tiny(ref["input_ids_b"], attention_mask=mask)


def test_mask_shape_mismatch(tiny, ref):
    with pytest.raises(InputError, match="attention_mask shape"):
        tiny(ref["input_ids_b"], attention_mask=torch.ones(1, 3, dtype=torch.long))


def test_mixed_batch_rows_equal_rows_alone(tiny, ref):
    """A batch with one image row and one text row: each row's logits equal that row run alone."""
    img_ids, txt_ids = ref["input_ids_a"][0], ref["input_ids_b"][0]
    L = max(len(img_ids), len(txt_ids))
    ids = torch.full((2, L), tiny.config.pad_token_id)
    mask = torch.zeros(2, L, dtype=torch.long)
    for row, seq in enumerate((img_ids, txt_ids)):
        ids[row, L - len(seq):], mask[row, L - len(seq):] = seq, 1
    out = tiny(ids, ref["pixel_values_a"], attention_mask=mask)
    alone_img = tiny(img_ids[None], ref["pixel_values_a"]).logits[0]
    alone_txt = tiny(txt_ids[None]).logits[0]
    torch.testing.assert_close(out.logits[0, -alone_img.shape[0]:], alone_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[1, -alone_txt.shape[0]:], alone_txt, atol=1e-5, rtol=1e-5)
    assert out.attention_mask[1].sum() == len(txt_ids)  # the text row sits behind extra pads


def test_positions_beyond_seq_length_are_relative(tiny, ref):
    """8K context: positions are not capped at seq_length; rotary attention depends only on offsets."""
    ids = ref["input_ids_b"]
    near = tiny(ids).logits
    far = tiny(ids, position_ids=torch.arange(ids.shape[1])[None] + 8191 - ids.shape[1]).logits
    assert torch.isfinite(far).all()
    torch.testing.assert_close(far, near, atol=2e-3, rtol=0)


def test_rotary_rotates_interleaved_pairs_of_the_first_half():
    x = torch.randn(1, 1, 1, 8, dtype=torch.float64)
    cos, sin = rotary_tables(torch.tensor([[3]]), rotary_dim=4, base=10000.0, dtype=torch.float32)
    out = apply_rotary(x, cos.double(), sin.double())
    for i, theta in enumerate((1.0, 10000.0 ** -0.5)):
        a, b = x[..., 2 * i], x[..., 2 * i + 1]
        c, s = torch.cos(torch.tensor(3 * theta)), torch.sin(torch.tensor(3 * theta))
        torch.testing.assert_close(out[..., 2 * i], a * c - b * s)
        torch.testing.assert_close(out[..., 2 * i + 1], b * c + a * s)
    torch.testing.assert_close(out[..., 4:], x[..., 4:])  # second half passes through


def test_prefill_equals_plain_forward_and_decode_continues(tiny, ref):
    ids, px = ref["input_ids_a"], ref["pixel_values_a"]
    full = tiny(ids, px)
    T = full.logits.shape[1]
    state = tiny.prefill(tiny.check_prompt(ids, px, max_new_tokens=4), cache_len=T + 4)
    torch.testing.assert_close(state.logits, full.logits[:, -1], atol=1e-5, rtol=0)  # GEMV vs GEMM rounding
    assert state.cache.max_len == T + 4 and int(state.slot) == T  # slots = spliced length
    assert int(state.positions) == ids.shape[1]  # next position: previous max + 1, not the slot
    nxt = state.logits.argmax(-1, keepdim=True)
    step = tiny.decode_step(nxt, state.positions, state.slot, state.cache)
    torch.testing.assert_close(step[0], ref["gen_step_logits_a"][0, 1], atol=1e-4, rtol=0)


def test_decode_step_shapes_never_change(tiny, ref, monkeypatch):
    """The step reads the whole static buffer: the same shapes at every slot, written in place."""
    prompt = tiny.check_prompt(ref["input_ids_b"], max_new_tokens=8)
    state = tiny.prefill(prompt, cache_len=prompt.spliced_length + 8)
    k_ptrs, shapes, attention = [k.data_ptr() for k in state.cache.k], set(), model_ops.attention

    def spy(q, k, v, **kw):
        shapes.add((q.shape, k.shape))
        return attention(q, k, v, **kw)

    monkeypatch.setattr(model_ops, "attention", spy)
    tokens = state.logits.argmax(-1, keepdim=True)
    for _ in range(3):
        tokens = tiny.decode_step(tokens, state.positions, state.slot, state.cache).argmax(-1, keepdim=True)
        state.positions += 1
        state.slot += 1
    assert [k.data_ptr() for k in state.cache.k] == k_ptrs
    assert shapes == {((1, 4, 1, 32), (1, 2, state.cache.max_len, 32))}


def test_first_valid_key_is_int32_per_row_start():
    """The (B,) left-padding description the attention kernel reads, in its dtype (no per-layer cast)."""
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    start = first_valid_key(mask)
    assert start.dtype == torch.int32 and start.tolist() == [0, 2, 1]
    assert first_valid_key(torch.ones(2, 3, dtype=torch.long)) is None
