"""Fine-tuning records the trainer cannot use are found when the data is read, never mid-run.

- Every image a record names is decoded once up front (processing.image.verify_image): a truncated
  or corrupt file, a text file, an empty file, a FIFO, an image over MAX_IMAGE_PIXELS, a Pillow
  decompression bomb (pixel count or a text chunk that inflates) are each `FILE:LINE: reason`,
  skipped by default or refused with --on-bad-record error; what is kept always collates.
- A line that is not UTF-8, longer than MAX_LINE_BYTES, nested too deeply for json or holding an
  integer Python will not parse is the same kind of bad record, and the lines after it keep their
  numbers. Lines end at "\\n" only (a raw U+2028 stays inside its record); a BOM may open the file.
- `glm4v generate --image` refuses the same files with one line naming them.
"""
from __future__ import annotations

import io
import json
import struct
import warnings
import zlib

import numpy as np
import pytest
from helpers.paths import FIXTURES
from helpers.robustness import deadline, make_special
from PIL import Image

from glm4v_core import cli
from glm4v_core.config import GLM4VConfig
from glm4v_core.processing import image as processing_image
from glm4v_core.processing.tokenizer import resolve_tokenizer
from glm4v_core.training import cli as training_cli
from glm4v_core.training import data as training_data
from glm4v_core.training import trainer as training_trainer
from glm4v_core.training.data import DataError, collate, read_samples

TINY = FIXTURES / "tiny"
GOOD_IMAGE = FIXTURES / "images" / "gradient_rgb_97x61.png"


@pytest.fixture(scope="module")
def config():
    return GLM4VConfig.from_json(TINY / "config.json")


@pytest.fixture(scope="module")
def tokenizer(config):
    return resolve_tokenizer(None, TINY, config)


def record(image: str | None = None, answer: str = "A gradient.") -> str:
    user = {"role": "user", "content": "What is it?"} | ({"image": image} if image else {})
    return json.dumps({"messages": [user, {"role": "assistant", "content": answer}]})


# -- bad image files, written by the tests ---------------------------------------------------------

def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int = 64, height: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def png_declaring(width: int, height: int, pixels: bytes = zlib.compress(b"\0" * 16)) -> bytes:
    """A PNG of a few dozen bytes whose header declares width x height RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def png_with_text_bomb() -> bytes:
    """A valid 4x4 PNG plus a ~20 kB zTXt chunk that inflates to 20 MB (past Pillow's MAX_TEXT_CHUNK)."""
    data = png(4, 4)
    bomb = chunk(b"zTXt", b"comment\0\0" + zlib.compress(b"\0" * (20 << 20), 9))
    return data[:33] + bomb + data[33:]  # after the 8-byte signature and the 25-byte IHDR chunk


def write(data: bytes):
    return lambda path: path.write_bytes(data)


BAD_IMAGES = {  # name: (make it at a path, words its reason must hold)
    # header intact, pixels cut: Image.open alone accepts this file; only a decode finds it
    "truncated": (write(png()[:-200]), ["cannot decode", "truncated"]),
    "corrupt pixel data": (write(png_declaring(8, 8, pixels=b"not zlib data")), ["cannot decode", "broken data"]),
    "not an image": (lambda p: p.write_text("a caption, not a picture\n"), ["not an image file Pillow can read"]),
    "empty": (write(b""), ["is empty (0 bytes)"]),
    "over MAX_IMAGE_PIXELS": (write(png_declaring(9000, 9000)), ["9000x9000", "over MAX_IMAGE_PIXELS"]),
    "pixel bomb": (write(png_declaring(20000, 20000)), ["decompression-bomb", "400000000 pixels"]),
    "text chunk bomb": (write(png_with_text_bomb()), ["cannot read image", "Decompressed data too large"]),
    "a FIFO": (lambda p: make_special(p, "fifo"), ["is a FIFO", "not a regular file"]),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_image_is_found_up_front_and_skipped_or_refused(tmp_path, tokenizer, config, case):
    make, words = BAD_IMAGES[case]
    make(tmp_path / "bad.png")
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join([record(str(GOOD_IMAGE)), record("bad.png"), record(str(GOOD_IMAGE))]) + "\n")
    reports = []
    with deadline(10):
        samples = read_samples(data, tokenizer, config, report=reports.append)
    assert [s.line for s in samples] == [1, 3]
    assert reports[0].startswith(f"{data}:2: skipped: message 0: image 'bad.png' is not a readable image (")
    assert all(w in reports[0] for w in words) and "\n" not in reports[0], reports
    collate(samples, tokenizer, config.vision.image_size)  # what was kept loads: no failure mid-run
    with deadline(10), pytest.raises(DataError) as info:
        read_samples(data, tokenizer, config, on_bad="error")
    message = str(info.value)
    assert message.startswith(f"{data}:2: message 0: image 'bad.png'") and "--on-bad-record skip" in message
    assert all(w in message for w in words), message


def test_pillow_bomb_warning_is_an_error_even_when_warnings_are_ignored(tmp_path, tokenizer, config, monkeypatch):
    # 10000 x 10000 is between Pillow's warning (89M) and error (179M) limits; our own limit is
    # lifted so that only Pillow's warning stands between the file and a 300 MB decode.
    monkeypatch.setattr(processing_image, "MAX_IMAGE_PIXELS", 10**9)
    (tmp_path / "bomb.png").write_bytes(png_declaring(10000, 10000))
    (tmp_path / "train.jsonl").write_text(record("bomb.png") + "\n" + record() + "\n")
    reports = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples = read_samples(tmp_path / "train.jsonl", tokenizer, config, report=reports.append)
    assert [s.line for s in samples] == [2]
    assert "decompression-bomb" in reports[0] and "100000000 pixels" in reports[0], reports


def test_each_image_is_decoded_once(tmp_path, tokenizer, config, monkeypatch):
    decoded = []
    verify = processing_image.verify_image
    monkeypatch.setattr(training_data, "verify_image", lambda p: decoded.append(p) or verify(p))
    (tmp_path / "bad.png").write_text("text")
    lines = [record(str(GOOD_IMAGE)), record("bad.png"), record(str(GOOD_IMAGE)), record("bad.png")]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    reports = []
    samples = read_samples(tmp_path / "train.jsonl", tokenizer, config, report=reports.append)
    assert [s.line for s in samples] == [1, 3]
    assert sorted(decoded) == sorted([str(GOOD_IMAGE), str(tmp_path / "bad.png")])
    assert "not an image file" in reports[1]  # the remembered reason, not a pass


# -- bad lines -------------------------------------------------------------------------------------

BAD_LINES = {  # name: (make the line's bytes, words its reason must hold)
    "100000 nested [": (lambda: b"[" * 100_000, ["JSON nested too deeply"]),
    "a 5000-digit integer": (lambda: b'{"messages": [], "n": ' + b"7" * 5000 + b"}",
                             ["JSON that Python cannot read", "5000 digits"]),
    "not UTF-8": (lambda: record().encode()[:20] + b"\xff" + record().encode()[20:], ["not UTF-8", "byte 21"]),
    "over MAX_LINE_BYTES": (lambda: b'{"messages": [], "pad": "' + b"x" * (17 << 20) + b'"}',
                            ["line is longer than MAX_LINE_BYTES"]),
    "a huge bad value": (lambda: json.dumps({"messages": [{"role": "user", "content": "q", "image": list(range(10**5))},
                                                          {"role": "assistant", "content": "a"}]}).encode(),
                         ["message 0: 'image' must be a path", "...]"]),
    "a huge unknown key": (lambda: json.dumps({"messages": [{"role": "user", "content": "q", "k" * 10**5: 1},
                                                            {"role": "assistant", "content": "a"}]}).encode(),
                           ["message 0 has unsupported keys", "characters)"]),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_line_is_one_short_reason_and_later_lines_keep_their_numbers(tmp_path, tokenizer, config, case):
    make, words = BAD_LINES[case]
    data = tmp_path / "train.jsonl"
    data.write_bytes(b"\n".join([record().encode(), make(), b"", record().encode()]) + b"\n")
    reports = []
    samples = read_samples(data, tokenizer, config, report=reports.append)
    assert [s.line for s in samples] == [1, 4]
    assert reports[0].startswith(f"{data}:2: skipped: ") and len(reports[0]) < 700, reports[0][:2000]
    assert "\n" not in reports[0]
    assert all(w in reports[0] for w in words), reports[0]
    with pytest.raises(DataError) as info:
        read_samples(data, tokenizer, config, on_bad="error")
    assert str(info.value).startswith(f"{data}:2: {words[0]}") and len(str(info.value)) < 800, str(info.value)[:2000]


def test_a_newline_in_an_image_name_stays_on_one_line(tmp_path, tokenizer, config):
    (tmp_path / "bad\n.png").write_text("not a picture")  # its name goes into the reason unquoted
    data = tmp_path / "train.jsonl"
    data.write_text(record("bad\n.png") + "\n" + record() + "\n")
    reports = []
    read_samples(data, tokenizer, config, report=reports.append)
    assert "\n" not in reports[0] and "bad\\n.png is not an image file" in reports[0], reports


def test_line_limit_is_exact(tmp_path, tokenizer, config, monkeypatch):
    monkeypatch.setattr(training_data, "MAX_LINE_BYTES", len(record()))
    data = tmp_path / "train.jsonl"
    data.write_bytes(b"\r\n".join([record().encode(), b" " + record().encode(), record().encode()]))  # last: no newline
    reports = []
    assert [s.line for s in read_samples(data, tokenizer, config, report=reports.append)] == [1, 3]
    assert "2: skipped: line is longer than MAX_LINE_BYTES" in reports[0], reports


def test_unicode_line_separators_stay_inside_their_record(tmp_path, tokenizer, config):
    # U+2028 and U+0085 are valid raw inside a JSON string; str.splitlines() would break the record there.
    answer = "one\u2028two\x85three"
    data = tmp_path / "train.jsonl"
    data.write_text("\ufeff" + record(answer=answer).replace("\\u2028", "\u2028").replace("\\u0085", "\x85")
                    + "\n" + record() + "\n", encoding="utf-8")
    assert "\u2028" in data.read_text(encoding="utf-8")
    samples = read_samples(data, tokenizer, config, report=pytest.fail)
    assert [s.line for s in samples] == [1, 2] and samples[0].messages[1]["content"] == answer


def test_data_file_that_is_a_fifo_is_refused_not_read(tmp_path, tokenizer, config):
    make_special(tmp_path / "train.jsonl", "fifo")
    with deadline(), pytest.raises(DataError, match="fine-tuning data .*train.jsonl is a FIFO"):
        read_samples(tmp_path / "train.jsonl", tokenizer, config)


# -- the commands ----------------------------------------------------------------------------------

def test_finetune_refuses_a_truncated_image_before_the_first_step(tmp_path, capsys, monkeypatch):
    def refuse(self):
        raise AssertionError("a training step ran before the refusal")
    monkeypatch.setattr(training_trainer.Trainer, "train_step", refuse)
    (tmp_path / "cut.png").write_bytes(png()[:-200])
    data = tmp_path / "train.jsonl"
    data.write_text(record(str(GOOD_IMAGE)) + "\n" + record("cut.png") + "\n")
    argv = ["--data", str(data), "--out", str(tmp_path / "out"), "--no-progress", "--max-steps", "1"]
    assert training_cli.main([*argv, "--on-bad-record", "error"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and f"{data}:2: message 0: image 'cut.png' is not a readable image" in err[0], err
    assert "truncated" in err[0] and not (tmp_path / "out" / "loss.jsonl").exists()


@pytest.mark.parametrize("case", ["truncated", "not an image", "over MAX_IMAGE_PIXELS", "pixel bomb",
                                  "text chunk bomb"])
def test_generate_refuses_the_same_images_in_one_line(tmp_path, capsys, case):
    make, words = BAD_IMAGES[case]
    make(tmp_path / "bad.png")
    assert cli.main(["generate", "--image", str(tmp_path / "bad.png"), "--max-new-tokens", "1", "hi"]) == 1
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1 and "bad.png" in err[0] and all(w in err[0] for w in words), err
    assert captured.out == ""
