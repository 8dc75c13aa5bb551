"""`VLMProcessor`: image processor + LLM tokenizer (+ Q-Former tokenizer for InstructBLIP)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoProcessor, AutoTokenizer, BatchFeature, ProcessorMixin
from transformers.processing_utils import ProcessingKwargs, Unpack
from transformers.tokenization_utils_base import AddedToken

from .configuration import VLMConfig

IMAGE_TOKEN = "<image>"
# Around a control token's text inside message content: the processor encodes what is between them
# as plain text (private-use characters, never in real text; any in the content are dropped).
LITERAL_START, LITERAL_END = "\ue000", "\ue001"
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"
# BLIP-2's VQA prompt; used for questions when the LLM has no chat template and none was saved.
DEFAULT_QUESTION_TEMPLATE = "Question: {} Short answer:"


class VLMProcessorKwargs(ProcessingKwargs, total=False):
    """transformers' processing kwargs: `text_kwargs` go to the tokenizer step, `images_kwargs`
    to the image processor."""


class VLMProcessor(ProcessorMixin):
    """Turns images and text into model inputs, and generated ids back into text.

    Each `<image>` in a text marks where an image goes; it expands to `num_query_tokens`
    image tokens that the model fills with that image's Q-Former output. A text with no
    `<image>` but with images gets them in front of everything, before BOS, which is where
    BLIP-2 and InstructBLIP were trained to see them. Batches are left-padded, so batched
    generation gives the same text as one prompt at a time.

    `question_template` / `caption_prompt` are the prompts a checkpoint was trained with; they
    are saved in `processor_config.json` and are the CLI's defaults for that model.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_query_tokens: int = 32,
        question_template: str | None = None,
        caption_prompt: str = "",
        qformer_max_length: int = 128,
        chat_template: str | None = None,
        **kwargs,
    ):
        if tokenizer is None or image_processor is None:
            raise ValueError("VLMProcessor needs an image_processor and a tokenizer")
        if getattr(tokenizer, "image_token", None) is None and IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.num_query_tokens = num_query_tokens
        self.question_template = question_template
        self.caption_prompt = caption_prompt
        self.qformer_max_length = qformer_max_length
        # Optional, so not a ProcessorMixin attribute: saved/loaded in a subfolder by hand.
        self.qformer_tokenizer = kwargs.pop("qformer_tokenizer", None)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    # -- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, save_directory, **kwargs):
        qformer_tokenizer = self.__dict__.pop("qformer_tokenizer")
        try:
            files = super().save_pretrained(save_directory, **kwargs)
        finally:
            self.qformer_tokenizer = qformer_tokenizer
        if qformer_tokenizer is not None:
            qformer_tokenizer.save_pretrained(os.path.join(save_directory, QFORMER_TOKENIZER_DIR))
        return files

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> VLMProcessor:
        """Load from a `vlm` folder; see `vlm.loading.load_processor` for official BLIP-2 folders."""
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        qformer_dir = os.path.join(str(pretrained_model_name_or_path), QFORMER_TOKENIZER_DIR)
        if os.path.isdir(qformer_dir):
            processor.qformer_tokenizer = AutoTokenizer.from_pretrained(qformer_dir)
        return processor

    # -- prompts -------------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template or getattr(self.tokenizer, "chat_template", None))

    def format_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render a conversation to prompt text: the one rule for training, eval and serving.

        `messages` are `{"role": "system" | "user" | "assistant", "content": str | [{"type":
        "image"}, {"type": "text", "text": ...}]}`. With the LLM's chat template: the template, an
        `<image>` marker where each image was sent. Without one: `question_chain`.
        """
        if not self.has_chat_template:
            return self.question_chain(messages)
        flat = [{"role": m["role"], "content": self.literal(_content_to_text(m["content"], self.image_token))}
                for m in messages]
        template = self.chat_template or self.tokenizer.chat_template
        return self.tokenizer.apply_chat_template(
            flat, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def question_chain(self, messages: Sequence[dict[str, Any]]) -> str:
        """A conversation for an LLM without a chat template, in the prompts BLIP-2-style models are
        trained with (this checkpoint's `question_template` and `caption_prompt`, saved with it):
        each user turn is its text in the question template (an image alone: the caption prompt),
        each assistant turn follows after a space, so one question about one image is exactly
        `format_question(question)`, and a conversation reads "Question: q1 Short answer: a1
        Question: q2 Short answer:". Images get no markers: they all go in front, as BLIP-2 saw
        them. System text comes first, on a line of its own."""
        template = self.question_template or DEFAULT_QUESTION_TEMPLATE
        system, pieces = [], []
        for m in messages:
            text = _content_to_text(m["content"], self.image_token).replace(self.image_token, "").strip()
            text = self.literal(text)
            if m["role"] == "system":
                system.append(text)
            elif m["role"] == "user":
                pieces.append(template.format(text) if text else self.caption_prompt or "")
            else:
                pieces.append(text)
        chain = " ".join(piece for piece in pieces if piece)
        return "\n".join([*system, chain]) if system else chain

    def format_question(self, question: str) -> str:
        """The prompt for one question about one image (image in front, BLIP-2 style)."""
        if self.question_template is not None:
            return self.question_template.format(self.literal(question))
        if self.has_chat_template:
            return self.format_chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}])
        return DEFAULT_QUESTION_TEMPLATE.format(self.literal(question))

    def control_tokens(self) -> list[str]:
        """The tokenizer's special tokens (chat-template markers, BOS/EOS...) but the image token,
        longest first."""
        tokens = {t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special}
        tokens |= set(self.tokenizer.all_special_tokens)
        tokens.discard(self.image_token)
        return sorted((t for t in tokens if t), key=len, reverse=True)

    def literal(self, text: str) -> str:
        """`text` (message content) marked so that any control token in it is encoded as the plain
        text it is, never as the token: a user typing "<|im_end|>" cannot end their turn and forge
        a system or assistant one. Text without control tokens is returned unchanged."""
        text = text.replace(LITERAL_START, "").replace(LITERAL_END, "")
        found = [t for t in self.control_tokens() if t in text]
        if not found:
            return text
        pattern = "|".join(re.escape(t) for t in found)
        return re.sub(pattern, lambda m: LITERAL_START + m.group(0) + LITERAL_END, text)

    def qformer_instruction(self, prompt: str) -> str:
        """What the Q-Former reads by default for `prompt` (InstructBLIP-style models): the
        rendered prompt without its image markers. One rule for training, captioning and chat."""
        return prompt.replace(self.image_token, "").replace(LITERAL_START, "").replace(LITERAL_END, "").strip()

    # -- encoding ------------------------------------------------------------------------------
    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        qformer_text: str | list[str] | None = None,
        images_per_text: list[int] | None = None,
        return_tensors: str | None = "pt",
        **kwargs: Unpack[VLMProcessorKwargs],
    ) -> BatchFeature:
        """Encode a batch.

        Args:
            images: a PIL image, a flat list of images (in reading order over the batch), or one
                list of images per text.
            text: one prompt or a list; `<image>` marks where an image goes.
            qformer_text: the instruction the Q-Former reads (InstructBLIP-style models), one per
                image; defaults to each image's prompt text without markers.
            images_per_text: instead of `images`, how many images each text holds when they are
                already encoded (the model gets `vision_features` / `image_features`): the image
                tokens are laid out as with images, and no `pixel_values` are made.
            return_tensors: "pt" (default), "np", or None: `input_ids` and `attention_mask` as
                lists. `pixel_values` and the Q-Former's ids are torch tensors whatever it is.
            **kwargs: transformers' processing kwargs: `add_special_tokens`, `padding` (True or
                "longest" (default), "max_length", or False / "do_not_pad": rows keep their own
                lengths, which only return_tensors=None or texts of equal length can hold;
                padding is always on the left), `max_length`, `truncation` (True or a strategy
                name: text tokens past `max_length` are cut, image tokens never are; False /
                "do_not_truncate": nothing is cut) for the text, and image-processor kwargs
                (`size`, `do_resize`, ...) for the images.
        """
        output_kwargs = self._merge_kwargs(
            VLMProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        text_kwargs = output_kwargs["text_kwargs"]
        texts = [""] if text is None else [text] if isinstance(text, str) else list(text)
        if images_per_text is not None:
            if images is not None:
                raise ValueError("give images or images_per_text, not both")
            if len(images_per_text) != len(texts):
                raise ValueError(f"images_per_text has {len(images_per_text)} entries for {len(texts)} texts")
            per_sample = [[None] * int(n) for n in images_per_text]
        else:
            per_sample = _images_per_sample(images, texts, self.image_token)
        add_special = text_kwargs.get("add_special_tokens", True)
        rows, row_images, instructions = [], [], []
        for prompt, sample_images in zip(texts, per_sample):
            row = self._encode_text(prompt, len(sample_images), add_special)
            rows.append(self._truncate(row, text_kwargs))
            row_images.extend(sample_images)
            instructions.extend([self.qformer_instruction(prompt)] * len(sample_images))
        encoding = self._pad(rows, text_kwargs)
        if row_images and images_per_text is None:
            images_kwargs = {k: v for k, v in output_kwargs["images_kwargs"].items() if k != "return_tensors"}
            encoding["pixel_values"] = self.image_processor(row_images, return_tensors="pt", **images_kwargs)[
                "pixel_values"]
        if row_images and self.qformer_tokenizer is not None:
            encoding.update(self._encode_instructions(qformer_text, instructions, len(row_images)))
        return BatchFeature(encoding, tensor_type=return_tensors)

    def _encode_instructions(self, qformer_text, instructions: list[str], num_images: int) -> dict:
        if qformer_text is not None:
            instructions = [qformer_text] if isinstance(qformer_text, str) else list(qformer_text)
        if len(instructions) != num_images:
            raise ValueError(f"qformer_text has {len(instructions)} entries for {num_images} images")
        q = self.qformer_tokenizer(
            instructions, padding=True, truncation=True, max_length=self.qformer_max_length, return_tensors="pt"
        )
        return {"qformer_input_ids": q["input_ids"], "qformer_attention_mask": q["attention_mask"]}

    def _encode_text(self, prompt: str, num_images: int, add_special_tokens: bool) -> list[int]:
        image_block = [self.image_token_id] * self.num_query_tokens
        markers = prompt.count(self.image_token)
        if markers == 0:
            return image_block * num_images + self._tokenize(prompt, add_special_tokens)
        if markers != num_images:
            raise ValueError(f"the text holds {markers} {self.image_token} markers for {num_images} images")
        expanded = prompt.replace(self.image_token, self.image_token * self.num_query_tokens)
        return self._tokenize(expanded, add_special_tokens)

    def _tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of `text`; the parts marked by `literal` are encoded with their control tokens
        as plain text (the rest, and any text without such parts, exactly as the tokenizer does)."""
        if LITERAL_START not in text:
            return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        ids = self.tokenizer("", add_special_tokens=add_special_tokens)["input_ids"]  # BOS, if any
        for piece in re.split(f"({LITERAL_START}[^{LITERAL_END}]*{LITERAL_END})", text):
            if piece.startswith(LITERAL_START):
                ids += self.tokenizer(piece[1:-1], add_special_tokens=False, split_special_tokens=True)["input_ids"]
            elif piece:
                ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        return ids

    def _truncate(self, row: list[int], text_kwargs: dict) -> list[int]:
        max_length = text_kwargs.get("max_length")
        truncation = text_kwargs.get("truncation")
        if truncation in (None, False, "do_not_truncate") or max_length is None or len(row) <= max_length:
            return row
        if self.image_token_id in row[max_length:]:
            raise ValueError(f"truncation to max_length={max_length} would cut an image's tokens")
        return row[:max_length]

    def _pad(self, rows: list[list[int]], text_kwargs: dict) -> dict:
        """Left padding (batched generation needs it) to the longest row or to `max_length`."""
        padding = text_kwargs.get("padding", True)
        if padding in (False, "do_not_pad"):
            return {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
        width = max(len(r) for r in rows)
        if padding == "max_length" and text_kwargs.get("max_length"):
            width = max(width, int(text_kwargs["max_length"]))
        pad = self.tokenizer.pad_token_id
        return {
            "input_ids": [[pad] * (width - len(r)) + r for r in rows],
            "attention_mask": [[0] * (width - len(r)) + [1] * len(r) for r in rows],
        }

    # -- decoding ------------------------------------------------------------------------------
    def decode_generated(self, sequences: torch.Tensor, input_ids: torch.Tensor) -> list[str]:
        """Text of the new tokens only, one string per row, stripped."""
        new_tokens = sequences[:, input_ids.shape[1] :]
        return [t.strip() for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def _content_to_text(content, image_token: str) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        kind = part.get("type")
        if kind == "image":
            parts.append(image_token)
        elif kind == "text":
            parts.append(part["text"])
        else:
            raise ValueError(f"unknown message content type {kind!r} (expected 'image' or 'text')")
    return "\n".join(parts)


def _images_per_sample(images, texts: list[str], image_token: str) -> list[list]:
    """Split `images` into one list per text, by each text's `<image>` count."""
    if images is None:
        return [[] for _ in texts]
    if not isinstance(images, (list, tuple)):
        images = [images]
    if images and isinstance(images[0], (list, tuple)):
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} image lists for {len(texts)} texts")
        return [list(x) for x in images]
    counts = [t.count(image_token) for t in texts]
    if sum(counts) == 0:
        # No markers: one image per text, BLIP-2 style.
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} images for {len(texts)} texts and no {image_token} markers")
        return [[im] for im in images]
    if sum(counts) != len(images):
        raise ValueError(f"the texts hold {sum(counts)} {image_token} markers but {len(images)} images were given")
    out, start = [], 0
    for c in counts:
        out.append(list(images[start : start + c]))
        start += c
    return out


AutoProcessor.register(VLMConfig, VLMProcessor, exist_ok=True)
