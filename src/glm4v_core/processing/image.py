"""Image preprocessing for GLM-4V: file or PIL image -> normalized float32 (3, S, S).

The reference (THUDM/glm-4v-9b `apply_chat_template`, after the demos' `convert('RGB')`) is torchvision
`Resize((S, S), BICUBIC)` on the PIL image, `ToTensor`, `Normalize(CLIP mean/std)`. PIL's own resize
plus float32 `(x / 255 - mean) / std` reproduces it bit for bit (tests/fixtures/images); torch's
bicubic `interpolate` does not (0.06-0.24 off), so the resize stays in PIL. Like the reference, no
EXIF rotation is applied.

Every bad file is an ImageError naming it: not a regular file, empty, not an image, over
MAX_IMAGE_PIXELS (checked from the header, before any pixel is decoded), a decompression bomb by
Pillow's own checks (its pixel-count warning is an error here, and so is a text chunk that inflates
past its limit), truncated or corrupt data, or a mode with no RGB meaning. `verify_image` runs the
same checks and the full decode once without keeping the pixels, so that a caller (the fine-tuning
data reader) can refuse a file up front that `load_image` would refuse later.
"""
from __future__ import annotations

import struct
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from glm4v_conversion.files import check_regular_file
from glm4v_core.errors import GLM4VError


class ImageError(GLM4VError):
    """An image that cannot be read, is too large, or has a mode we cannot map to RGB."""


ImageInput = str | Path | Image.Image

# Refuse images over this many pixels before decoding them (decompression-bomb guard). 64M pixels is
# ~190 MB as RGB, 50x a 1120x1120 input; Pillow's own guard (89M warn, 179M error) also becomes ImageError.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
# CLIP normalization constants, as float32 like torchvision's Normalize uses them.
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
# Modes holding 16-bit samples; PIL's convert('RGB') would clip them at 255 (almost all white).
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
# Modes with no agreed 8-bit meaning (value range unknown): the caller must convert them.
UNSUPPORTED_MODES = ("I", "F")
# What Pillow's readers raise on a damaged file: Image.open turns some of these into
# UnidentifiedImageError itself, but not all (a ValueError from a PPM header or a PNG text chunk).
PILLOW_FILE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error)


def load_image(image: ImageInput, size: int) -> torch.Tensor:
    """A path or PIL image -> float32 (3, size, size), normalized exactly like the reference."""
    size = _check_size(size)
    if isinstance(image, Image.Image):
        return _preprocess(_to_rgb(image, "PIL image"), size)
    if not isinstance(image, (str, Path)):
        raise ImageError(f"expected a file path or a PIL.Image.Image, got {type(image).__name__}")
    path = _as_path(image)
    with _open(path) as img:
        return _preprocess(_to_rgb(img, str(path)), size)


def verify_image(path: str | Path) -> tuple[int, int]:
    """Decode the file once as load_image does and drop the pixels; its (width, height).

    Raises the ImageError load_image would raise, so a file that passes here loads later."""
    if not isinstance(path, (str, Path)):
        raise ImageError(f"expected a file path, got {type(path).__name__}")
    path = _as_path(path)
    with _open(path) as img:
        _to_rgb(img, str(path))  # the full decode; the RGB copy is dropped on return
        return img.size


def preprocess(images: Sequence[ImageInput], size: int) -> torch.Tensor:
    """Several paths or PIL images -> float32 (B, 3, size, size)."""
    if isinstance(images, (str, Path, Image.Image)) or len(images) == 0:
        raise ImageError("preprocess expects a non-empty list of images (use load_image for one)")
    return torch.stack([load_image(im, size) for im in images])


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ImageError(f"image size must be a positive int (vision_config.image_size), got {size!r}")
    return size


def _as_path(image: str | Path) -> Path:
    if "\0" in str(image):  # os.stat would raise a bare ValueError
        raise ImageError(f"image path {str(image)!r} holds a NUL byte: no file can have that name")
    return Path(image)


def _open(path: Path) -> Image.Image:
    """Open lazily (header only) and refuse oversized images before any pixel is decoded."""
    # a FIFO, device or folder is refused before any open: reading a FIFO would block
    if check_regular_file(path, "image file", ImageError).st_size == 0:
        raise ImageError(f"image file {path} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow warns (not raises) between its 89M and 179M pixel limits; make that an error too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image {path} is over Pillow's decompression-bomb limit: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{path} is not an image file Pillow can read") from e
    except PILLOW_FILE_ERRORS as e:
        raise ImageError(f"cannot read image {path}: {getattr(e, 'strerror', None) or e}") from e
    try:
        _check_pixels(img, str(path))
    except ImageError:
        img.close()
        raise
    return img


def _check_pixels(img: Image.Image, name: str) -> None:
    w, h = img.size
    if w * h == 0:  # would resize to a silent all-black input
        raise ImageError(f"{name} is {w}x{h}: an image with no pixels")
    if w * h > MAX_IMAGE_PIXELS:
        raise ImageError(
            f"{name} is {w}x{h} = {w * h} pixels, over MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS} "
            "(decompression-bomb guard; checked before decoding)"
        )


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    """Decode (if still lazy) and map to RGB as the reference's convert('RGB') does: alpha dropped
    without compositing, gray replicated, palette looked up, CMYK by PIL's formula. One deliberate
    difference: 16-bit gray keeps its top 8 bits, where convert('RGB') would clip it to white."""
    _check_pixels(img, name)
    if img.mode in UNSUPPORTED_MODES:
        raise ImageError(
            f"{name} has mode {img.mode!r} (32-bit samples of unknown range); convert it to 'L', "
            "'I;16' or 'RGB' first"
        )
    try:
        if img.mode in SIXTEEN_BIT_MODES:
            # Keep the top 8 bits: x * 257 (8-bit data stored as 16-bit) maps back to exactly x.
            img = Image.fromarray((np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8))
        return img.convert("RGB")
    except PILLOW_FILE_ERRORS as e:  # truncated or corrupt data surfaces on decode
        raise ImageError(f"cannot decode {name} (mode {img.mode!r}): {e}") from e


def _preprocess(rgb: Image.Image, size: int) -> torch.Tensor:
    # A stretch to (size, size): no crop, no aspect ratio kept, exactly as the reference.
    resized = rgb.resize((size, size), Image.BICUBIC)
    x = np.asarray(resized, dtype=np.uint8).astype(np.float32)  # (S, S, 3)
    # float32 throughout, divide by 255 (not multiply by 1/255): that is what makes it bit-exact.
    x = (x / np.float32(255) - MEAN) / STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (3, S, S)
