"""A folder of every awkward kind of image file `vlm caption` must survive (for tests and bench)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

import tiny
from vlm.serve.writers import iter_rows

ROOT = Path(__file__).resolve().parent.parent

# name -> True when the file should get a caption, False when it should get an error row.
AWKWARD = {
    "zero-byte.jpg": False,
    "truncated.jpg": False,
    "not-an-image.jpg": False,
    "bomb.png": False,
    "cmyk.jpg": True,
    "sixteen-bit.png": True,
    "palette-transparent.png": True,
    "animated.gif": True,
    "grayscale.png": True,
    "exif-rotated.jpg": True,
    "one-pixel.png": True,
    "very-wide.png": True,
    "name with spaces.png": True,
    "näme-ünïcode-日本.png": True,
    "sub/dir/nested.webp": True,
}


def make_awkward_folder(folder: Path) -> dict[str, bool]:
    """Write every file of `AWKWARD` under `folder`; returns `AWKWARD`."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = tiny.random_image(1, (48, 40))
    (folder / "zero-byte.jpg").write_bytes(b"")
    buf = io.BytesIO()
    rgb.save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (folder / "not-an-image.jpg").write_text("this is plain text, not a JPEG\n")
    # A real PNG header claiming 20000 x 20000 pixels (400M): a decompression bomb, tiny on disk.
    Image.new("1", (20000, 20000)).save(folder / "bomb.png", optimize=True)
    rgb.convert("CMYK").save(folder / "cmyk.jpg", "JPEG")
    ramp = (np.arange(40 * 48, dtype=np.uint16).reshape(40, 48) * 30).astype(np.uint16)
    Image.fromarray(ramp, mode="I;16").save(folder / "sixteen-bit.png")
    palette = rgb.convert("P", palette=Image.ADAPTIVE, colors=8)
    palette.info["transparency"] = 0
    palette.save(folder / "palette-transparent.png", transparency=0)
    frames = [tiny.random_image(s, (32, 32)).convert("P") for s in (2, 3, 4)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    rgb.convert("L").save(folder / "grayscale.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    tiny.random_image(5, (60, 20)).save(folder / "exif-rotated.jpg", "JPEG", exif=exif)
    tiny.random_image(6, (1, 1)).save(folder / "one-pixel.png")
    tiny.random_image(7, (10000, 1)).save(folder / "very-wide.png")
    tiny.random_image(8).save(folder / "name with spaces.png")
    tiny.random_image(9).save(folder / "näme-ünïcode-日本.png")
    (folder / "sub" / "dir").mkdir(parents=True, exist_ok=True)
    tiny.random_image(10).save(folder / "sub" / "dir" / "nested.webp")
    return AWKWARD


def rows_of(path: Path) -> list[dict]:
    return list(iter_rows(str(path), "csv" if path.suffix == ".csv" else "jsonl"))


def images_folder(folder: Path, n: int, start: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        tiny.random_image(i, (24 + i % 5 * 7, 20 + i % 3 * 9)).save(folder / f"img{i:03d}.png")
    return folder


def cli_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    return env
