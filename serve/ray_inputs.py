"""`--ray` inputs: everything `vlm caption` lists (`inputs.iter_items`), plus Parquet datasets.

A Parquet INPUT (a `.parquet` file, a folder named `*.parquet`, or a URI such as
`s3://bucket/photos/`) is a list like a `.csv` one: an `image` column of paths or URIs, with
optional `prompt`, `question` (captioning) or `text` (scoring) columns. It is streamed on the
driver one record batch at a time, with pyarrow's filesystems (local, S3, GCS, HDFS...).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator

from vlm.errors import VLMError

from .inputs import Item, _item, iter_items
from .ray_data import is_uri

COLUMNS = ("image", "prompt", "question", "text")


def is_parquet(arg: str) -> bool:
    """Whether an INPUT names a Parquet dataset rather than images or a list."""
    return arg.rstrip("/").lower().endswith(".parquet") or is_uri(arg)


def check_ray_inputs(inputs: Iterable[str]) -> None:
    """Fail fast on a local INPUT that names nothing (URIs and globs are checked when read)."""
    for arg in inputs:
        if not is_uri(arg) and not glob.has_magic(arg) and not os.path.exists(arg):
            raise VLMError(f"{arg}: no such file or folder")


def list_inputs(inputs: Iterable[str]) -> Iterator[Item]:
    """The work items of `inputs`, in order: Parquet datasets here, the rest as `vlm caption` lists them."""
    for arg in inputs:
        if is_parquet(arg):
            yield from parquet_items(arg)
        else:
            yield from iter_items([arg])


def parquet_items(source: str) -> Iterator[Item]:
    """Items of a Parquet dataset; relative paths resolve against the folder holding `source`."""
    import pyarrow as pa
    import pyarrow.dataset as pds

    try:
        dataset = pds.dataset(source, format="parquet")
    except (OSError, ValueError) as e:
        raise VLMError(f"{source}: cannot read as Parquet ({e})") from None
    names = dataset.schema.names
    if "image" not in names:
        raise VLMError(f"{source}: Parquet input needs an 'image' column (got {names})")
    if not pa.types.is_string(dataset.schema.field("image").type) and \
            not pa.types.is_large_string(dataset.schema.field("image").type):
        raise VLMError(f"{source}: the 'image' column must hold paths or URIs; for image bytes, run "
                       "vlm.serve.ray_data.Captioner / Scorer with Dataset.map_batches")
    base = source if is_uri(source) else os.path.dirname(os.path.abspath(source.rstrip("/")))
    number = 0
    for batch in dataset.to_batches(columns=[c for c in COLUMNS if c in names]):
        for row in batch.to_pylist():
            number += 1
            yield _parquet_item(row, base, f"{source}:row {number}")


def _parquet_item(row: dict, base: str, where: str) -> Item:
    image = row.get("image")
    if isinstance(image, str) and is_uri(image):
        item = _item(image, "/", row.get("prompt"), row.get("question"), where, row.get("text"))
        return Item(image, image, item.prompt, item.question, item.error, item.text)
    if is_uri(base) and isinstance(image, str) and image and not os.path.isabs(image):
        return Item(image, image, error=f"{where}: a relative path in a dataset at a URI; give a URI or an "
                                       "absolute path")
    return _item(image or "", base, row.get("prompt"), row.get("question"), where, row.get("text"))
