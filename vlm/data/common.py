"""Helpers shared by the format readers: row errors, JSON reading, image path checks."""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from ..errors import VLMError
from ..images import DECODE_ERRORS, MAX_IMAGE_PIXELS
from .records import TASKS, Example, ExampleList

# Below this many images the thread pool and progress bar cost more than they save.
_PARALLEL_CHECK_MIN = 64


def row_error(source: str, message: str) -> VLMError:
    """`VLMError("data.jsonl:12: <message>")`: file and row first, so the user can jump there."""
    return VLMError(f"{source}: {message}")


def read_json(path: Path):
    """Parse a JSON file, with a one-line error naming the file and the position of a syntax error."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise VLMError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise VLMError(f"{path}: not UTF-8 text ({e.reason})") from None


def require_text(row: dict, field: str, source: str, what: str | None = None) -> str:
    """`row[field]` as a non-empty string, or a `VLMError` naming the file, row and field."""
    if not isinstance(row, dict):
        raise row_error(source, f"expected an object with field {field!r}, got {type(row).__name__}")
    if field not in row or row[field] is None:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise row_error(source, f"missing field {field!r}{f' ({what})' if what else ''}; fields present: {present}")
    value = row[field]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise row_error(source, f"field {field!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise row_error(source, f"field {field!r} is empty")
    return value.strip()


def check_task(task: str | None, allowed: Iterable[str], path, fmt: str) -> str:
    """The task to read `path` as: `task` if this format supports it, else the format's first task."""
    allowed = list(allowed)
    if task is None:
        return allowed[0]
    if task not in TASKS:
        raise VLMError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    if task not in allowed:
        raise VLMError(f"{path}: a {fmt} file holds {' or '.join(allowed)} data, not {task!r} data")
    return task


def resolve_image_path(value, root: Path, source: str, field: str = "image") -> str:
    """An image reference from a row, as an absolute path (relative ones are under `root`)."""
    if not isinstance(value, str) or not value.strip():
        raise row_error(source, f"field {field!r} must be an image path, got {value!r}")
    value = value.strip()
    if value.startswith(("http://", "https://")):
        raise row_error(source, f"field {field!r} is a URL ({value}); download the images and give local paths")
    path = Path(os.path.expanduser(value))
    if not path.is_absolute():
        path = root / path
    return str(path.resolve())


def image_problem(image) -> str | None:
    """Why `image` (a path, or encoded bytes) cannot be used, or None when it opens.

    Reads the header and lets Pillow verify the file (PNG checksums, etc.) without decoding all
    pixels, so checking a large dataset is cheap; a file truncated past its header can still fail
    later, in `open_example_image`, with an error naming it.
    """
    if isinstance(image, str):
        if not os.path.exists(image):
            return f"image {image}: no such file"
        if os.path.isdir(image):
            return f"image {image}: is a folder, not an image"
        if os.path.getsize(image) == 0:
            return f"image {image}: empty file"
        name, opener = image, lambda: Image.open(image)
    else:
        name, opener = "embedded image", lambda: Image.open(io.BytesIO(image))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with opener() as im:
                width, height = im.size
                if width * height > MAX_IMAGE_PIXELS:
                    return f"{name}: {width}x{height} pixels is over the {MAX_IMAGE_PIXELS:,} limit"
                im.verify()
    except (*DECODE_ERRORS, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL's decode failures (UnidentifiedImageError is an OSError); reported by name.
        reason = "not an image (cannot identify the format)" if "cannot identify" in str(e) else f"broken ({e})"
        return f"{name}: {reason}"
    return None


def finish(
    examples: list[Example],
    path,
    skip_bad_images: bool,
    image_of: Callable[[Example], object] | None = None,
) -> ExampleList:
    """Check every example's image, then drop (skip_bad_images) or report the bad ones.

    `image_of` gives what to check for an example (default: its path, when it has one).
    Raises `VLMError` for an empty dataset, or for the first bad image (in file order) when not
    skipping; the message says how many others are bad too.
    """
    if not examples:
        raise VLMError(f"{path}: no examples (the dataset is empty)")
    image_of = image_of or (lambda e: e.image if isinstance(e.image, str) else None)
    checks = [(i, t) for i, e in enumerate(examples) for t in [image_of(e), *e.extra_images] if t is not None]
    problems = _check_all([t for _, t in checks])
    bad = {checks[k][0]: p for k, p in enumerate(problems) if p is not None}
    if bad and not skip_bad_images:
        first = min(bad)
        more = f" (and {len(bad) - 1} more rows with bad images)" if len(bad) > 1 else ""
        raise row_error(
            examples[first].source,
            f"{bad[first]}{more}; fix the paths or --image-root, or pass skip_bad_images=True (--skip-bad-images)",
        )
    kept = [e for i, e in enumerate(examples) if i not in bad]
    out = ExampleList(kept, skipped=[examples[i].source for i in sorted(bad)])
    if not kept:
        raise VLMError(f"{path}: all {len(examples)} rows have bad images; nothing left to use")
    if bad:
        import logging

        logging.getLogger("vlm.data").warning("%s: skipped %d rows with bad images", path, len(bad))
    return out


def _check_all(targets: list) -> list[str | None]:
    if len(targets) < _PARALLEL_CHECK_MIN:
        return [image_problem(t) for t in targets]
    from tqdm.auto import tqdm

    # Image checks are file I/O bound: threads overlap the reads.
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(tqdm(pool.map(image_problem, targets), total=len(targets), desc="checking images", unit="img"))
