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

from ..preprocess import make_preprocess
from .cache import FeatureCache, pixel_digest
from .request import ImageInput, Request


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
        # whether it is unlike them (a few bytes each; bounded).
        self.novelty = getattr(model, "novelty", None)
        self._novel: OrderedDict[str, bool] = OrderedDict()
        self.last_novel = False  # of the images the last `cached_features` call encoded

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def pixels(self, image: ImageInput) -> torch.Tensor:
        """`(3, H, W)` pixel values of an image (a tensor is taken as already preprocessed)."""
        return image if isinstance(image, torch.Tensor) else self.preprocess(image)

    @torch.inference_mode()
    def cached_features(self, images: list[ImageInput]) -> list[torch.Tensor]:
        """Per image: the cached tensor (soft prompt, or vision features for instruction-reading
        Q-Formers); the images not cached yet run through the vision tower together."""
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
                value = value.unsqueeze(0).detach()
                found[key] = value
                self.cache.put(key, value)
        self.last_novel = any(self._novel.get(k, False) for k in keys)
        return [found[k] for k in keys]

    def _remember_novelty(self, keys: list[str], vision: torch.Tensor) -> None:
        if self.novelty is None:
            return
        for key, novel in zip(keys, self.novelty.is_novel(vision)):
            self._novel[key] = novel
        while len(self._novel) > 1_000_000:
            self._novel.popitem(last=False)

    def any_novel(self, images: list[ImageInput]) -> bool:
        """Whether any of `images` (encoded before) is unlike the training images."""
        return any(self._novel.get(pixel_digest(self.pixels(image)), False) for image in images)

    def encode_batch(self, requests: list[Request]) -> tuple[dict, torch.Tensor | None]:
        """Left-padded `input_ids` / `attention_mask` for `requests` and the soft prompts of all
        their images in reading order (None when there are none)."""
        encoding = self.processor(
            text=[r.prompt for r in requests],
            images_per_text=[len(r.images) for r in requests],
            qformer_text=_instructions(requests, self.processor),
        )
        images = [image for r in requests for image in r.images]
        if not images:
            return dict(encoding), None
        features = torch.cat(self.cached_features(images), dim=0)
        if self.reads_instruction:
            features = self.model.get_image_features(
                vision_features=features,
                qformer_input_ids=encoding["qformer_input_ids"].to(features.device),
                qformer_attention_mask=encoding["qformer_attention_mask"].to(features.device),
            )
        encoding = {k: v for k, v in encoding.items() if not k.startswith("qformer_")}
        return encoding, features

    def encode(self, request: Request) -> Encoded:
        """One request, unpadded."""
        encoding, features = self.encode_batch([request])
        return Encoded(encoding["input_ids"][0].tolist(), features, novel=self.last_novel if request.images else False)


def _instructions(requests: list[Request], processor) -> list[str] | None:
    """The Q-Former instructions of every image in reading order, when any request sets them."""
    if all(r.qformer_text is None for r in requests):
        return None
    out = []
    for r in requests:
        if r.qformer_text is not None:
            if len(r.qformer_text) != len(r.images):
                raise ValueError(f"qformer_text has {len(r.qformer_text)} entries for {len(r.images)} images")
            out.extend(r.qformer_text)
        else:
            out.extend([processor.qformer_instruction(r.prompt)] * len(r.images))
    return out
