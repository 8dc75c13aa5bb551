"""Tiny captioned pictures the training tests (and the align tests) learn from."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

CAPTIONS = ["red circle", "blue square", "green triangle", "a cat on a sofa"]
STYLE = [("white", "red"), ("black", "blue"), ("yellow", "green"), ("gray", "orange")]


def shape_image(i: int) -> Image.Image:
    background, fill = STYLE[i]
    image = Image.new("RGB", (40, 40), background)
    ImageDraw.Draw(image).ellipse([8, 8, 32, 32], fill=fill)
    return image


def write_caption_data(folder: Path, captions: list[str] = CAPTIONS) -> Path:
    """4 PNGs and a captions.jsonl with relative image paths."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "captions.jsonl", "w") as f:
        for i, caption in enumerate(captions):
            shape_image(i).save(folder / f"img{i}.png")
            f.write(json.dumps({"image": f"img{i}.png", "text": caption}) + "\n")
    return folder / "captions.jsonl"
