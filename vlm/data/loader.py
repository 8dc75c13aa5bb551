"""`load_examples`: detect a data format, read it into `Example`s, and check every row first."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from PIL import Image

from ..errors import VLMError
from ..images import DECODE_ERRORS, load_image, to_rgb
from ..registry import resolve_dataset
from .coco import is_coco_captions, is_karpathy, read_coco_captions, read_karpathy
from .common import check_task, finish, read_json, resolve_image_path, row_error
from .hf import imagefolder_metadata, is_saved_dataset, read_imagefolder, read_saved_dataset
from .records import TASKS, Example, ExampleList
from .rows import read_csv, read_jsonl, row_to_example
from .vqav2 import is_vqav2_annotations, is_vqav2_questions, read_vqav2

FORMATS_HELP = (
    "COCO captions JSON, Karpathy-split JSON, VQAv2 questions(+annotations) JSON, LLaVA conversation JSON, "
    "JSONL/CSV/TSV rows, a datasets save_to_disk folder, or an imagefolder with metadata.jsonl/csv"
)


def load_examples(
    path_or_name: str,
    task: str | None = None,
    image_root: str | None = None,
    split: str = "train",
    image_column: str = "image",
    text_column: str = "text",
    skip_bad_images: bool = False,
) -> ExampleList:
    """Read a dataset in any supported format into `Example`s, checking every row.

    Formats (detected from the path and the content):
    - COCO captions JSON (`images` + `annotations[].caption`), Karpathy-split JSON
      (`images[].sentences`, filtered by `split`; "train" includes "restval");
    - VQAv2: the questions JSON, with its annotations JSON found beside it, or both given as
      `QUESTIONS.json,ANNOTATIONS.json`;
    - LLaVA conversation JSON (a list of `{image, conversations}`), or such rows in JSONL;
    - JSONL / CSV / TSV / JSON-array rows `{image, text}` or `{image, question, answer(s)}`;
    - a folder written by `datasets`' `save_to_disk` (a `DatasetDict` gives `split`), or an
      `imagefolder` folder with `metadata.jsonl`/`metadata.csv` (`file_name` column).

    Relative image paths resolve against `image_root` (default: the data file's folder). `task`
    (caption|vqa|chat) defaults to what the data holds. Raises `VLMError` naming the file, the
    row (line number for JSONL/CSV, 1-based record number for JSON) and the field for a bad row,
    a missing/broken image, an empty dataset or an unknown format. With `skip_bad_images=True`,
    rows with a bad image are dropped instead; the result's `.skipped` counts them.
    """
    if task is not None and task not in TASKS:
        raise VLMError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    registered = resolve_dataset(path_or_name)  # a named source, e.g. easyvqa:train
    if registered is not None:
        path_or_name = str(registered)
    root = Path(os.path.expanduser(image_root)).resolve() if image_root else None
    if root is not None and not root.is_dir():
        raise VLMError(f"image root {image_root}: no such folder")
    if "," in path_or_name and not os.path.exists(path_or_name):
        return _load_vqav2_pair(path_or_name, task, root, skip_bad_images)
    path = Path(os.path.expanduser(path_or_name))
    if not path.exists():
        raise VLMError(f"{path_or_name}: no such file or folder (datasets are read from local files only)")
    path = path.resolve()
    if path.is_dir():
        return _load_folder(path, task, root, split, image_column, text_column, skip_bad_images)
    return finish(_load_file(path, task, root or path.parent, split, image_column, text_column), path, skip_bad_images)


def _load_folder(path: Path, task, root, split, image_column, text_column, skip_bad_images) -> ExampleList:
    """A `datasets` save_to_disk folder or an imagefolder with metadata."""
    if is_saved_dataset(path):
        return read_saved_dataset(path, task, root, split, image_column, text_column, skip_bad_images)
    if imagefolder_metadata(path, split) is not None or any(path.glob("*/metadata.*")):
        examples = read_imagefolder(path, task, root, split, image_column, text_column)
        return finish(examples, path, skip_bad_images)
    raise VLMError(f"{path}: cannot detect the data format of this folder (expected {FORMATS_HELP})")


def _load_file(path: Path, task, root: Path, split, image_column, text_column) -> list[Example]:
    """A JSONL / CSV / TSV / JSON data file, by its extension (JSON: by its content)."""
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise VLMError(f"{path}: empty file (no examples)")
    if suffix == ".jsonl":
        return _from_rows(read_jsonl(path), path, task, root, image_column, text_column)
    if suffix in (".csv", ".tsv"):
        return _from_rows(read_csv(path), path, task, root, image_column, text_column)
    if suffix == ".json":
        return _from_json(read_json(path), path, task, root, split, image_column, text_column)
    raise VLMError(f"{path}: cannot detect the data format from the extension {suffix or '(none)'!r} "
                   f"(use .json, .jsonl, .csv or .tsv; supported: {FORMATS_HELP})")


def open_example_image(example: Example, image=None) -> Image.Image:
    """The example's (first, or the given) image as RGB, decoded now; a `VLMError` naming the file
    if it cannot be."""
    image = example.image if image is None else image
    if isinstance(image, str):
        return load_image(image)
    if isinstance(image, Image.Image):
        try:
            return to_rgb(image)
        except DECODE_ERRORS as e:
            raise VLMError(f"{example.source}: cannot decode the embedded image ({e})") from None
    raise VLMError(f"{example.source or 'example'}: has no image")


def image_key(image: str | Image.Image) -> str:
    """A stable name of one image for feature caches and for telling images apart: a file's path
    with its size and modification time (a file rewritten in place is a new image), or a digest
    of an in-memory image's pixels, so the five captions of one embedded COCO image share one
    key, in every process."""
    if isinstance(image, str):
        stat = os.stat(image)
        return f"{image}@{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.blake2b(f"{image.mode}{image.size}".encode(), digest_size=16)
    digest.update(image.tobytes())
    return f"pixels:{digest.hexdigest()}"


def open_example_images(example: Example) -> list[Image.Image]:
    """All of the example's images, decoded (empty for a text-only row)."""
    return [open_example_image(example, image) for image in example.images]


def _from_rows(rows, path: Path, task, root: Path, image_column: str, text_column: str) -> list[Example]:
    examples = []
    for number, row in rows:
        source = f"{path}:{number}"
        if image_column not in row and task in (None, "chat") and any(f in row for f in ("conversations", "messages")):
            examples.append(row_to_example(row, "chat", source, None, text_column, image_column))  # text-only chat
            continue
        if image_column not in row:
            raise row_error(source, f"missing field {image_column!r} (the image path); fields present: {', '.join(sorted(row))}")
        value = row[image_column]
        if isinstance(value, list):  # a conversation about several images, one marker each
            if not value:
                raise row_error(source, f"field {image_column!r} is an empty list")
            paths = [resolve_image_path(v, root, source, image_column) for v in value]
            example = row_to_example(row, task or "chat", source, paths[0], text_column, image_column)
            if example.task != "chat":
                raise row_error(source, f"several images in {image_column!r}: only chat rows can have them")
            example.extra_images = paths[1:]
            examples.append(example)
            continue
        image = resolve_image_path(value, root, source, image_column)
        examples.append(row_to_example(row, task, source, image, text_column, image_column))
    return examples


def _from_json(data, path: Path, task, root: Path, split: str, image_column: str, text_column: str) -> list[Example]:
    if is_vqav2_questions(data):
        return read_vqav2(data, path, None, task, root)
    if is_vqav2_annotations(data):
        raise VLMError(f"{path}: this is a VQAv2 annotations file; give the questions file (annotations are found "
                       f"beside it) or QUESTIONS.json,ANNOTATIONS.json")
    if is_coco_captions(data):
        return read_coco_captions(data, path, task, root)
    if is_karpathy(data):
        return read_karpathy(data, path, task, root, split)
    if isinstance(data, list):
        if not data:
            raise VLMError(f"{path}: no examples (the dataset is empty)")
        rows = []
        for i, row in enumerate(data, start=1):
            if not isinstance(row, dict):
                raise row_error(f"{path}:{i}", f"expected an object, got {type(row).__name__}")
            rows.append((i, row))
        if task is None and "conversations" in rows[0][1]:
            task = "chat"  # LLaVA: rows without an image (text-only turns) are allowed
        if task == "chat":
            return _llava_rows(rows, path, root, image_column)
        return _from_rows(rows, path, task, root, image_column, text_column)
    keys = ", ".join(sorted(data)[:8]) if isinstance(data, dict) else type(data).__name__
    raise VLMError(f"{path}: cannot detect the data format (top level: {keys}); expected {FORMATS_HELP}")


def _llava_rows(rows, path: Path, root: Path, image_column: str) -> list[Example]:
    examples = []
    for number, row in rows:
        source = f"{path}:{number}"
        image = row.get(image_column)
        image = resolve_image_path(image, root, source, image_column) if image is not None else None
        examples.append(row_to_example(row, "chat", source, image, image_column=image_column))
    return examples


def _load_vqav2_pair(spec: str, task, root: Path | None, skip_bad_images: bool) -> ExampleList:
    parts = [Path(os.path.expanduser(p.strip())) for p in spec.split(",")]
    if len(parts) != 2:
        raise VLMError(f"{spec}: expected QUESTIONS.json,ANNOTATIONS.json (two paths)")
    for p in parts:
        if not p.is_file():
            raise VLMError(f"{p}: no such file")
    questions_path, annotations_path = (p.resolve() for p in parts)
    questions = read_json(questions_path)
    if not is_vqav2_questions(questions):
        raise VLMError(f"{questions_path}: not a VQAv2 questions file (no 'questions' list)")
    check_task(task, ["vqa"], questions_path, "VQAv2")
    examples = read_vqav2(questions, questions_path, annotations_path, task, root or questions_path.parent)
    return finish(examples, questions_path, skip_bad_images)
