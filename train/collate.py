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

from vlm.data import image_key, open_example_images
from vlm.errors import VLMError
from vlm.processing import LITERAL_START, VLMProcessor

IGNORE_INDEX = -100


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


def encode_example(example, processor: VLMProcessor, images: list[Image.Image] | Image.Image | None,
                   max_length: int) -> dict[str, Any]:
    """`input_ids`, `labels` (IGNORE_INDEX off-target) and, with images, `pixel_values` (+ Q-Former ids).

    The whole text is tokenized once, by the processor, as inference tokenizes a prompt: the ids
    before each target are exactly the ids `vlm chat`, `vlm serve` and `vlm caption` feed for the
    same conversation (targets are located by tokenizing the text up to each one). `images`
    empty (or None) is a text-only sample (LLaVA data has them): no image tokens, no
    `pixel_values`. Each image goes where its `<image>` marker is, in whichever turn that is; with
    no marker it goes in front of the prompt, as the processor places it at inference.
    """
    images = [] if images is None else [images] if isinstance(images, Image.Image) else list(images)
    segments = render_segments(example, processor)
    check_image_markers(example, segments, processor, num_images=len(images))
    text, targets = _join_segments(segments)
    marker = processor.image_token

    def encode(prefix: str) -> list[int]:
        count = prefix.count(marker) if marker in text else len(images)  # no markers: all images in front
        return processor(text=prefix, images_per_text=[count])["input_ids"][0].tolist()

    reads_text = images and processor.qformer_tokenizer is not None
    enc = processor(text=text, images_per_text=[len(images)],
                    qformer_text=_instructions(text, targets, processor, len(images)) if reads_text else None)
    input_ids = enc["input_ids"][0].tolist()
    labels = [IGNORE_INDEX] * len(input_ids)
    for start, end in targets:
        before, through = encode(text[:start]), encode(text[:end])
        if input_ids[:len(through)] != through or through[:len(before)] != before:
            raise VLMError(f"{example.source}: the prompt does not tokenize the same alone as inside the whole "
                           "conversation; cannot tell the targets apart")
        labels[len(before):len(through)] = [t if t != processor.image_token_id else IGNORE_INDEX
                                            for t in through[len(before):]]
    qformer_rows = enc["qformer_input_ids"].tolist() if "qformer_input_ids" in enc else []
    tokenizer = processor.tokenizer
    if example.task != "chat" or tokenizer.eos_token not in text.replace(LITERAL_START + tokenizer.eos_token, ""):
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
    out = {"input_ids": input_ids, "labels": labels}
    if images:
        out["pixel_values"] = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        if qformer_rows:
            out["qformer_input_ids"] = qformer_rows
    return out


def _join_segments(segments: list[tuple[str, bool]]) -> tuple[str, list[tuple[int, int]]]:
    """The whole text, and the (start, end) character span of each target in it. A target that
    would touch the prompt's last word gets a space ("a photo of" + " a cat"), as generation
    would continue it."""
    text, targets = "", []
    for k, (piece, carries_loss) in enumerate(segments):
        if k and carries_loss and text and not text[-1].isspace() and not piece.startswith((" ", "\n")):
            piece = " " + piece
        if carries_loss:
            targets.append((len(text), len(text) + len(piece)))
        text += piece
    return text, targets


def _instructions(text: str, targets: list[tuple[int, int]], processor: VLMProcessor, num_images: int) -> list[str]:
    """What an InstructBLIP-style Q-Former reads for each image: the prompt up to the first target
    after the image (never a target itself), as at inference, where it reads the prompt."""
    marker = processor.image_token
    places = [i for i in range(len(text)) if text.startswith(marker, i)] or [0] * num_images
    out = []
    for place in places:
        end = next((start for start, _ in targets if start >= place), len(text))
        out.append(processor.qformer_instruction(text[:end]))
    return out


def count_image_markers(example, processor: VLMProcessor) -> int:
    """How many `<image>` markers the sample's rendered text holds (cheap: no template rendering)."""
    marker = processor.image_token
    if example.task == "caption":
        return (processor.caption_prompt or "").count(marker) + (example.caption or "").count(marker)
    if example.task == "vqa":
        return processor.format_question(example.question or "").count(marker)
    count = 0
    for turn in example.conversation or []:
        content = turn.get("content")
        if isinstance(content, str):
            count += content.count(marker)
        else:  # [{"type": "image"}, {"type": "text", ...}]
            count += sum(1 if p.get("type") == "image" else p.get("text", "").count(marker) for p in content or [])
    return count


def check_image_markers(example, segments, processor: VLMProcessor, num_images: int) -> None:
    """A VLMError naming the row unless its `<image>` markers fit its images (one image may go
    without a marker, in front; several need one marker each)."""
    markers = sum(text.count(processor.image_token) for text, _ in segments)
    _check_marker_count(example, markers, num_images, processor.image_token)


def _check_marker_count(example, markers: int, num_images: int, marker: str) -> None:
    where = example.source or "example"
    if not num_images and example.task != "chat":
        raise VLMError(f"{where}: {example.task} example has no image")
    if not num_images and markers:
        raise VLMError(f"{where}: text-only example holds {markers} {marker} marker(s) but no image")
    if num_images == 1 and markers > 1:
        raise VLMError(f"{where}: holds {markers} {marker} markers for one image")
    if num_images > 1 and markers != num_images:
        raise VLMError(f"{where}: holds {markers} {marker} markers for {num_images} images (one marker each)")


class TrainDataset(Dataset):
    """Examples -> encoded samples; `__getitem__` runs in DataLoader workers.

    Rows whose `<image>` markers do not fit their image are rejected here, before training,
    with an error naming the row (in a DataLoader worker it would surface as a traceback).
    """

    def __init__(self, examples: Sequence, processor: VLMProcessor, max_length: int = 512):
        if len(examples) == 0:
            raise VLMError("the dataset is empty")
        for example in examples:
            _check_marker_count(example, count_image_markers(example, processor), len(example.images),
                                processor.image_token)
        self.examples = examples
        self.processor = processor
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        images = open_example_images(example)
        sample = encode_example(example, self.processor, images, self.max_length)
        if images:  # names each image for the trainer's vision feature cache
            sample["image_keys"] = [image_key(image) for image in example.images]
        return sample


class Collator:
    """Right-pads encoded samples into a batch (labels padded with IGNORE_INDEX).

    `pixel_values` (and Q-Former ids) hold one row per sample that has an image, in batch order:
    the model fills the image tokens in reading order over the batch, so text-only samples
    simply contribute none. A batch of text-only samples has no `pixel_values`.
    """

    def __init__(self, pad_token_id: int, qformer_pad_token_id: int = 0):
        self.pad_token_id = pad_token_id
        self.qformer_pad_token_id = qformer_pad_token_id

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(s["input_ids"]) for s in samples)
        batch = {
            "input_ids": _pad([s["input_ids"] for s in samples], width, self.pad_token_id),
            "attention_mask": _pad([[1] * len(s["input_ids"]) for s in samples], width, 0),
            "labels": _pad([s["labels"] for s in samples], width, IGNORE_INDEX),
        }
        with_image = [s for s in samples if "pixel_values" in s]
        if with_image:
            batch["pixel_values"] = torch.cat([s["pixel_values"] for s in with_image])
            if all("image_keys" in s for s in with_image):
                batch["image_keys"] = [key for s in with_image for key in s["image_keys"]]
        qformer_rows = [row for s in with_image for row in s.get("qformer_input_ids", [])]
        if qformer_rows:
            qwidth = max(len(r) for r in qformer_rows)
            batch["qformer_input_ids"] = _pad(qformer_rows, qwidth, self.qformer_pad_token_id)
            batch["qformer_attention_mask"] = _pad([[1] * len(r) for r in qformer_rows], qwidth, 0)
        return batch


def make_collator(processor: VLMProcessor) -> Collator:
    """A `Collator` with the processor's pad ids."""
    qtok = getattr(processor, "qformer_tokenizer", None)
    return Collator(processor.tokenizer.pad_token_id, (qtok.pad_token_id or 0) if qtok is not None else 0)


def _pad(rows: list[list[int]], width: int, value: int) -> torch.Tensor:
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)
