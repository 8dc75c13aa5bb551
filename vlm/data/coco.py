"""COCO caption annotations (`captions_train2014.json`) and Karpathy-split JSON (`dataset_coco.json`).

One `Example` per caption (so training sees every caption); `answers` holds all captions of that
image, the references for CIDEr/BLEU.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .common import check_task, require_text, resolve_image_path, row_error
from .records import Example

# Karpathy's "restval" images are train images by convention (the 113k-image training set).
KARPATHY_SPLITS = {"train": ("train", "restval"), "validation": ("val",), "val": ("val",), "test": ("test",)}


def is_coco_captions(data) -> bool:
    return (
        isinstance(data, dict)
        and isinstance(data.get("annotations"), list)
        and isinstance(data.get("images"), list)
        and any(isinstance(a, dict) and "caption" in a for a in data["annotations"][:10])
    )


def is_karpathy(data) -> bool:
    images = data.get("images") if isinstance(data, dict) else None
    return isinstance(images, list) and any(isinstance(i, dict) and "sentences" in i for i in images[:10])


def read_coco_captions(data: dict, path: Path, task: str | None, image_root: Path) -> list[Example]:
    """Examples from a COCO captions file: `images[].{id,file_name}`, `annotations[].{image_id,caption}`."""
    check_task(task, ["caption"], path, "COCO captions")
    files = {}
    for i, image in enumerate(data["images"], start=1):
        source = f"{path}:images[{i - 1}]"
        if not isinstance(image, dict) or "id" not in image:
            raise row_error(source, "missing field 'id'")
        files[image["id"]] = resolve_image_path(require_text(image, "file_name", source), image_root, source, "file_name")
    rows = []
    captions = defaultdict(list)
    for i, ann in enumerate(data["annotations"], start=1):
        source = f"{path}:{i}"  # row number = 1-based position in "annotations"
        caption = require_text(ann, "caption", source)
        if "image_id" not in ann:
            raise row_error(source, "missing field 'image_id'")
        if ann["image_id"] not in files:
            raise row_error(source, f"image_id {ann['image_id']!r} is not in the file's 'images' list")
        rows.append((ann["image_id"], caption, source, ann.get("id")))
        captions[ann["image_id"]].append(caption)
    return [
        Example(
            "caption", files[image_id], caption=caption, answers=captions[image_id], source=source,
            meta={"image_id": image_id, **({"id": ann_id} if ann_id is not None else {})},
        )
        for image_id, caption, source, ann_id in rows
    ]


def read_karpathy(data: dict, path: Path, task: str | None, image_root: Path, split: str) -> list[Example]:
    """Examples of one split of a Karpathy JSON: `images[].{filepath?, filename, split, sentences[].raw}`."""
    check_task(task, ["caption"], path, "Karpathy-split")
    wanted = KARPATHY_SPLITS.get(split, (split,))
    examples = []
    for i, image in enumerate(data["images"], start=1):
        source = f"{path}:{i}"  # row number = 1-based position in "images"
        if not isinstance(image, dict):
            raise row_error(source, "expected an object")
        if image.get("split", "train") not in wanted:
            continue
        name = require_text(image, "filename", source)
        relative = str(Path(image["filepath"]) / name) if image.get("filepath") else name
        file = resolve_image_path(relative, image_root, source, "filename")
        sentences = image.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            raise row_error(source, "field 'sentences' must be a non-empty list")
        captions = [require_text(s, "raw", f"{source} sentences[{j}]") for j, s in enumerate(sentences)]
        meta = {k: image[k] for k in ("cocoid", "imgid", "split") if k in image}
        examples += [Example("caption", file, caption=c, answers=captions, source=source, meta=meta) for c in captions]
    return examples
