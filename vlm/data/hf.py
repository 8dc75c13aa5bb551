"""Hugging Face `datasets` folders: `save_to_disk` output, and `imagefolder` layouts.

- save_to_disk: loaded with `datasets.load_from_disk`; a `DatasetDict` gives the `split` asked for.
  The image column may be an `Image` feature (kept in memory as encoded bytes, decoded lazily)
  or a string path (relative to `image_root`, default the dataset folder).
- imagefolder: `metadata.jsonl` / `metadata.csv` in the folder or in `<folder>/<split>/`, with a
  `file_name` column relative to the metadata file (the layout `load_dataset("imagefolder")`
  reads). Read directly so images stay paths, decoded in DataLoader workers.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from ..errors import VLMError
from .common import finish, resolve_image_path, row_error
from .records import Example, ExampleList
from .rows import read_csv, read_jsonl, row_to_example

SPLIT_ALIASES = {"val": "validation", "validation": "val", "dev": "validation"}


def is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def imagefolder_metadata(path: Path, split: str) -> Path | None:
    """The metadata file of an imagefolder dir for `split` (or the only one), or None."""
    for folder in (path / split, path / SPLIT_ALIASES.get(split, split), path):
        for name in ("metadata.jsonl", "metadata.csv"):
            if (folder / name).is_file():
                return folder / name
    return None


def read_imagefolder(
    path: Path, task, image_root: Path | None, split: str, image_column: str, text_column: str
) -> list[Example]:
    metadata = imagefolder_metadata(path, split)
    if metadata is None:
        splits = sorted(p.name for p in path.iterdir() if (p / "metadata.jsonl").is_file() or (p / "metadata.csv").is_file())
        raise VLMError(f"{path}: imagefolder has no metadata for split {split!r}" + (f" (splits: {', '.join(splits)})" if splits else ""))
    rows = read_jsonl(metadata) if metadata.suffix == ".jsonl" else read_csv(metadata)
    root = image_root or metadata.parent
    examples = []
    for lineno, row in rows:
        source = f"{metadata}:{lineno}"
        column = image_column if image_column in row else "file_name"
        if column not in row:
            raise row_error(source, "missing field 'file_name' (the imagefolder image column)")
        image = resolve_image_path(row[column], root, source, column)
        examples.append(row_to_example(row, task, source, image, text_column, column))
    return examples


def read_saved_dataset(
    path: Path, task, image_root: Path | None, split: str, image_column: str, text_column: str, skip_bad_images: bool
) -> ExampleList:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError) as e:  # missing or corrupt files, unreadable state JSON
        raise VLMError(f"{path}: cannot open the saved dataset ({str(e).splitlines()[0]})") from None
    where = str(path)
    if isinstance(ds, datasets.DatasetDict):
        name = split if split in ds else SPLIT_ALIASES.get(split)
        if name not in ds:
            raise VLMError(f"{path}: no split {split!r} in the dataset (splits: {', '.join(ds)})")
        ds, where = ds[name], f"{path}[{name}]"
    if image_column not in ds.column_names:
        raise VLMError(f"{where}: no image column {image_column!r} (columns: {', '.join(ds.column_names)}); set image_column")
    embedded = isinstance(ds.features[image_column], datasets.Image)
    if embedded:
        # Undecoded: {"bytes", "path"}; we check the bytes and decode lazily later.
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    root = image_root or path
    examples, payload = [], {}
    for i, row in enumerate(ds, start=1):
        source = f"{where}:{i}"
        value = row[image_column]
        if embedded:
            if value is None or not (value.get("bytes") or value.get("path")):
                raise row_error(source, f"field {image_column!r} holds no image")
            image = value["bytes"] if value.get("bytes") else resolve_image_path(value["path"], root, source, image_column)
        else:
            image = resolve_image_path(value, root, source, image_column)
        example = row_to_example(row, task, source, image if isinstance(image, str) else None, text_column, image_column)
        if not isinstance(image, str):
            payload[id(example)] = image
        examples.append(example)
    out = finish(examples, where, skip_bad_images, image_of=lambda e: payload.get(id(e), e.image))
    for example in out:
        if id(example) in payload:
            # Lazily decoded: Image.open reads only the header until the pixels are needed.
            example.image = Image.open(io.BytesIO(payload[id(example)]))
    return out
