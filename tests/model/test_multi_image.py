"""Several images per prompt: parity with the multi_image fixtures, the splice against a loop
oracle, the checks (blocks, counts, context), the ViT in bounded batches, and the CLI."""
from __future__ import annotations

import io
import sys

import pytest
import torch
from helpers.paths import BENCHMARKS
from safetensors.torch import load_file

import glm4v_core
from glm4v_core import cli, config
from glm4v_core.model.splice import ImageBlock, InputError, check_image_blocks, splice_images, spliced_length
from glm4v_core.parity import cli as parity_cli
from glm4v_core.parity import multi_image as parity_multi_image
from glm4v_core.parity import report as parity_report
from glm4v_core.processing import tokenizer as processing_tokenizer
from glm4v_core.processing.image import load_image

FIXTURES = ("tiny", "narrow")


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    return glm4v_core.load_model(fixtures_dir / "tiny")


@pytest.fixture(scope="module")
def ref(fixtures_dir):
    return load_file(str(fixtures_dir / "tiny" / "multi_image.safetensors"))


# -- parity with the reference-made fixtures ---------------------------------------------------------

@pytest.mark.parametrize("fixture", FIXTURES)
def test_multi_image_parity(fixtures_dir, fixture):
    """m1 two images in one turn, m2 one per turn, m3 a padded batch with 2, 0, 1 images: spliced
    positions exact, logits within 1e-4 (fp32, where the spliced mask is 1), 8 greedy tokens equal."""
    reports = parity_multi_image.run_multi_image_parity(fixtures_dir / fixture)
    assert [r.name for r in reports] == ["m1", "m2", "m3"]
    assert all(r.ok for r in reports), parity_report.format_report(reports, "float32")
    for r in reports:
        names = [s.name for s in r.stages]
        assert names[:1] == ["position_ids"] and "logits" in names and names[-1] == "greedy_tokens", names
        assert r.logits_max_abs <= 1e-4
    assert "attention_mask" in [s.name for s in reports[2].stages]


def test_negative_control_images_in_the_wrong_order_fail(fixtures_dir, monkeypatch):
    monkeypatch.setattr(parity_multi_image, "MULTI_IMAGE_CASES", {"m1": [1, 0], "m2": [2, 3], "m3": [1, 0, 3]})
    reports = {r.name: r for r in parity_multi_image.run_multi_image_parity(fixtures_dir / "tiny")}
    assert not reports["m1"].ok and not reports["m3"].ok and reports["m2"].ok
    assert reports["m1"].logits_max_abs > 1e-2


def test_negative_control_second_block_at_consecutive_positions_fails(fixtures_dir, consecutive_image_positions):
    """Patch rows numbered like text (the usual multi-image bug) must fail the position and logit checks."""
    reports = {r.name: r for r in parity_multi_image.run_multi_image_parity(fixtures_dir / "tiny")}
    assert not reports["m1"].ok and next(s for s in reports["m1"].stages if not s.ok).name == "position_ids"
    assert reports["m1"].logits_max_abs > 1e-2


def test_parity_cli_runs_the_multi_image_cases(fixtures_dir, capsys):
    assert parity_cli.main(["--checkpoint", str(fixtures_dir / "narrow")]) == 0
    out = capsys.readouterr().out
    assert "case m1" in out and "case m3" in out and "parity PASSED: 7/7" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fixture", FIXTURES)
def test_multi_image_parity_on_cuda(fixtures_dir, fixture):
    reports = parity_multi_image.run_multi_image_parity(fixtures_dir / fixture, device="cuda")
    assert [r.name for r in reports] == ["m1", "m2", "m3"]
    assert all(r.ok for r in reports), parity_report.format_report(reports, "float32")


# -- the splice against a per-token loop (the executable definition) ----------------------------------

BLOCK = ImageBlock(boi=60, pad=61, eoi=62, rows=5)  # 3 patch rows per image


def loop_splice(ids, embeds, positions, mask, images, block):
    """Token by token, block by block: the rule as a reader would write it."""
    B, L = ids.shape
    rows, k = [], 0
    m = mask if mask is not None else torch.ones_like(ids)
    for b in range(B):
        seq, j = [], 0
        while j < L:
            if ids[b, j] == block.boi:
                image = images[k]
                k += 1
                seq.append((image[0], positions[b, j], m[b, j], j, False))
                seq += [(image[r], positions[b, j + 1], m[b, j + 1], j + 1, True) for r in range(1, block.rows - 1)]
                seq.append((image[-1], positions[b, j + 2], m[b, j + 2], j + 2, False))
                j += 3
            else:
                seq.append((embeds[b, j], positions[b, j], m[b, j], j, False))
                j += 1
        rows.append(seq)
    T = max(map(len, rows))
    pad = (torch.zeros(embeds.shape[-1]), 0, 0, 0, False)
    rows = [[pad] * (T - len(seq)) + seq for seq in rows]
    field = lambda i: [[slot[i] for slot in seq] for seq in rows]  # noqa: E731
    out_mask = torch.tensor(field(2))
    same_length = all(slot is not pad for seq in rows for slot in seq)
    return (torch.stack([torch.stack(e) for e in field(0)]), torch.tensor(field(1)),
            None if mask is None and same_length else out_mask, torch.tensor(field(3)), torch.tensor(field(4)))


def random_batch(seed: int, block: ImageBlock, H: int = 3):
    """1-3 left-padded rows, each 1-3 text tokens with 0-3 image blocks anywhere between them."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    rows, n_images = [], 0
    for _ in range(draw(1, 4)):
        pieces = [[t] for t in torch.randint(0, 50, (draw(1, 4),), generator=g).tolist()]
        for _ in range(draw(0, 4)):
            pieces.insert(draw(0, len(pieces) + 1), [block.boi, block.pad, block.eoi])
            n_images += 1
        rows.append([t for piece in pieces for t in piece])
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), block.pad)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    positions = torch.zeros(len(rows), L, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, L - len(row):], mask[b, L - len(row):] = torch.tensor(row), 1
        positions[b, L - len(row):] = torch.arange(len(row))
    embeds = torch.randn(len(rows), L, H, generator=g)
    images = torch.randn(n_images, block.rows, H, generator=g)
    return ids, embeds, positions, mask, images


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("padded", [True, False])
def test_splice_equals_the_loop_definition(seed, padded):
    ids, embeds, positions, mask, images = random_batch(seed, BLOCK)
    if not padded:
        ids, embeds, positions, mask = ids[:1], embeds[:1], positions[:1], None  # one row, nothing padded
        images = images[:int((ids == BLOCK.boi).sum())]
    check_image_blocks(ids, images.shape[0], BLOCK, mask)
    got = splice_images(ids, embeds, positions, mask, images, BLOCK)
    want = loop_splice(ids, embeds, positions, mask, images, BLOCK)
    assert torch.equal(got.embeds, want[0])
    assert torch.equal(got.position_ids, want[1])
    assert (got.attention_mask is None) == (want[2] is None)
    if want[2] is not None:
        assert torch.equal(got.attention_mask, want[2])
    assert torch.equal(got.source_index, want[3]) and got.source_index.dtype == torch.long
    assert torch.equal(got.is_patch, want[4])
    assert got.embeds.shape[1] == spliced_length(ids, BLOCK)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("seed", range(8))
def test_splice_on_cuda_equals_the_loop_definition(seed):
    ids, embeds, positions, mask, images = random_batch(seed, BLOCK)
    got = splice_images(*(t.cuda() for t in (ids, embeds, positions, mask, images)), BLOCK)
    want = loop_splice(ids, embeds, positions, mask, images, BLOCK)
    fields = (got.embeds, got.position_ids, got.attention_mask, got.source_index, got.is_patch)
    for ours, theirs in zip(fields, want, strict=True):
        assert torch.equal(ours.cpu(), theirs)


def test_splice_layout_by_hand():
    """Row 0: two images; row 1: none, so it is left-padded by 2 * (rows - 3) = 4 slots."""
    b = BLOCK
    ids = torch.tensor([[7, b.boi, b.pad, b.eoi, b.boi, b.pad, b.eoi, 8],
                        [1, 2, 3, 4, 5, 6, 7, 8]])
    embeds = torch.arange(16.).view(2, 8, 1)
    images = torch.tensor([[[100.], [101.], [102.], [103.], [104.]], [[200.], [201.], [202.], [203.], [204.]]])
    s = splice_images(ids, embeds, torch.arange(8).expand(2, 8), None, images, b)
    assert s.embeds[0, :, 0].tolist() == [0, 100, 101, 102, 103, 104, 200, 201, 202, 203, 204, 7]
    assert s.position_ids[0].tolist() == [0, 1, 2, 2, 2, 3, 4, 5, 5, 5, 6, 7]
    assert s.source_index[0].tolist() == [0, 1, 2, 2, 2, 3, 4, 5, 5, 5, 6, 7]
    assert s.is_patch[0].tolist() == [False, False, True, True, True, False, False, True, True, True, False, False]
    assert s.embeds[1, :, 0].tolist() == [0, 0, 0, 0, *range(8, 16)]
    assert s.position_ids[1].tolist() == [0, 0, 0, 0, *range(8)]
    assert s.attention_mask.tolist() == [[1] * 12, [0] * 4 + [1] * 8]
    assert not s.is_patch[1].any()


# -- checks: clear errors before any compute ---------------------------------------------------------

@pytest.mark.parametrize("row, message", [
    ([5, BLOCK.boi, BLOCK.pad, 9, 6], r"row 1: <\|begin_of_image\|> at index 1 .*found ids \[5, 60, 61, 9\]"),
    ([5, BLOCK.boi, BLOCK.eoi, 6, 6], r"row 1: <\|begin_of_image\|> at index 1 .*consecutive positions"),
    ([5, 6, 6, BLOCK.pad, BLOCK.eoi], r"row 1: <\|end_of_image\|> at index 4 is not part of a complete image block"),
    ([5, 6, 6, 6, BLOCK.boi], r"row 1: <\|begin_of_image\|> at index 4"),
    ([BLOCK.boi, BLOCK.pad, BLOCK.eoi, BLOCK.eoi, 6], r"row 1: <\|end_of_image\|> at index 3"),
])
def test_malformed_or_unbalanced_blocks(row, message):
    ids = torch.tensor([[BLOCK.boi, BLOCK.pad, BLOCK.eoi, 1, 2], row])
    with pytest.raises(InputError, match=message):
        check_image_blocks(ids, 2, BLOCK)


def test_image_count_must_equal_block_count():
    ids = torch.tensor([[BLOCK.boi, BLOCK.pad, BLOCK.eoi, BLOCK.boi, BLOCK.pad, BLOCK.eoi], [1, 2, 3, 4, 5, 6]])
    assert check_image_blocks(ids, 2, BLOCK).tolist() == [2, 0]
    with pytest.raises(InputError, match=r"3 image\(s\) given for 2 image block\(s\) in 1 row\(s\) "
                                         r"\(blocks per row: \[2, 0\]\)"):
        check_image_blocks(ids, 3, BLOCK)
    with pytest.raises(InputError, match=r"row 0 holds the image placeholder .* but no image was given"):
        check_image_blocks(ids, 0, BLOCK)
    with pytest.raises(InputError, match="no image placeholder"):
        check_image_blocks(ids[1:], 1, BLOCK)


def test_too_many_images_for_the_context_names_the_count_and_the_budget():
    real = ImageBlock(boi=60, pad=61, eoi=62, rows=1602)  # 1120 px: 1600 patch rows + boi + eoi
    ids = torch.tensor([[1, 2] + [60, 61, 62] * 5 + [3]])  # 3 text tokens, 5 images = 8013 slots
    check_image_blocks(ids, 5, real, max_new_tokens=179)  # 8192 exactly: allowed
    with pytest.raises(InputError, match=r"context of 8192: 3 text tokens \+ 5 image\(s\) x 1602 cache slots "
                                         r"\+ max_new_tokens 180 = 8193 slots; .*at most 4 image\(s\) fit"):
        check_image_blocks(ids, 5, real, max_new_tokens=180)
    with pytest.raises(InputError, match=r"row 1 exceeds the model's context of 8192: 8190 tokens \+ max_new_tokens 3 "
                                         r"= 8193 cache slots$"):
        check_image_blocks(torch.tensor([[5] * 8190, [6] * 8190]), 0, real, max_new_tokens=3,
                           attention_mask=torch.tensor([[0] * 10 + [1] * 8180, [1] * 8190]))
    six = torch.tensor([[1, 2] + [60, 61, 62] * 6 + [3]])
    with pytest.raises(InputError, match=r"6 image\(s\) x 1602 .*at most 5 image\(s\) fit"):
        check_image_blocks(six, 6, real)


@pytest.fixture
def no_compute(tiny, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the model ran before the input error was raised")
    for name in ("forward", "prefill", "encode_images"):
        monkeypatch.setattr(tiny, name, forbidden)
    return tiny


def test_generate_refuses_images_beyond_the_context_before_compute(no_compute):
    """8000 text tokens + 40 images: 8120 unspliced tokens would fit, 8240 cache slots do not."""
    c = no_compute.config
    ids = torch.tensor([[5] * 8000 + [c.boi_token_id, c.pad_token_id, c.eoi_token_id] * 40])
    pixels = torch.zeros(40, 3, c.vision.image_size, c.vision.image_size)
    with pytest.raises(InputError, match=r"context of 8192: 8000 text tokens \+ 40 image\(s\) x 6 cache slots"):
        glm4v_core.generate(no_compute, ids, pixels, max_new_tokens=16)


def test_model_refuses_mismatched_counts_before_compute(tiny, ref, monkeypatch):
    monkeypatch.setattr(tiny, "encode_images", lambda *a: pytest.fail("the ViT ran before the error"))
    with pytest.raises(InputError, match=r"3 image\(s\) given for 2 image block\(s\)"):
        tiny(ref["input_ids_m1"], ref["pixel_values"][:3])


def test_zero_images_is_no_image(tiny, ref):
    """pixel_values (0, 3, S, S) with a text-only prompt: the text-only forward."""
    ids = ref["input_ids_m3"][1:2, 3:]  # the text-only row without its pads
    size = tiny.config.vision.image_size
    with torch.no_grad():
        assert torch.equal(tiny(ids, torch.zeros(0, 3, size, size)).logits, tiny(ids).logits)


# -- the ViT in bounded batches, cache sizing -------------------------------------------------------

def test_vit_runs_in_bounded_batches(tiny, ref, monkeypatch):
    pixels = torch.cat([ref["pixel_values"], ref["pixel_values"][:1]])  # 5 images
    whole = tiny.projector(tiny.vision(pixels))
    sizes = []
    real_forward = tiny.vision.forward
    monkeypatch.setattr(tiny.vision, "forward", lambda x: sizes.append(x.shape[0]) or real_forward(x))
    chunked = tiny.encode_images(pixels, max_batch=2)
    assert sizes == [2, 2, 1]
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    sizes.clear()
    ids = torch.cat([ref["input_ids_m1"][:, :-1], ref["input_ids_m2"][:, 3:]], dim=1)  # 4 blocks in one row
    with torch.no_grad():
        tiny(ids, ref["pixel_values"])
    assert sizes and max(sizes) <= 4 and sum(sizes) == 4


def test_generate_sizes_the_cache_to_the_spliced_prompt(tiny, ref, monkeypatch):
    sizes = []
    real_prefill = tiny.prefill
    monkeypatch.setattr(tiny, "prefill", lambda prompt, n: sizes.append((prompt.input_ids.shape[0], n)) or
                        real_prefill(prompt, n))
    glm4v_core.generate(tiny, ref["input_ids_m3"], ref["pixel_values"][[0, 1, 3]], ref["attention_mask_m3"],
                        ref["position_ids_in_m3"], max_new_tokens=3, stop_ids=[])
    assert sizes == [(3, ref["logits_m3"].shape[1] + 3)]


def test_benchmark_smoke(tmp_path):
    """benchmarks/multi_image.py end to end on the tiny fixture (one fresh process per image count)."""
    import json
    import subprocess
    script = BENCHMARKS / "multi_image.py"
    subprocess.run([sys.executable, str(script), "--fixtures", "tiny", "--images", "1,2", "--repeat", "1",
                    "--threads", "1", "--out", str(tmp_path)], check=True, capture_output=True, text=True)
    rows = json.loads((tmp_path / "multi_image_cpu.json").read_text())["fixtures"]["tiny"]
    assert [r["images"] for r in rows] == [1, 2]
    assert [r["cache_slots"] for r in rows] == [r["prompt_tokens"] + r["images"] * 3 for r in rows]  # tiny: 6 rows
    assert all(r["ttft_ms"] > 0 and r["peak_mem_MiB"] >= 0 for r in rows)


# -- CLI -------------------------------------------------------------------------------------------

def run(capsys, monkeypatch, argv, stdin=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", stdin if not isinstance(stdin, str) else io.StringIO(stdin))
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def spy(monkeypatch):
    calls = []

    def stream_text(model, tokenizer, input_ids, pixel_values=None, **kwargs):
        calls.append((input_ids[0].tolist(), pixel_values))
        yield f"answer {len(calls)}"

    monkeypatch.setattr(cli, "stream_text", stream_text)
    return calls


@pytest.fixture(scope="module")
def images(fixtures_dir):
    return [fixtures_dir / "images" / name for name in ("gradient_rgb_97x61.png", "gray_L_50x80.png")]


def test_generate_with_two_images(capsys, monkeypatch, spy, images, tiny):
    rc, out, err = run(capsys, monkeypatch, ["generate", "--image", str(images[0]), "--image", str(images[1]),
                                             "--max-new-tokens", "2", "Which is brighter?"])
    assert rc == 0, err
    ((ids, pixels),) = spy
    c = tiny.config
    boi = ids.index(c.boi_token_id)
    assert ids[boi:boi + 6] == [c.boi_token_id, c.pad_token_id, c.eoi_token_id] * 2  # both before the text
    want = torch.stack([load_image(p, 56) for p in images])
    assert torch.equal(pixels, want)
    assert f"2 image(s), spliced prompt {len(ids) - 6 + 2 * (2 + c.vision.num_image_tokens)} tokens" in err


def test_chat_image_command_attaches_to_the_next_turn(capsys, monkeypatch, spy, images, tiny):
    stdin = f"hello\n/image {images[0]}\n/image {images[1]}\nsecond\nthird\n/image nope.png\n/image\nfourth\n"
    rc, out, err = run(capsys, monkeypatch, ["chat"], stdin)
    assert rc == 0, err
    assert out == "answer 1\nanswer 2\nanswer 3\nanswer 4\n"
    boi = tiny.config.boi_token_id
    assert [ids.count(boi) for ids, _ in spy] == [0, 2, 2, 2]  # turn 2 takes both; the history keeps them
    assert spy[0][1] is None and all(p.shape == (2, 3, 56, 56) for _, p in spy[1:])
    second = spy[1][0]
    assert second[:len(spy[0][0])] == spy[0][0]  # turn 1 had no image: the images start after it
    assert "attached to your next message (2 waiting)" in err
    assert "nope.png" in err and "usage: /image PATH" in err  # bad and empty commands keep the session
    assert err.count("0 image(s)") == 1 and err.count("2 image(s)") == 3


def test_ctrl_c_cancels_the_answer_and_keeps_the_session(capsys, monkeypatch):
    calls = []

    def stream_text(model, tokenizer, input_ids, pixel_values=None, **kwargs):
        calls.append(input_ids[0].tolist())
        yield "partial"
        if len(calls) == 1:
            raise KeyboardInterrupt
        yield " done"

    monkeypatch.setattr(cli, "stream_text", stream_text)
    rc, out, err = run(capsys, monkeypatch, ["chat"], "first\nsecond\n")
    assert rc == 0, err
    assert out == "partial\npartial done\n" and "answer cancelled" in err
    tok = processing_tokenizer.truncated_tokenizer(config.BUNDLED_VOCABULARY, 801)
    assert tok.decode(calls[1][len(calls[0]):]) == "\npartial<|user|>\nsecond<|assistant|>"  # partial kept


class InterruptedStdin(io.StringIO):
    """stdin whose second readline is a Ctrl-C at the prompt."""

    def __init__(self, text):
        super().__init__(text)
        self.reads = 0

    def readline(self, *args):
        self.reads += 1
        if self.reads == 2:
            raise KeyboardInterrupt
        return super().readline(*args)


def test_ctrl_c_at_the_prompt_exits(capsys, monkeypatch, spy):
    rc, out, err = run(capsys, monkeypatch, ["chat"], InterruptedStdin("first\nsecond\n"))
    assert rc == 130 and out == "answer 1\n" and "interrupted" in err


def test_ctrl_c_in_generate_exits(capsys, monkeypatch):
    def stream_text(*args, **kwargs):
        yield "x"
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "stream_text", stream_text)
    rc, _, err = run(capsys, monkeypatch, ["generate", "hi"])
    assert rc == 130 and "interrupted" in err


def test_chat_with_images_runs_the_model(capsys, monkeypatch, images):
    stdin = f"/image {images[0]}\nfirst\n/image {images[1]}\nsecond\n"
    rc, out, err = run(capsys, monkeypatch, ["chat", "--max-new-tokens", "3"], stdin)
    assert rc == 0, err
    assert "1 image(s), spliced prompt" in err and "2 image(s), spliced prompt" in err
    assert err.count("time to first token") == 2
