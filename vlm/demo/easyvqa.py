"""easy-vqa (4,000 + 1,000 64x64 images of one coloured shape) as JSONL rows for `vlm train`.

Writes, per split, `{split}_vqa.jsonl` rows `{image, question, answer, question_type, image_id}`
(`question_type` is colour / shape / yes/no, kept in `Example.meta` for per-type eval reports)
and `{split}_captions.jsonl` rows `{image, text: "a blue rectangle", image_id}`.

Each image's colour and shape come from its questions: a "what color" / "what shape" answer,
a yes/no answer about one colour or shape ("is there not a red shape?" -> no -> red), or
elimination. About 8% of images are not pinned down by their questions; for those the colour is
the exact palette colour the generator painted (measured below), and the shape comes from how
much of its bounding box it fills (triangle ~0.5, circle ~0.8, rectangle ~1.0).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import VLMError

DATA = "easy_vqa/data"
SPLITS = ("train", "test")
COLORS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "rectangle", "triangle")
NEGATIONS = {"not", "no"}


def question_type(answer: str) -> str:
    """colour / shape / yes/no, from the answer (each question type has its own answer set)."""
    if answer in COLORS:
        return "color"
    if answer in SHAPES:
        return "shape"
    if answer in ("yes", "no"):
        return "yes/no"
    raise VLMError(f"easy-vqa: unexpected answer {answer!r}")


def labels_from_questions(questions: list) -> dict[int, dict[str, str]]:
    """image id -> {"color": ..., "shape": ...} for what the questions pin down."""
    positive: dict[str, dict[int, set]] = {"color": defaultdict(set), "shape": defaultdict(set)}
    negative: dict[str, dict[int, set]] = {"color": defaultdict(set), "shape": defaultdict(set)}
    for question, answer, image_id in questions:
        words = re.findall(r"[a-z]+", question.lower())
        colors = [w for w in words if w in COLORS]
        shapes = [w for w in words if w in SHAPES]
        if answer in COLORS:  # "what color is the triangle?" -> colour, and the shape named
            positive["color"][image_id].add(answer)
            positive["shape"][image_id].update(shapes)
        elif answer in SHAPES:  # "what is the blue shape?" -> shape, and the colour named
            positive["shape"][image_id].add(answer)
            positive["color"][image_id].update(colors)
        else:
            truth = (answer == "yes") != bool(NEGATIONS.intersection(words))
            for kind, named in (("color", colors), ("shape", shapes)):
                (positive if truth else negative)[kind][image_id].update(named)
    labels: dict[int, dict[str, str]] = defaultdict(dict)
    for kind, values in (("color", set(COLORS)), ("shape", set(SHAPES))):
        for image_id in {q[2] for q in questions}:
            pos = positive[kind][image_id]
            if len(pos) > 1:
                raise VLMError(f"easy-vqa image {image_id}: questions disagree on its {kind} ({sorted(pos)})")
            left = pos or (values - negative[kind][image_id])
            if len(left) == 1:
                labels[image_id][kind] = next(iter(left))
    return labels


def labels_from_pixels(path: str | os.PathLike) -> dict[str, str]:
    """{"color", "shape"} of an easy-vqa image from its pixels (see module doc)."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int32)
    flat = pixels.reshape(-1, 3)
    counts = {name: int((flat == rgb).all(axis=1).sum()) for name, rgb in COLORS.items()}
    color = max(counts, key=counts.get)
    if counts[color] == 0:
        raise VLMError(f"{path}: no easy-vqa palette colour in the image")
    # Anti-aliased edges are near the colour too; 60 (sum over RGB) keeps them, not the background.
    mask = np.abs(pixels - np.array(COLORS[color])).sum(axis=-1) < 60
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    shape = "triangle" if fill < 0.71 else "circle" if fill < 0.955 else "rectangle"
    return {"color": color, "shape": shape}


def write_split(easy_vqa_dir: Path, split: str, out_dir: Path) -> dict[str, Path]:
    """Write `{split}_vqa.jsonl` and `{split}_captions.jsonl`; returns their paths."""
    data = Path(easy_vqa_dir) / DATA / split
    questions = json.loads((data / "questions.json").read_text())
    labels = labels_from_questions(questions)
    image_ids = sorted({q[2] for q in questions})
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"vqa": out_dir / f"{split}_vqa.jsonl", "captions": out_dir / f"{split}_captions.jsonl"}

    def image(image_id: int) -> str:
        return str((data / "images" / f"{image_id}.png").resolve())

    with open(paths["vqa"], "w") as f:
        for question, answer, image_id in questions:
            row = {"image": image(image_id), "question": question, "answer": answer,
                   "question_type": question_type(answer), "image_id": image_id}
            f.write(json.dumps(row) + "\n")
    sources = Counter()
    with open(paths["captions"], "w") as f:
        for image_id in image_ids:
            label = labels.get(image_id, {})
            if len(label) < 2:
                label = {**labels_from_pixels(image(image_id)), **label}
                sources["pixels"] += 1
            else:
                sources["questions"] += 1
            f.write(json.dumps({"image": image(image_id), "text": f"a {label['color']} {label['shape']}",
                                "image_id": image_id}) + "\n")
    return paths


def write_all(easy_vqa_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Both splits; keys like `train_vqa`, `test_captions`."""
    out = {}
    for split in SPLITS:
        for kind, path in write_split(Path(easy_vqa_dir), split, Path(out_dir)).items():
            out[f"{split}_{kind}"] = path
    return out
