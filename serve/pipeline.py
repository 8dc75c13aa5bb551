"""The captioning pipeline: streamed work items -> decode/preprocess workers -> the engine.

- `PendingBatches` (the DataLoader's sampler, main process) lists the inputs lazily, skips
  what is already done, takes this process's share and groups items into batches.
- `BatchBuilder` (the DataLoader's dataset, run in worker processes) decodes each distinct image
  of a batch once and preprocesses it; a file that fails becomes an error row there and never
  reaches the model. The rest become engine `Request`s (prompt + pixels).
- `caption_rows` (main process) runs a batch's requests through `vlm.engine.InferenceEngine`,
  which encodes each distinct image once, generates the batch left-padded and splits it on
  out-of-memory. Expected failures (a bad file, a prompt the template rejects, an image that does
  not fit in memory even alone) become error rows; anything else is a bug and stops the run with
  its traceback.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from jinja2 import TemplateError
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vlm.engine import GenerationSettings, InferenceEngine, Request
from vlm.errors import VLMError
from vlm.images import load_image
from vlm.preprocess import make_preprocess

from .inputs import Item, iter_items, row_key


@dataclass
class Batch:
    """A batch as the workers hand it over.

    `rows[i]` is already filled (an error row) for items that will not be generated; the other
    items are `todo`, in order, with `requests` holding their engine requests (an image named
    twice in a batch is decoded once and its pixels shared).
    """

    items: list[Item]
    rows: list[dict | None]
    todo: list[int] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)


class PendingBatches:
    """Iterable of lists of `Item`s still to do, for process `rank` of `world`.

    Items whose `key` is in `done` are skipped, as are repeats of an item listed earlier (the
    key is the written row's `row_key`: resolved file, effective question/prompt). Shares
    are dealt round-robin over the items not done, so every process sees the same sequence
    (`done` must be the same set in every process) and a resumed run stays balanced.
    `skip(item)` is an extra, per-process check (an existing caption file) made after dealing.
    """

    def __init__(
        self,
        inputs: list[str],
        done: set[tuple],
        batch_size: int,
        key: Callable[[Item], tuple],
        rank: int = 0,
        world: int = 1,
        skip: Callable[[Item], bool] | None = None,
        expand: Callable[[Item], Iterable[Item]] | None = None,
        listing: Callable[[list[str]], Iterable[Item]] = iter_items,
    ):
        self.inputs, self.seen, self.batch_size, self.key = inputs, done, batch_size, key
        self.rank, self.world, self.skip, self.expand = rank, world, skip, expand
        self.listing = listing  # `--ray` also lists Parquet inputs (vlm.serve.ray_inputs)
        self.skipped_done = 0  # already in the output (or listed twice): every process counts these
        self.skipped_here = 0  # this process's share that `skip` rejected

    def __iter__(self) -> Iterator[list[Item]]:
        batch, index = [], 0
        for item in work_items(self.inputs, self.expand, self.listing):
            key = self.key(item)
            if key in self.seen:
                self.skipped_done += 1
                continue
            self.seen.add(key)
            index += 1
            if (index - 1) % self.world != self.rank:
                continue
            if self.skip is not None and self.skip(item):
                self.skipped_here += 1
                continue
            batch.append(item)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


def work_items(inputs: list[str], expand: Callable[[Item], Iterable[Item]] | None = None,
               listing: Callable[[list[str]], Iterable[Item]] = iter_items) -> Iterator[Item]:
    """The items of `inputs`, each replaced by `expand(item)` when given (scoring: one per text)."""
    for item in listing(inputs):
        yield from (expand(item) if expand is not None else (item,))


def count_pending(inputs: list[str], done: set[tuple], key: Callable[[Item], tuple], world: int = 1,
                  expand: Callable[[Item], Iterable[Item]] | None = None) -> int:
    """About how many items one process will do (a second, cheap pass over the listing)."""
    seen = set(done)
    total = 0
    for item in work_items(inputs, expand):
        k = key(item)
        if k not in seen:
            seen.add(k)
            total += 1
    return -(-total // world)


class BatchBuilder(Dataset):
    """Turns a list of `Item`s into a `Batch` (runs inside DataLoader worker processes)."""

    def __init__(self, processor, prompt: str | None = None, question: str | None = None, allow_questions=True,
                 settings: GenerationSettings | None = None):
        self.processor = processor
        self.prompt = processor.caption_prompt if prompt is None else prompt
        self.question = question
        self.allow_questions = allow_questions
        self.settings = settings or GenerationSettings()
        self.preprocess = make_preprocess(processor.image_processor)

    def question_for(self, item: Item) -> str | None:
        """The item's effective question: its own, else --question unless it has its own prompt."""
        return item.question or (None if item.prompt else self.question) or None

    def prompt_for(self, item: Item) -> tuple[str, str | None]:
        """(model prompt, question or None) for an item: its own fields win over the flags."""
        question = self.question_for(item)
        if question is not None:
            return self.processor.format_question(question), question
        return (item.prompt if item.prompt is not None else self.prompt), None

    def fields(self, item: Item) -> dict:
        """The identifying fields of `item`'s output row (caption, answer and error rows alike).
        A list's `text` column (what `vlm score` reads) is not part of a caption row."""
        return dataclasses.replace(item, text=None).fields(None if item.error else self.question_for(item))

    def key(self, item: Item) -> tuple:
        """`row_key` of the row `item` will get: what resume and de-duplication compare."""
        return row_key(self.fields(item))

    def error_row(self, item: Item, message: str) -> dict:
        return {**self.fields(item), "error": message}

    def load(self, item: Item) -> Image.Image:
        """The item's image; a `VLMError` naming it when it will not decode (Ray Data's builder
        also reads bytes and URIs: `vlm.serve.ray_data`)."""
        return load_image(item.path)

    def __len__(self) -> int:  # never used: batches come from the sampler
        raise TypeError("BatchBuilder is indexed by batches of items")

    def __getitem__(self, items: list[Item]) -> Batch:
        batch = Batch(items=items, rows=[None] * len(items))
        self._build(batch)
        return batch

    def _build(self, batch: Batch) -> None:
        marker = self.processor.image_token
        pixels: dict[str, torch.Tensor | VLMError] = {}
        for i, item in enumerate(batch.items):
            if item.error:
                batch.rows[i] = self.error_row(item, item.error)
                continue
            try:
                prompt, question = self.prompt_for(item)
            except TemplateError as e:  # a chat template that rejects this question
                batch.rows[i] = self.error_row(item, f"cannot build prompt: {e}")
                continue
            if question is not None and not self.allow_questions:
                batch.rows[i] = self.error_row(item, "questions need --format jsonl or csv, not txt")
                continue
            if prompt.count(marker) > 1:
                batch.rows[i] = self.error_row(
                    item, f"prompt has {prompt.count(marker)} {marker} markers; each row captions one image")
                continue
            if item.path not in pixels:
                try:
                    pixels[item.path] = self.preprocess(self.load(item))
                except VLMError as e:  # load_image names the file and the decode error
                    pixels[item.path] = e
            if isinstance(pixels[item.path], VLMError):
                batch.rows[i] = self.error_row(item, str(pixels[item.path]))
                continue
            batch.todo.append(i)
            batch.requests.append(Request(prompt, [pixels[item.path]], self.settings))


def caption_rows(engine: InferenceEngine, batch: Batch, builder: BatchBuilder) -> list[dict]:
    """The batch's output rows, in item order: generated by `engine` for the items still to do."""
    rows = list(batch.rows)
    for i, completion in zip(batch.todo, engine.generate(batch.requests)):
        item = batch.items[i]
        if completion.error is not None:
            rows[i] = builder.error_row(item, f"generation failed: {completion.error}")
            continue
        row = builder.fields(item)
        row["answer" if "question" in row else "caption"] = completion.text
        if completion.warning:
            row["warning"] = completion.warning
        rows[i] = row
    return rows


def _worker_init(_: int) -> None:
    # Workers decode and resize; intra-op threads there would only fight the model for cores.
    torch.set_num_threads(1)


def batch_loader(batches: Iterable[list[Item]], builder: BatchBuilder, num_workers: int) -> DataLoader:
    """A DataLoader yielding `Batch`es in order, built by `num_workers` processes (0: inline)."""
    extra = {"prefetch_factor": 2, "worker_init_fn": _worker_init} if num_workers > 0 else {}
    return DataLoader(
        builder, sampler=batches, batch_size=None, num_workers=num_workers, collate_fn=_identity, **extra
    )


def _identity(batch: Batch) -> Batch:
    return batch
