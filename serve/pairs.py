"""`vlm score`'s work, apart from its command line: pairs -> batches -> BLIP-2's ITC and ITM.

`PairBuilder` (a DataLoader dataset, run in worker processes) expands items into (image, text)
pairs and decodes each distinct image of a batch once; `score_rows` scores a batch's pairs.
`vlm score` (serve/score.py) and the Ray Data `Scorer` (serve/ray_data.py) both use them, so
their rows are the same.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset

from vlm.engine import split_on_oom
from vlm.errors import VLMError
from vlm.image_text import score_pairs
from vlm.images import load_image
from vlm.preprocess import make_preprocess

from .inputs import Item, row_key

SCORE_FIELDS = ["image", "text", "itc", "itm", "error", "path"]


@dataclasses.dataclass
class ScoreBatch:
    items: list[Item]
    rows: list[dict | None]
    todo: list[int] = dataclasses.field(default_factory=list)
    pixels: torch.Tensor | None = None  # one row per distinct image of the batch
    pairs: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (pixel row, text) per todo item


class PairBuilder(Dataset):
    """Items -> `ScoreBatch` in DataLoader workers: each distinct image decoded once."""

    def __init__(self, processor, texts: list[str]):
        self.preprocess = make_preprocess(processor.image_processor)
        self.texts = texts

    def expand(self, item: Item) -> Iterator[Item]:
        """One work item per (image, text) pair."""
        if item.error or item.text:
            yield item
        elif not self.texts:
            yield dataclasses.replace(item, error="no text to score: give --text or a 'text' column")
        else:
            for text in self.texts:
                yield dataclasses.replace(item, text=text)

    @staticmethod
    def key(item: Item) -> tuple:
        return row_key(item.fields())

    def load(self, item: Item):
        """The item's image (a `VLMError` naming it when it will not decode)."""
        return load_image(item.path)

    def __len__(self) -> int:  # never used: batches come from the sampler
        raise TypeError("PairBuilder is indexed by batches of items")

    def __getitem__(self, items: list[Item]) -> ScoreBatch:
        batch = ScoreBatch(items, [None] * len(items))
        slots: dict[str, int | VLMError] = {}
        pixels = []
        for i, item in enumerate(items):
            if item.error:
                batch.rows[i] = {**item.fields(), "error": item.error}
                continue
            if item.path not in slots:
                try:
                    pixels.append(self.preprocess(self.load(item)))
                    slots[item.path] = len(pixels) - 1
                except VLMError as e:  # load_image names the file and the decode error
                    slots[item.path] = e
            if isinstance(slots[item.path], VLMError):
                batch.rows[i] = {**item.fields(), "error": str(slots[item.path])}
                continue
            batch.todo.append(i)
            batch.pairs.append((slots[item.path], item.text))
        batch.pixels = torch.stack(pixels) if pixels else None
        return batch


def score_rows(model, tokenizer, batch: ScoreBatch) -> list[dict]:
    """The batch's rows: ITC and ITM for each pair (split in halves on out-of-memory)."""
    rows = list(batch.rows)
    if not batch.todo:
        return rows

    def run(indices: list[int]):
        return score_pairs(model, tokenizer, batch.pixels, [batch.pairs[i] for i in indices])

    for i, result in zip(batch.todo, split_on_oom(run, list(range(len(batch.todo))))):
        fields = batch.items[i].fields()
        if isinstance(result, BaseException):
            rows[i] = {**fields, "error": "out of memory for this pair even alone"}
        else:
            rows[i] = {**fields, "itc": round(result[0], 6), "itm": round(result[1], 6)}
    return rows


def load_scorer(args: argparse.Namespace, device: str | None):
    """The model and its Q-Former tokenizer; a VLMError for a model without the stage-1 heads."""
    from vlm.load_policy import load_from_args

    loaded = load_from_args(args, device)
    model, processor = loaded.model, loaded.processor
    if not model.config.has_image_text_heads or getattr(processor, "qformer_tokenizer", None) is None:
        raise VLMError(f"{args.model or 'the demo model'}: has no image-text (ITC/ITM) heads; score with a "
                       "Blip2ForImageTextRetrieval checkpoint or a `vlm train --recipe stage1` output")
    return model, processor
