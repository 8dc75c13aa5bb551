"""Requests -> model inputs: prompt tokens from the processor, image soft prompts from the cache.

Each distinct image runs through the vision tower once: its preprocessed pixels are the cache key
(`pixel_digest`), so the same picture in a later request, a chat follow-up or a resent API
conversation costs no vision-tower pass. BLIP-2-style models cache the projected Q-Former
output (the soft prompt itself); InstructBLIP-style ones cache the vision tower output and rerun
the Q-Former with each request's instruction.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..errors import VLMError
from ..preprocess import make_preprocess
from .cache import FeatureCache, pixel_digest
from .request import ImageInput, Request

# Novelty flags kept per image key: a 32-character digest, a bool and an OrderedDict link are about
# 200 bytes an entry, so this is ~20 MB at most.
MAX_NOVELTY_ENTRIES = 100_000


@dataclass
class Encoded:
    """One request's prompt tokens (image blocks in place) and its images' soft prompts."""

    input_ids: list[int]
    image_features: torch.Tensor | None  # (num_images, num_query_tokens, llm_width), on the model's device
    novel: bool = False  # an image unlike the model's training images (`vlm.novelty`)


class Encoder:
    """Turns `Request`s into `Encoded` inputs for one `(model, processor)`."""

    def __init__(self, model, processor, cache: FeatureCache):
        self.model, self.processor, self.cache = model, processor, cache
        self.reads_instruction = bool(getattr(model.config, "qformer_reads_instruction", False))
        self.preprocess = make_preprocess(processor.image_processor)
        self.vision_encodes = 0  # images that ran through the vision tower
        # Training-image statistics loaded with the model (None: no warnings), and per image key
        # whether it is unlike them (bounded by MAX_NOVELTY_ENTRIES).
        self.novelty = getattr(model, "novelty", None)
        # What the model says instead of answering about such an image (None: it answers, warned).
        self.novel_answer = getattr(self.novelty, "answer", None)
        self._novel: OrderedDict[str, bool] = OrderedDict()

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def pixels(self, image: ImageInput) -> torch.Tensor:
        """`(3, H, W)` pixel values of an image (a tensor is taken as already preprocessed)."""
        return image if isinstance(image, torch.Tensor) else self.preprocess(image)

    @torch.inference_mode()
    def cached_features(self, images: list[ImageInput]) -> tuple[list[torch.Tensor], list[bool]]:
        """Per image: the cached tensor (soft prompt, or vision features for instruction-reading
        Q-Formers), and whether it is unlike the training images (always False without novelty
        statistics); the images not cached yet run through the vision tower together."""
        pixels = [self.pixels(image) for image in images]
        keys = [pixel_digest(p) for p in pixels]
        found = {k: v for k in dict.fromkeys(keys) if (v := self.cache.get(k)) is not None}
        missing = [k for k in dict.fromkeys(keys) if k not in found]
        if missing:
            batch = torch.stack([pixels[keys.index(k)] for k in missing])
            vision = self.model.get_vision_features(batch)
            self.vision_encodes += len(missing)
            self._remember_novelty(missing, vision)
            values = vision if self.reads_instruction else self.model.get_image_features(vision_features=vision)
            for key, value in zip(missing, values):
                # A copy: a view would keep the whole batch's tensor alive, which the cache's byte
                # count would not see.
                value = value.unsqueeze(0).clone()
                found[key] = value
                self.cache.put(key, value)
        return [found[k] for k in keys], [self._novel.get(k, False) for k in keys]

    def _remember_novelty(self, keys: list[str], vision: torch.Tensor) -> None:
        if self.novelty is None:
            return
        for key, novel in zip(keys, self.novelty.is_novel(vision)):
            self._novel[key] = novel
        while len(self._novel) > MAX_NOVELTY_ENTRIES:
            self._novel.popitem(last=False)

    def prompt_problems(self, requests: list[Request], context_length: int) -> list[VLMError | None]:
        """Per request, why the LLM cannot take its prompt (`prompt_problem`, misplaced images), or None."""
        problems: list[VLMError | None] = [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                check_markers(request, self.processor.image_token)
            except VLMError as e:
                problems[i] = e
        fine = [i for i, problem in enumerate(problems) if problem is None]
        for i, length in zip(fine, self.prompt_lengths([requests[i] for i in fine]) if fine else []):
            problems[i] = prompt_problem(length, context_length)
        return problems

    def prompt_lengths(self, requests: list[Request]) -> list[int]:
        """Tokens of each request's prompt, image blocks included (no image is encoded)."""
        encoding = self.processor(text=[r.prompt for r in requests], images_per_text=[len(r.images) for r in requests],
                                  padding=False, return_tensors=None)
        return [len(ids) for ids in encoding["input_ids"]]

    def encode_batch(self, requests: list[Request]) -> tuple[dict, torch.Tensor | None, list[bool]]:
        """Left-padded `input_ids` / `attention_mask` for `requests`, the soft prompts of all
        their images in reading order (None when there are none), and per request whether one of
        its images is unlike the training images."""
        for request in requests:
            check_markers(request, self.processor.image_token)
        encoding = self.processor(
            text=[r.prompt for r in requests],
            images_per_text=[len(r.images) for r in requests],
            qformer_text=_instructions(requests, self.processor),
        )
        images = [image for r in requests for image in r.images]
        if not images:
            return dict(encoding), None, [False] * len(requests)
        cached, novel = self.cached_features(images)
        features = torch.cat(cached, dim=0)
        if self.reads_instruction:
            features = self.model.get_image_features(
                vision_features=features,
                qformer_input_ids=encoding["qformer_input_ids"].to(features.device),
                qformer_attention_mask=encoding["qformer_attention_mask"].to(features.device),
            )
        encoding = {k: v for k, v in encoding.items() if not k.startswith("qformer_")}
        return encoding, features, _per_request(novel, requests)

    def encode(self, request: Request) -> Encoded:
        """One request, unpadded; `VLMError` for an empty prompt (no token to start from)."""
        encoding, features, (novel,) = self.encode_batch([request])
        input_ids = encoding["input_ids"][0].tolist()
        if not input_ids:
            raise prompt_problem(0, 1)
        return Encoded(input_ids, features, novel=novel)


def prompt_problem(length: int, context_length: int) -> VLMError | None:
    """The error for a prompt the LLM cannot answer, else None: an empty one (no text, no image:
    nothing to embed), or one that leaves no room for an answer in the LLM's context."""
    if length == 0:
        return VLMError("the prompt is empty: send some text or an image")
    if length < context_length:
        return None
    return VLMError(f"the prompt needs {length} tokens (images included); this model reads at most "
                    f"{context_length}, its answer included")


def check_markers(request: Request, marker: str) -> None:
    """`VLMError` unless the prompt places every image: one `marker` per image, or none (all in front)."""
    markers = request.prompt.count(marker)
    if markers and markers != len(request.images):
        raise VLMError(f"the prompt holds {markers} {marker} markers for {len(request.images)} images")
    if request.qformer_text is not None and len(request.qformer_text) != len(request.images):
        raise VLMError(f"qformer_text has {len(request.qformer_text)} entries for {len(request.images)} images")


def _per_request(flags: list[bool], requests: list[Request]) -> list[bool]:
    """Per-image flags (in reading order) -> whether any image of each request has one."""
    out, start = [], 0
    for r in requests:
        out.append(any(flags[start:start + len(r.images)]))
        start += len(r.images)
    return out


def _instructions(requests: list[Request], processor) -> list[str] | None:
    """The Q-Former instructions of every image in reading order, when any request sets them."""
    if all(r.qformer_text is None for r in requests):
        return None
    out = []
    for r in requests:
        if r.qformer_text is not None:
            out.extend(r.qformer_text)
        else:
            out.extend([processor.qformer_instruction(r.prompt)] * len(r.images))
    return out
