"""Opening user images safely: one clear error per bad file, RGB out, EXIF orientation applied."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import VLMError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# What Pillow raises for a file it cannot decode (UnidentifiedImageError is an OSError; some
# plugins end a truncated file with EOFError or SyntaxError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)
# Pillow's own bomb threshold is 89M pixels and only warns below 2x that; we refuse outright.
MAX_IMAGE_PIXELS = 64_000_000


# JPEGs over this many pixels decode at a reduced scale (libjpeg's DCT scaling, 1/2 to 1/8) that
# keeps their short side at least DRAFT_MIN_SIDE: a 100-megapixel photo then costs ~20 MB, not
# 300, and the model's input (a few hundred pixels a side) is made from far more pixels than it keeps.
DRAFT_ABOVE_PIXELS = 16_000_000
DRAFT_MIN_SIDE = 2048


def to_rgb(image: Image.Image, in_place: bool = False) -> Image.Image:
    """First frame, EXIF orientation applied, alpha composited on white, 8-bit RGB.

    `in_place`: `image` is ours to change (just decoded): no copy is made when nothing but the
    orientation changes (a large image would otherwise exist two or three times at once)."""
    try:
        image.seek(0)
    except EOFError:
        pass
    if in_place:
        ImageOps.exif_transpose(image, in_place=True)
    else:
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping to white.
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def load_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open `path` as an RGB image, or raise `VLMError` naming the file and the reason."""
    path = Path(path)
    if not path.exists():
        raise VLMError(f"{path}: no such file")
    if path.is_dir():
        raise VLMError(f"{path}: is a folder, not an image")
    if path.stat().st_size == 0:
        raise VLMError(f"{path}: empty file")
    return _decode(lambda: Image.open(path), str(path), max_pixels)


def load_image_bytes(data: bytes, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image sent as bytes (an API request's data URL) with the same checks as files;
    `name` says which image in the `VLMError`."""
    if not data:
        raise VLMError(f"{name}: empty image")
    return _decode(lambda: Image.open(io.BytesIO(data)), name, max_pixels)


def image_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) of an image sent as bytes, from its header alone (nothing is decoded)."""
    if not data:
        raise VLMError(f"{name}: empty image")
    return _guarded(lambda: _header_size(lambda: Image.open(io.BytesIO(data))), name)


def file_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file, from its header alone."""
    return _guarded(lambda: _header_size(lambda: Image.open(path)), str(path))


def _header_size(opener) -> tuple[int, int]:
    with opener() as image:
        return image.size


def _decode(opener, name: str, max_pixels: int) -> Image.Image:
    def decode() -> Image.Image:
        with opener() as image:
            width, height = image.size
            if width * height > max_pixels:
                raise VLMError(f"{name}: {width}x{height} pixels is over the {max_pixels:,} limit")
            if image.format == "JPEG" and width * height > DRAFT_ABOVE_PIXELS:
                scale = min(width, height) / DRAFT_MIN_SIDE
                image.draft(None, (int(width / scale), int(height / scale)))
            image.load()
            return to_rgb(image, in_place=True)

    return _guarded(decode, name)


def _guarded(work, name: str):
    """`work()` with Pillow's failures (and decompression-bomb warnings) as one `VLMError` naming `name`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return work()
    except VLMError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise VLMError(f"{name}: refused as a decompression bomb") from None
    except UnidentifiedImageError:
        raise VLMError(f"{name}: not an image (cannot identify the format)") from None
    except DECODE_ERRORS as e:
        raise VLMError(f"{name}: cannot decode image ({e})") from None
