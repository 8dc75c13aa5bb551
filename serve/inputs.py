"""Streaming listing of `vlm caption` inputs: files, folders, globs and list files.

Nothing here holds the whole listing in memory: folders are walked one directory at a time,
list files are read line by line. The order is deterministic (sorted within each folder), so
every process of a multi-process run sees the same sequence and can take its share of it.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from vlm.errors import VLMError
from vlm.images import IMAGE_EXTENSIONS

LIST_SUFFIXES = (".txt", ".csv", ".jsonl")


@dataclass(frozen=True)
class Item:
    """One unit of work: an image and, optionally, its own prompt or question.

    `image` is the path as the user gave it (printed in the output row); `path` is where it is
    read from (list entries are resolved against the list file's folder). `error` is set for a
    list entry that could not be parsed: it becomes an error row.
    """

    image: str
    path: str
    prompt: str | None = None
    question: str | None = None
    error: str | None = None
    text: str | None = None  # `vlm score`: the text to score against the image

    def fields(self, question: str | None = None) -> dict:
        """The identifying fields of this item's output row, given its effective question.

        `path` (absolute) is added when `image` alone does not locate the file: a list entry
        relative to its list's folder. The row's `row_key` is the item's identity for resume and
        de-duplication, so it must be computed from exactly what is written.
        """
        row = {"image": self.image}
        if self.path != self.image:
            row["path"] = os.path.abspath(self.path)
        if question is not None:
            row["question"] = question
        elif self.prompt is not None:
            row["prompt"] = self.prompt
        if self.text is not None:
            row["text"] = self.text
        return row


def row_key(row: dict) -> tuple:
    """Identity of an output row: (resolved image file, question, prompt, text).

    The file is the row's `path`, else its `image` (relative to the current folder), made
    absolute: two list files may both name `a.png` for different files, and two inputs that
    name the same file are true duplicates. Empty CSV cells count as absent.
    """
    where = row.get("path") or row.get("image") or ""
    return (os.path.abspath(where), row.get("question") or None, row.get("prompt") or None, row.get("text") or None)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def check_inputs(inputs: Iterable[str]) -> None:
    """Fail fast, before a model loads, on an INPUT that names nothing (globs are exempt)."""
    for arg in inputs:
        if not glob.has_magic(arg) and not os.path.exists(arg):
            raise VLMError(f"{arg}: no such file or folder")


def iter_items(inputs: Iterable[str]) -> Iterator[Item]:
    """Every work item named by `inputs`, in a deterministic order, streamed.

    - a folder: image files below it (recursive, by extension), sorted per directory;
    - a glob (`photos/**/*.jpg`): matching image files, sorted;
    - a `.txt` (one path a line), `.csv` or `.jsonl` list: its entries, with optional per-row
      `prompt` / `question` (captioning) or `text` (scoring); relative paths resolve against the
      list file's folder;
    - any other file: an image, whatever its extension.
    """
    for arg in inputs:
        if os.path.isdir(arg):
            yield from _walk(arg)
        elif os.path.isfile(arg) and arg.lower().endswith(LIST_SUFFIXES):
            yield from iter_list_file(arg)
        elif os.path.exists(arg) or not glob.has_magic(arg):
            yield Item(arg, arg)
        else:
            # Sorted for a stable order across processes; a glob's matches are one list anyway.
            for match in sorted(glob.iglob(arg, recursive=True)):
                if os.path.isfile(match) and is_image_name(match):
                    yield Item(match, match)


def _walk(folder: str) -> Iterator[Item]:
    for root, dirs, files in os.walk(folder):
        dirs.sort()  # os.walk descends in this order
        for name in sorted(files):
            if is_image_name(name):
                path = os.path.join(root, name)
                yield Item(path, path)


def iter_list_file(list_path: str) -> Iterator[Item]:
    """Items of a `.txt`, `.csv` or `.jsonl` list. A bad entry becomes an error item, not a stop."""
    base = os.path.dirname(os.path.abspath(list_path))
    suffix = os.path.splitext(list_path)[1].lower()
    try:
        # utf-8-sig: spreadsheet programs (Excel) start their UTF-8 CSVs with a byte-order mark.
        with open(list_path, encoding="utf-8-sig", newline="") as f:
            if suffix == ".txt":
                for line in f:
                    line = line.strip()
                    if line and not line.startswith("#"):
                        yield _item(line, base)
            elif suffix == ".csv":
                reader = csv.DictReader(f)
                if not reader.fieldnames or "image" not in reader.fieldnames:
                    raise VLMError(f"{list_path}: CSV list needs an 'image' column (got {reader.fieldnames})")
                for row in reader:
                    yield _item(row.get("image") or "", base, row.get("prompt"), row.get("question"),
                                where=f"{list_path}:{reader.line_num}", text=row.get("text"))
            else:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{list_path}:{number}"
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        yield Item(where, where, error=f"{where}: not valid JSON ({e.msg})")
                        continue
                    if not isinstance(row, dict):
                        yield Item(where, where, error=f"{where}: expected a JSON object with an 'image' field")
                        continue
                    yield _item(row.get("image") or "", base, row.get("prompt"), row.get("question"), where=where,
                                text=row.get("text"))
    except UnicodeDecodeError:
        raise VLMError(f"{list_path}: list file is not UTF-8 text") from None


def _item(image, base: str, prompt=None, question=None, where: str = "", text=None) -> Item:
    if not isinstance(image, str) or not image:
        return Item(where, where, error=f"{where}: entry has no 'image'")
    if not all(isinstance(v, (str, type(None))) for v in (prompt, question, text)):
        return Item(image, image, error=f"{where}: 'prompt'/'question'/'text' must be strings")
    path = image if os.path.isabs(image) else os.path.join(base, image)
    return Item(image, path, prompt or None, question or None, text=text or None)
