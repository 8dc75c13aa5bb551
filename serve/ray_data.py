"""Our inference engine inside Ray Data: callable classes for `Dataset.map_batches`.

Ray Data's batch-inference pattern: a class whose `__init__` loads the model (once per actor)
and whose `__call__` turns a batch of rows into output rows. `Captioner` captions (or answers a
question about) each row's image; `Scorer` gives each (image, text) pair BLIP-2's ITC and ITM.
Both build their batches with `vlm caption`'s / `vlm score`'s own builders and row functions, so
a row is exactly what the one-machine commands write.

    import ray
    from vlm.serve.ray_data import Captioner, Scorer

    ds = ray.data.read_parquet("s3://bucket/photos.parquet")        # an `image` column
    captions = ds.map_batches(Captioner, fn_constructor_kwargs={"model": "Salesforce/blip2-opt-2.7b"},
                              concurrency=4, num_gpus=1, batch_size=64)
    captions.write_parquet("s3://bucket/captions/")

    pairs = ray.data.from_items([{"image": "cat.jpg", "text": "a cat"}])
    scores = pairs.map_batches(Scorer, fn_constructor_kwargs={"model": "Salesforce/blip2-itm-vit-g"},
                               concurrency=2, batch_size=256)

Input columns: `image` (encoded bytes, a path readable on the workers, or a URI: `s3://`,
`gs://`, `hdfs://`, `file://` through pyarrow's filesystems, `http(s)://`); `Captioner` also
reads optional `prompt` / `question` columns, `Scorer` a `text` column (rows without one are
scored against every `texts=` given to it). Output: the fields of our usual rows (`image`,
`prompt` / `question`, `caption` / `answer`, `error`, `warning`; `Scorer`: `image`, `text`,
`itc`, `itm`, `error`), null where a row has none, plus the input's other columns. An image
given as bytes is named `sha256:<16 hex digits>` in `image`; keep your own id column to join.
A file that will not decode is an error row, never a failed task. `vlm caption --ray` and
`vlm score --ray` run these classes (`vlm.serve.ray_run`).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import types
import urllib.request
from collections.abc import Mapping
from typing import Any

import numpy as np

from vlm.errors import VLMError
from vlm.images import load_image_bytes

from .inputs import Item
from .pipeline import BatchBuilder, caption_rows
from .pairs import SCORE_FIELDS, PairBuilder, load_scorer, score_rows
from .writers import CSV_FIELDS

MAX_FETCH_BYTES = 64 << 20  # a URI's image may be at most this big
FETCH_TIMEOUT_S = 60.0
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(path: str) -> bool:
    """Whether `path` names an object by URI (`s3://...`) rather than a local file."""
    return bool(_URI.match(path))


def read_uri(uri: str, limit: int = MAX_FETCH_BYTES) -> bytes:
    """The bytes at `uri` (http(s) or any pyarrow filesystem); a `VLMError` naming it otherwise."""
    try:
        if uri.lower().startswith(("http://", "https://")):
            with urllib.request.urlopen(uri, timeout=FETCH_TIMEOUT_S) as response:
                data = response.read(limit + 1)
        else:
            import pyarrow.fs

            filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
            with filesystem.open_input_stream(path) as stream:
                data = stream.read(limit + 1)
    except (OSError, ValueError) as e:  # transport and lookup failures: this image's error row
        raise VLMError(f"{uri}: cannot read ({e})") from None
    if len(data) > limit:
        raise VLMError(f"{uri}: larger than {limit >> 20} MB")
    return data


class _Sources:
    """`load` for both builders: a row's bytes (held in `blobs` by name), a URI, else a file."""

    blobs: Mapping[str, bytes] = types.MappingProxyType({})

    def load(self, item: Item):
        blob = self.blobs.get(item.path)
        if blob is not None:
            return load_image_bytes(blob, item.image)
        if is_uri(item.path):
            return load_image_bytes(read_uri(item.path), item.path)
        return super().load(item)


class SourceBatchBuilder(_Sources, BatchBuilder):
    """`vlm caption`'s batch builder, reading bytes and URIs too."""


class SourcePairBuilder(_Sources, PairBuilder):
    """`vlm score`'s batch builder, reading bytes and URIs too."""


def setup_process(num_threads: int | None = None, workdir: str | None = None, quiet: bool = False) -> None:
    """Per-actor setup: torch threads, the driver's folder so relative paths read as there, and
    (`quiet`) the `vlm` command's quiet libraries, since Ray forwards actors' stderr to the driver."""
    import torch
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.disable_progress_bar()  # one weight-loading bar per actor, forwarded to the driver
    if quiet:
        from vlm.cli import quiet_libraries

        quiet_libraries()
    if num_threads:
        torch.set_num_threads(int(num_threads))
    if workdir and os.path.isdir(workdir):
        os.chdir(workdir)


class Captioner:
    """Ray Data callable: caption each row's image, or answer its question (see the module doc).

    Args:
        model: checkpoint folder, hub id or registered name (`None`: the offline demo).
        prompt / question: as `vlm caption --prompt` / `--question`; a row's own column wins.
        batch_size: images per model call inside the actor (pass Ray's `batch_size` as well).
        device / dtype / quantization: as the `vlm` flags (default: CUDA when the actor has a GPU,
            its native dtype, 4-bit NF4 on CUDA for LLMs of 1B+ parameters).
        num_threads: torch threads (default: what Ray gives the actor: its `num_cpus`).
        workdir: folder to read relative image paths from (`vlm caption --ray`: the driver's).
        quiet: keep third-party warnings and logs off stderr, as the `vlm` command does.
    """

    fields = CSV_FIELDS

    def __init__(self, model: str | None = None, *, prompt: str | None = None, question: str | None = None,
                 max_new_tokens: int = 30, num_beams: int = 1, batch_size: int = 16, device: str | None = None,
                 dtype: str | None = None, quantization: str | None = None, num_threads: int | None = None,
                 workdir: str | None = None, quiet: bool = False):
        setup_process(num_threads, workdir, quiet)
        from vlm.engine import GenerationSettings, InferenceEngine
        from vlm.load_policy import load_for_inference

        # The loading policy of every command (`vlm caption`'s too): 4-bit on CUDA for 1B+ LLMs.
        loaded = load_for_inference(model, device, dtype, quantization)
        settings = GenerationSettings(max_new_tokens=max_new_tokens, num_beams=num_beams)
        self.builder = SourceBatchBuilder(loaded.processor, prompt=prompt, question=question, settings=settings)
        # As `vlm caption`: images rarely repeat across batches, so a small feature cache is enough.
        self.engine = InferenceEngine(loaded.model, loaded.processor, max_batch_size=batch_size,
                                      feature_cache_bytes=256 << 20)
        self.batch_size = batch_size

    def rows(self, items: list[Item], blobs: Mapping[str, bytes] | None = None) -> list[dict]:
        """Output rows for `items`, in order, in model batches of `batch_size`."""
        self.builder.blobs = blobs or {}
        out = []
        for start in range(0, len(items), self.batch_size):
            out += caption_rows(self.engine, self.builder[items[start:start + self.batch_size]], self.builder)
        return out

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        items, blobs, sources = read_batch(batch, ("prompt", "question"))
        return to_columns(self.rows(items, blobs), self.fields, batch, sources)


class Scorer:
    """Ray Data callable: BLIP-2's ITC and ITM for each row's (image, text) pair (see the module doc).

    Args:
        model: a checkpoint with the stage-1 heads (`Blip2ForImageTextRetrieval`, a stage-1 output).
        texts: scored against every row that has no `text` of its own (one output row per text).
        batch_size: pairs per model call inside the actor; the other arguments as `Captioner`'s.
    """

    fields = SCORE_FIELDS

    def __init__(self, model: str | None = None, *, texts: list[str] | None = None, batch_size: int = 64,
                 device: str | None = None, dtype: str | None = None, quantization: str | None = None,
                 num_threads: int | None = None, workdir: str | None = None, quiet: bool = False):
        setup_process(num_threads, workdir, quiet)
        flags = types.SimpleNamespace(model=model, device=device, dtype=dtype, quantization=quantization)
        self.model, processor = load_scorer(flags, device)
        self.tokenizer = processor.qformer_tokenizer
        self.builder = SourcePairBuilder(processor, list(texts or []))
        self.batch_size = batch_size

    def rows(self, items: list[Item], blobs: Mapping[str, bytes] | None = None) -> list[dict]:
        """Output rows for already expanded (image, text) `items`, in order."""
        self.builder.blobs = blobs or {}
        out = []
        for start in range(0, len(items), self.batch_size):
            out += score_rows(self.model, self.tokenizer, self.builder[items[start:start + self.batch_size]])
        return out

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        items, blobs, sources = read_batch(batch, ("text",))
        pairs = [(pair, source) for item, source in zip(items, sources) for pair in self.builder.expand(item)]
        rows = self.rows([p for p, _ in pairs], blobs)
        return to_columns(rows, self.fields, batch, [s for _, s in pairs])


def read_batch(batch: Mapping[str, Any], optional: tuple[str, ...]) -> tuple[list[Item], dict[str, bytes], list[int]]:
    """(items, image bytes by name, source row of each item) of a Ray batch (dict of columns or
    a DataFrame) with an `image` column and the `optional` string columns."""
    if "image" not in batch:
        raise VLMError(f"the batch has no 'image' column (columns: {list(batch)})")
    images = list(batch["image"])
    columns = {name: list(batch[name]) if name in batch else [None] * len(images) for name in optional}
    items, blobs = [], {}
    for i, image in enumerate(images):
        extra = {name: _text(values[i]) for name, values in columns.items()}
        if isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
            name = "sha256:" + hashlib.sha256(data).hexdigest()[:16]
            blobs[name] = data
            image = name
        if not isinstance(image, str) or not image or any(v is False for v in extra.values()):
            bad = "'image' must be bytes, a path or a URI" if not isinstance(image, str) or not image else \
                f"{'/'.join(optional)} must be strings"
            items.append(Item(str(image or ""), str(image or ""), error=f"row {i}: {bad}"))
            continue
        items.append(Item(image, image, **extra))
    return items, blobs, list(range(len(images)))


def _text(value) -> str | None | bool:
    """A string cell as `str`, a missing one (None, NaN) as None, anything else as False."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return value or None
    return False


def to_columns(rows: list[dict], fields: list[str], batch: Mapping[str, Any], sources: list[int]) -> dict[str, np.ndarray]:
    """Rows as Ray columns: each of `fields` (None where a row lacks it), then the input's other
    columns, repeated for the rows each input row became."""
    out = {name: np.array([row.get(name) for row in rows], dtype=object) for name in fields}
    for name in batch:
        if name not in out:
            out[name] = np.asarray(batch[name])[np.asarray(sources, dtype=np.int64)]
    return out
