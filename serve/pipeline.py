"""The captioning pipeline: streamed work items -> decode/preprocess workers -> batched model.

- `PendingBatches` (the DataLoader's sampler, main process) lists the inputs lazily, skips
  what is already done, takes this process's share and groups items into batches.
- `BatchBuilder` (the DataLoader's dataset, run in worker processes) decodes each distinct image
  of a batch once, preprocesses it and tokenizes the prompts; a file that fails becomes an
  error row there and never reaches the model.
- `Captioner` (main process) encodes the distinct images once, generates for the whole batch
  with left padding, and on out-of-memory splits the batch and retries, so one item can fail
  alone. Expected failures (a bad file, a prompt the template rejects, out-of-memory) become
  error rows; anything else is a bug and stops the run with its traceback.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset

from vlm.errors import VLMError
from vlm.images import load_image

from jinja2 import TemplateError

from .inputs import Item, iter_items, row_key
from vlm.preprocess import make_preprocess


@dataclass
class Batch:
    """A batch as the workers hand it over.

    `rows[i]` is already filled (an error row) for items that will not be generated; the other
    items are `todo`, in order, with `image_index` pointing into `pixel_values` (one row per
    distinct image) and `encoding` holding their left-padded prompts.
    """

    items: list[Item]
    rows: list[dict | None]
    todo: list[int] = field(default_factory=list)
    pixel_values: torch.Tensor | None = None
    image_index: torch.Tensor | None = None
    encoding: dict | None = None


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
    ):
        self.inputs, self.seen, self.batch_size, self.key = inputs, done, batch_size, key
        self.rank, self.world, self.skip = rank, world, skip
        self.skipped_done = 0  # already in the output (or listed twice): every process counts these
        self.skipped_here = 0  # this process's share that `skip` rejected

    def __iter__(self) -> Iterator[list[Item]]:
        batch, index = [], 0
        for item in iter_items(self.inputs):
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


def count_pending(inputs: list[str], done: set[tuple], key: Callable[[Item], tuple], world: int = 1) -> int:
    """About how many items one process will do (a second, cheap pass over the listing)."""
    seen = set(done)
    total = 0
    for item in iter_items(inputs):
        k = key(item)
        if k not in seen:
            seen.add(k)
            total += 1
    return -(-total // world)


class _Prepared:
    """Stands in for a PIL image in the processor call: its pixels are already computed."""


class _NoImageProcessing:
    """Image processor for the text-only processor call: the workers did the images already."""

    def __call__(self, images, return_tensors=None, **kwargs):
        return {"pixel_values": torch.empty(0)}


class BatchBuilder(Dataset):
    """Turns a list of `Item`s into a `Batch` (runs inside DataLoader worker processes)."""

    def __init__(self, processor, prompt: str | None = None, question: str | None = None, allow_questions=True):
        self.processor = processor
        self.prompt = processor.caption_prompt if prompt is None else prompt
        self.question = question
        self.allow_questions = allow_questions
        self.preprocess = make_preprocess(processor.image_processor)
        # The processor's own text path (image tokens, BOS, left padding, Q-Former text),
        # with the image step replaced: pixels come from `preprocess`, one per distinct image.
        self.text_processor = copy.copy(processor)
        self.text_processor.image_processor = _NoImageProcessing()

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
        """The identifying fields of `item`'s output row (caption, answer and error rows alike)."""
        return item.fields(None if item.error else self.question_for(item))

    def key(self, item: Item) -> tuple:
        """`row_key` of the row `item` will get: what resume and de-duplication compare."""
        return row_key(self.fields(item))

    def error_row(self, item: Item, message: str) -> dict:
        return {**self.fields(item), "error": message}

    def __len__(self) -> int:  # never used: batches come from the sampler
        raise TypeError("BatchBuilder is indexed by batches of items")

    def __getitem__(self, items: list[Item]) -> Batch:
        batch = Batch(items=items, rows=[None] * len(items))
        self._build(batch)
        return batch

    def _build(self, batch: Batch) -> None:
        items = batch.items
        marker = self.processor.image_token
        pixels, slot_of_path, image_index, prompts = [], {}, [], []
        for i, item in enumerate(items):
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
            slot = slot_of_path.get(item.path)
            if slot is None:
                try:
                    tensor = self.preprocess(load_image(item.path))
                except VLMError as e:  # load_image names the file and the decode error
                    slot = slot_of_path[item.path] = e
                else:
                    slot = slot_of_path[item.path] = len(pixels)
                    pixels.append(tensor)
            if isinstance(slot, Exception):
                batch.rows[i] = self.error_row(item, str(slot))
                continue
            batch.todo.append(i)
            image_index.append(slot)
            prompts.append(prompt)
        if batch.todo:
            encoding = self._encode(prompts)
            batch.encoding = encoding
            batch.pixel_values = torch.stack(pixels)
            batch.image_index = torch.tensor(image_index)

    def _encode(self, prompts: list[str]) -> dict:
        # One image list per prompt: the processor then places each prompt's image on its own
        # (in front without a marker, in place of its one marker), so mixed prompts can share a batch.
        encoding = self.text_processor(images=[[_Prepared()] for _ in prompts], text=prompts)
        encoding.pop("pixel_values", None)
        return dict(encoding)


def _trim_left_padding(encoding: dict) -> dict:
    """Drop columns that are padding in every row (left after taking a subset of a batch)."""
    mask = encoding["attention_mask"]
    keep = int(mask.any(dim=0).nonzero()[0]) if mask.any() else 0
    if keep == 0:
        return encoding
    out = dict(encoding)
    for key in ("input_ids", "attention_mask"):
        out[key] = encoding[key][:, keep:]
    return out



def split_on_oom(run: Callable[[list[int]], list], indices: list[int], on_oom: Callable[[], None] = lambda: None):
    """`run(indices)`, halving the batch on out-of-memory until single items fail alone.

    Returns one result per index: `run`'s output, or the out-of-memory error of an item that
    does not fit even alone. The retry happens after the `except` block has ended, so the failed
    try's activations (held by the traceback) are freed first; `on_oom` runs in between (it
    empties the CUDA cache). Any other error propagates: a CUDA error such as a device-side
    assert leaves the device unusable, and retrying it would only repeat it.
    """
    try:
        return list(run(indices))
    except torch.OutOfMemoryError as e:
        if len(indices) == 1:
            return [e]
    on_oom()
    half = len(indices) // 2
    return split_on_oom(run, indices[:half], on_oom) + split_on_oom(run, indices[half:], on_oom)


class Captioner:
    """Generates text for `Batch`es with a loaded model; returns one output row per item."""

    def __init__(self, model, processor, generate_kwargs: dict):
        self.model, self.processor, self.generate_kwargs = model, processor, generate_kwargs
        self.oom_splits = 0

    def _on_oom(self) -> None:
        self.oom_splits += 1
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def generate(self, batch: Batch, positions: list[int]) -> list[str]:
        """Texts for `batch.todo[p]` for each p in `positions`; each distinct image encoded once."""
        select = torch.tensor(positions)
        distinct, inverse = torch.unique(batch.image_index[select], return_inverse=True)
        features = self.model.get_vision_features(batch.pixel_values[distinct])[inverse.to(self.model.device)]
        encoding = _trim_left_padding({k: v[select] for k, v in batch.encoding.items()})
        out = self.model.generate(**encoding, vision_features=features, **self.generate_kwargs)
        return self.processor.decode_generated(out, encoding["input_ids"])

    def rows(self, batch: Batch, builder: BatchBuilder) -> list[dict]:
        """The batch's output rows, in item order (an unexpected failure gives error rows)."""
        rows = list(batch.rows)
        if batch.todo:
            texts = split_on_oom(lambda p: self.generate(batch, p), list(range(len(batch.todo))), self._on_oom)
            for i, text in zip(batch.todo, texts):
                rows[i] = _row(builder, batch.items[i], text)
        return rows


def _row(builder: BatchBuilder, item: Item, text) -> dict:
    if isinstance(text, Exception):
        return builder.error_row(item, "generation failed: out of memory even for one image")
    row = builder.fields(item)
    row["answer" if "question" in row else "caption"] = text
    return row


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
