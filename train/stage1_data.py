"""Batches for the `stage1` recipe: (image, caption) pairs, the caption tokenized for the Q-Former."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from vlm.data import image_key, open_example_image
from vlm.errors import VLMError

# The token that starts an ITG decode (LAVIS adds "[DEC]"); the first that the vocabulary has.
DECODER_START_TOKENS = ("[DEC]", "[unused0]", "<s>")


def stable_id(key: str) -> int:
    """A stable integer for an image or a caption: the same on every process, so gathered rows can
    be compared."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=7).digest(), "big")


def decoder_start_id(tokenizer) -> int:
    """The id ITG replaces a caption's first token ([CLS]) with."""
    vocab = tokenizer.get_vocab()
    for token in DECODER_START_TOKENS:
        if token in vocab:
            return vocab[token]
    return tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id


class Stage1Dataset(Dataset):
    """Caption examples -> `{pixel_values, text, image_key}`; images decoded in DataLoader workers."""

    def __init__(self, examples: Sequence, processor):
        for example in examples:
            if example.task != "caption" or example.image is None:
                what = "has no image" if example.image is None else f"is a {example.task} row"
                raise VLMError(f"{example.source or 'data'}: {what}; the stage1 recipe trains on image captions only")
        self.examples, self.processor = examples, processor

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        image = open_example_image(example)
        pixels = self.processor.image_processor([image], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "text": example.target, "image_key": image_key(example.image)}


class Stage1Collator:
    """Stacks images, tokenizes the captions with the Q-Former's tokenizer (right-padded).

    `same_width`: pad every batch to `max_length`, as several processes need (ITC/ITM gather the
    captions of all processes, which must have one shape); one process pads to the longest caption.
    """

    def __init__(self, tokenizer, max_length: int, same_width: bool = False):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.padding = "max_length" if same_width else "longest"

    def __call__(self, samples: list[dict]) -> dict:
        text = self.tokenizer([s["text"] for s in samples], padding=self.padding, truncation=True,
                              max_length=self.max_length, return_tensors="pt")
        keys = [s["image_key"] for s in samples]
        return {
            "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
            "image_keys": keys,
            "image_ids": torch.tensor([stable_id(k) for k in keys], dtype=torch.long),
            "caption_ids": torch.tensor([stable_id(s["text"]) for s in samples], dtype=torch.long),
            "text_ids": text["input_ids"],
            "text_mask": text["attention_mask"],
        }


def qformer_tokenizer(processor):
    """The tokenizer the Q-Former's text side reads (a VLMError when the checkpoint has none)."""
    tokenizer = getattr(processor, "qformer_tokenizer", None)
    if tokenizer is None:
        raise VLMError("the stage1 recipe needs the Q-Former's tokenizer: build the model with "
                       "`vlm build --qformer-init BERT_CHECKPOINT` (or start from a Blip2ForImageTextRetrieval one)")
    return tokenizer
