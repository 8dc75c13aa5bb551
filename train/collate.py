"""From `Example` records to training batches: prompt rendering, labels, padding.

Each sample is rendered exactly as inference renders it (the processor builds the prompt and its
image tokens), then the target follows. Only target tokens carry loss: the caption or answer
plus EOS, or every assistant turn of a conversation. `TrainDataset.__getitem__` decodes the
image and tokenizes, so that work runs in DataLoader workers; `collate` only pads.

Batches are right-padded: with the attention mask, the real tokens keep positions 0..n-1,
the same positions they get at inference, where left padding is undone by position ids
computed from the mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from vlm.errors import VLMError
from vlm.images import load_image, to_rgb
from vlm.processing import VLMProcessor

IGNORE_INDEX = -100


def open_image(example) -> Image.Image:
    """The example's image as RGB; a VLMError naming the row when it cannot be decoded."""
    image = example.image
    if image is None:
        raise VLMError(f"{example.source or 'example'}: no image")
    if isinstance(image, Image.Image):
        return to_rgb(image)
    try:
        return load_image(image)
    except VLMError as e:
        raise VLMError(f"{example.source}: {e}" if example.source else str(e)) from None


def render_segments(example, processor: VLMProcessor) -> list[tuple[str, bool]]:
    """The sample's text as `(text, carries_loss)` segments; the first is the prompt.

    caption: `processor.caption_prompt`, then the caption; vqa: `processor.format_question`,
    then the answer; chat: the template-rendered conversation, loss on each assistant turn.
    """
    task = example.task
    if task == "caption":
        return [(processor.caption_prompt or "", False), (example.target, True)]
    if task == "vqa":
        if not example.question:
            raise VLMError(f"{example.source}: vqa example has no question")
        return [(processor.format_question(example.question), False), (example.target, True)]
    if task == "chat":
        return _chat_segments(example, processor)
    raise VLMError(f"{example.source}: unknown task {task!r} (expected caption, vqa or chat)")


def _chat_segments(example, processor: VLMProcessor) -> list[tuple[str, bool]]:
    turns = list(example.conversation or [])
    if not any(t.get("role") == "assistant" for t in turns):
        raise VLMError(f"{example.source}: conversation has no assistant turn to learn from")
    segments: list[tuple[str, bool]] = []
    done = ""  # text rendered so far
    for i, turn in enumerate(turns):
        if turn.get("role") != "assistant":
            continue
        prefix = processor.format_chat(turns[:i], add_generation_prompt=True)
        through = processor.format_chat(turns[: i + 1], add_generation_prompt=False)
        if not prefix.startswith(done) or not through.startswith(prefix):
            raise VLMError(
                f"{example.source}: the chat template does not render the conversation incrementally; "
                "cannot tell the assistant turns apart"
            )
        segments.append((prefix[len(done) :], False))
        segments.append((through[len(prefix) :], True))
        done = through
    return segments


def encode_example(example, processor: VLMProcessor, image: Image.Image, max_length: int) -> dict[str, Any]:
    """`input_ids`, `labels` (IGNORE_INDEX off-target), `pixel_values` and Q-Former ids of one sample."""
    segments = render_segments(example, processor)
    prompt = segments[0][0]
    # The processor expands/places the image tokens exactly as `vlm caption` / `vlm chat` do.
    enc = processor(images=[image], text=prompt)
    input_ids = enc["input_ids"][0].tolist()
    labels = [IGNORE_INDEX] * len(input_ids)
    tokenizer = processor.tokenizer
    text_so_far = prompt
    for text, carries_loss in segments[1:]:
        if carries_loss and text_so_far and not text_so_far[-1].isspace() and not text.startswith((" ", "\n")):
            text = " " + text  # "a photo of" + " a cat", as generation would continue it
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if carries_loss else [IGNORE_INDEX] * len(ids)
        text_so_far += text
    if example.task != "chat" or tokenizer.eos_token not in text_so_far:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    if len(input_ids) > max_length:
        image_positions = [i for i, t in enumerate(input_ids) if t == processor.image_token_id]
        if image_positions and image_positions[-1] >= max_length:
            raise VLMError(
                f"{example.source}: the prompt and image tokens need {image_positions[-1] + 1} tokens, over "
                f"data.max_length={max_length}"
            )
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    out = {"input_ids": input_ids, "labels": labels, "pixel_values": enc["pixel_values"]}
    if "qformer_input_ids" in enc:
        out["qformer_input_ids"] = enc["qformer_input_ids"][0].tolist()
    return out


class TrainDataset(Dataset):
    """Examples -> encoded samples; `__getitem__` runs in DataLoader workers."""

    def __init__(self, examples: Sequence, processor: VLMProcessor, max_length: int = 512):
        if len(examples) == 0:
            raise VLMError("the dataset is empty")
        self.examples = examples
        self.processor = processor
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        return encode_example(example, self.processor, open_image(example), self.max_length)


class Collator:
    """Right-pads encoded samples into a batch (labels padded with IGNORE_INDEX)."""

    def __init__(self, pad_token_id: int, qformer_pad_token_id: int = 0):
        self.pad_token_id = pad_token_id
        self.qformer_pad_token_id = qformer_pad_token_id

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(s["input_ids"]) for s in samples)
        batch = {
            "input_ids": _pad([s["input_ids"] for s in samples], width, self.pad_token_id),
            "attention_mask": _pad([[1] * len(s["input_ids"]) for s in samples], width, 0),
            "labels": _pad([s["labels"] for s in samples], width, IGNORE_INDEX),
            "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
        }
        if "qformer_input_ids" in samples[0]:
            qwidth = max(len(s["qformer_input_ids"]) for s in samples)
            batch["qformer_input_ids"] = _pad([s["qformer_input_ids"] for s in samples], qwidth, self.qformer_pad_token_id)
            batch["qformer_attention_mask"] = _pad([[1] * len(s["qformer_input_ids"]) for s in samples], qwidth, 0)
        return batch


def make_collator(processor: VLMProcessor) -> Collator:
    """A `Collator` with the processor's pad ids."""
    qtok = getattr(processor, "qformer_tokenizer", None)
    return Collator(processor.tokenizer.pad_token_id, (qtok.pad_token_id or 0) if qtok is not None else 0)


def _pad(rows: list[list[int]], width: int, value: int) -> torch.Tensor:
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)
