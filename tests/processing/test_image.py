"""Image preprocessing vs the reference tensors in fixtures/images, mode handling, and bad input."""
from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from helpers.paths import FIXTURES
from PIL import Image, ImageFile
from safetensors.torch import load_file

from glm4v_core.processing import image as processing_image
from glm4v_core.processing.image import ImageError, load_image, preprocess

IMAGES = FIXTURES / "images"
PAIRS = [(name, size) for name in ("gradient_rgb_97x61", "rgba_alpha_40x40", "gray_L_50x80") for size in (56, 112)]
# The preprocessing constants, written out here rather than imported from the code under test.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def reference(name: str, size: int) -> torch.Tensor:
    return load_file(IMAGES / f"{name}.S{size}.safetensors")["pixel_values"]


def assert_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == torch.float32 and actual.shape == expected.shape, (actual.dtype, actual.shape)
    diff = (actual - expected).abs()
    assert torch.equal(actual, expected), f"max abs diff {diff.max().item():.3g}, mean {diff.mean().item():.3g}"


def normalized(rgb: np.ndarray) -> torch.Tensor:
    """What an (H, W, 3) uint8 image becomes when no resize happens (size == its own square size)."""
    x = (rgb.astype(np.float32) / np.float32(255) - CLIP_MEAN) / CLIP_STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


# -- exact against the reference -----------------------------------------------------------------

@pytest.mark.parametrize("name, size", PAIRS)
def test_path_matches_reference(name, size):
    assert_exact(load_image(IMAGES / f"{name}.png", size), reference(name, size))


@pytest.mark.parametrize("name, size", PAIRS)
def test_pil_image_matches_reference(name, size):
    with Image.open(IMAGES / f"{name}.png") as img:  # lazy, still in its file mode (RGBA, L, ...)
        assert_exact(load_image(img, size), reference(name, size))


def test_preprocess_stacks_in_order():
    names = ["gray_L_50x80", "gradient_rgb_97x61", "rgba_alpha_40x40"]
    batch = preprocess([str(IMAGES / f"{n}.png") for n in names], 56)
    assert_exact(batch, torch.stack([reference(n, 56) for n in names]))


def test_torch_bicubic_would_not_match():
    """Negative control: the fixtures tell a resize done in torch from PIL's."""
    with Image.open(IMAGES / "gradient_rgb_97x61.png") as img:
        rgb = np.asarray(img.convert("RGB"))
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255
    x = torch.nn.functional.interpolate(x, size=(56, 56), mode="bicubic", antialias=True)[0]
    x = (x - torch.from_numpy(CLIP_MEAN)[:, None, None]) / torch.from_numpy(CLIP_STD)[:, None, None]
    assert (x - reference("gradient_rgb_97x61", 56)).abs().max() > 1e-2


# -- modes: what RGB each becomes (checked at size == image size, where resize is a copy) --------

def test_palette_with_transparency():
    palette = [10, 20, 30, 200, 100, 50, 0, 255, 7]
    img = Image.new("P", (2, 2))
    img.putpalette(palette + [0] * (768 - len(palette)))
    img.putdata([0, 1, 2, 1])
    img.info["transparency"] = 1  # dropped, like the alpha of RGBA
    expected = np.array([[[10, 20, 30], [200, 100, 50]], [[0, 255, 7], [200, 100, 50]]], dtype=np.uint8)
    assert_exact(load_image(img, 2), normalized(expected))


def test_cmyk():
    img = Image.new("CMYK", (2, 2))
    img.putdata([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255), (0, 128, 0, 128)])
    # white, cyan, black; then channel = (255 - ink) * (255 - k) / 255, rounded down
    expected = np.array([[[255, 255, 255], [0, 255, 255]], [[0, 0, 0], [127, 63, 127]]], dtype=np.uint8)
    assert_exact(load_image(img, 2), normalized(expected))


@pytest.mark.parametrize("mode, dtype", [("I;16", "<u2"), ("I;16B", ">u2")])
def test_sixteen_bit_gray_keeps_the_top_byte(mode, dtype):
    gray = np.arange(256, dtype=np.uint16).reshape(16, 16)
    img = Image.frombytes(mode, (16, 16), (gray * 257).astype(dtype).tobytes())  # 8-bit data as 16-bit
    # Why not plain convert('RGB'): Pillow clips 16-bit values at 255 instead of scaling them.
    assert np.asarray(img.convert("RGB"))[1:].min() == 255
    expected = np.repeat(gray.astype(np.uint8)[..., None], 3, axis=2)
    assert_exact(load_image(img, 16), normalized(expected))


def test_sixteen_bit_png_file(tmp_path):
    gray = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 4 * 257)
    Image.frombytes("I;16", (8, 8), gray.astype("<u2").tobytes()).save(tmp_path / "g16.png")
    expected = np.repeat((gray >> 8).astype(np.uint8)[..., None], 3, axis=2)
    assert_exact(load_image(tmp_path / "g16.png", 8), normalized(expected))


@pytest.mark.parametrize("mode, pixel, rgb", [("LA", (77, 0), (77, 77, 77)), ("1", 1, (255, 255, 255)),
                                              ("L", 9, (9, 9, 9)), ("RGBA", (1, 2, 3, 0), (1, 2, 3))])
def test_other_modes(mode, pixel, rgb):
    img = Image.new(mode, (3, 3), pixel)
    assert_exact(load_image(img, 3), normalized(np.full((3, 3, 3), rgb, dtype=np.uint8)))


@pytest.mark.parametrize("mode", ["I", "F"])
def test_modes_of_unknown_range_are_refused(mode):
    with pytest.raises(ImageError, match=f"mode '{mode}'.*convert it"):
        load_image(Image.new(mode, (4, 4)), 4)


# -- bad input -----------------------------------------------------------------------------------

def png_bytes(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height RGB pixels but holds a few bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError, match="nope.png not found"):
        load_image(tmp_path / "nope.png", 56)
    with pytest.raises(ImageError, match="is a folder, not a regular file"):
        load_image(tmp_path, 56)


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty.png is empty \(0 bytes\)"):
        load_image(tmp_path / "empty.png", 56)


def test_truncated_file(tmp_path):
    data = png_bytes(64, 64)
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cannot decode .*cut.png"):
        load_image(tmp_path / "cut.png", 56)


def test_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("not a picture\n")
    with pytest.raises(ImageError, match="notes.png is not an image file"):
        load_image(tmp_path / "notes.png", 56)


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    # 9000 x 9000 = 81M pixels: over our 64M limit, under Pillow's 89M warning. Decoding would fail
    # as truncated; the limit message proves the check came first.
    (tmp_path / "bomb.png").write_bytes(png_header_only(9000, 9000))
    with pytest.raises(ImageError, match="9000x9000 = 81000000 pixels, over MAX_IMAGE_PIXELS"):
        load_image(tmp_path / "bomb.png", 56)


def test_pixel_limit_applies_to_pil_images(monkeypatch):
    monkeypatch.setattr(processing_image, "MAX_IMAGE_PIXELS", 99)
    with pytest.raises(ImageError, match="10x10 = 100 pixels, over MAX_IMAGE_PIXELS = 99"):
        load_image(Image.new("RGB", (10, 10)), 56)


@pytest.mark.parametrize("pil_limit", [1000, 4000])  # 64x64 = 4096: Pillow errors over 2x, warns over 1x
def test_pillow_bomb_guard_becomes_image_error(tmp_path, monkeypatch, pil_limit):
    (tmp_path / "big.png").write_bytes(png_bytes(64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
    with pytest.raises(ImageError, match="over Pillow's decompression-bomb limit"):
        load_image(tmp_path / "big.png", 56)


@pytest.mark.parametrize("size", [0, -56, 56.0, True, "56"])
def test_bad_size(size):
    with pytest.raises(ImageError, match="image size must be a positive int"):
        load_image(Image.new("RGB", (4, 4)), size)


def test_bad_input_type():
    with pytest.raises(ImageError, match="expected a file path or a PIL.Image.Image, got ndarray"):
        load_image(np.zeros((4, 4, 3), dtype=np.uint8), 4)
    with pytest.raises(ImageError, match="non-empty list"):
        preprocess([], 4)


def png_with_text_bomb() -> bytes:
    """A valid 4x4 PNG with a 20 kB zTXt chunk that inflates to 20 MB, past Pillow's MAX_TEXT_CHUNK."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    data = png_bytes(4, 4)
    return data[:33] + chunk(b"zTXt", b"comment\0\0" + zlib.compress(b"\0" * (20 << 20), 9)) + data[33:]


def test_text_chunk_bomb_and_bad_header_values(tmp_path):
    # Pillow raises a bare ValueError for both, which Image.open lets through
    (tmp_path / "bomb.png").write_bytes(png_with_text_bomb())
    with pytest.raises(ImageError, match="cannot read image .*bomb.png: Decompressed data too large"):
        load_image(tmp_path / "bomb.png", 56)
    (tmp_path / "bad.ppm").write_bytes(b"P6\n4o 4\n255\n" + bytes(48))
    with pytest.raises(ImageError, match="cannot read image .*bad.ppm: invalid literal"):
        load_image(tmp_path / "bad.ppm", 56)


def test_pillow_bomb_warning_is_an_error_under_any_warning_filter(tmp_path, monkeypatch):
    monkeypatch.setattr(processing_image, "MAX_IMAGE_PIXELS", 10**9)  # only Pillow's 89M warning is left
    (tmp_path / "big.png").write_bytes(png_header_only(10000, 10000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ImageError, match="decompression-bomb limit"):
            load_image(tmp_path / "big.png", 56)


@pytest.mark.parametrize("size", [(0, 0), (0, 5), (7, 0)])
def test_an_image_without_pixels_is_refused(size):
    # PIL resizes these to an all-black input without a word
    with pytest.raises(ImageError, match=f"is {size[0]}x{size[1]}: an image with no pixels"):
        load_image(Image.new("RGB", size), 4)


def test_nul_byte_in_a_path():
    with pytest.raises(ImageError, match="holds a NUL byte"):
        load_image("cat\0.png", 56)


def test_verify_image_decodes_like_load_image(tmp_path):
    assert processing_image.verify_image(IMAGES / "gradient_rgb_97x61.png") == (97, 61)
    data = png_bytes(64, 64)
    bad = {"cut.png": data[:-200],  # header intact: only a full decode finds it
           "notes.png": b"not a picture", "bomb.png": png_header_only(9000, 9000), "text.png": png_with_text_bomb()}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ImageError) as loaded:
            load_image(tmp_path / name, 56)
        with pytest.raises(ImageError) as verified:
            processing_image.verify_image(tmp_path / name)
        assert str(verified.value) == str(loaded.value) and name in str(loaded.value)
    with pytest.raises(ImageError, match="expected a file path, got Image"):
        processing_image.verify_image(Image.new("RGB", (4, 4)))


@pytest.mark.parametrize("error", [EOFError("no more data"), struct.error("unpack requires 4 bytes"),
                                   IndexError("list index out of range")])
def test_any_kind_of_decoder_failure_is_an_image_error(tmp_path, monkeypatch, error):
    # Pillow's readers fail with these too on damaged data; what they raise differs by format
    (tmp_path / "ok.png").write_bytes(png_bytes(8, 8))
    def fail(self):
        raise error
    monkeypatch.setattr(ImageFile.ImageFile, "load", fail)
    with pytest.raises(ImageError, match=f"cannot decode .*ok.png.*{error}"):
        load_image(tmp_path / "ok.png", 8)
