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
from .adapters import AdapterRouting
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
    novel: bool = False  # an image unlike the model's training images (`vlm.novelty`): a warning
    last_novel: bool = False  # the last image sent is one: a model with a novelty answer gives it


class Encoder:
    """Turns `Request`s into `Encoded` inputs for one `(model, processor)`."""

    def __init__(self, model, processor, cache: FeatureCache, routing: AdapterRouting | None = None):
        self.model, self.processor, self.cache = model, processor, cache
        self.routing = routing or AdapterRouting(model)  # whose bridge and statistics a request's images get
        self.reads_instruction = bool(getattr(model.config, "qformer_reads_instruction", False))
        self.preprocess = make_preprocess(processor.image_processor)
        self.vision_encodes = 0  # images that ran through the vision tower
        # Per (model name, image key): whether the image is unlike that model's training images
        # (`vlm.novelty`; bounded by MAX_NOVELTY_ENTRIES).
        self._novel: OrderedDict[tuple, bool] = OrderedDict()

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def pixels(self, image: ImageInput) -> torch.Tensor:
        """`(3, H, W)` pixel values of an image (a tensor is taken as already preprocessed)."""
        return image if isinstance(image, torch.Tensor) else self.preprocess(image)

    def novel_answer(self, model_name: str | None = None) -> str | None:
        """What `model_name` says instead of answering about an image unlike its training images
        (None: it answers, warned)."""
        return getattr(self.routing.novelty(model_name), "answer", None)

    @torch.inference_mode()
    def cached_features(self, images: list[ImageInput], model_name: str | None = None
                        ) -> tuple[list[torch.Tensor], list[bool]]:
        """Per image: the cached tensor (soft prompt through `model_name`'s bridge, or vision
        features for instruction-reading Q-Formers), and whether it is unlike that model's
        training images; the images not cached yet run through the vision tower together."""
        pixels = [self.pixels(image) for image in images]
        digests = [pixel_digest(p) for p in pixels]
        # A fine-tune's soft prompts come from its own bridge; the tower's features are everyone's.
        keys = digests if self.reads_instruction or model_name is None else [f"{model_name}:{d}" for d in digests]
        found = {k: v for k in dict.fromkeys(keys) if (v := self.cache.get(k)) is not None}
        missing = [k for k in dict.fromkeys(keys) if k not in found]
        unjudged = {d for d in digests if (model_name, d) not in self._novel}
        if missing or unjudged:
            todo = list(dict.fromkeys([keys.index(k) for k in missing] + [digests.index(d) for d in unjudged]))
            vision = self.model.get_vision_features(torch.stack([pixels[i] for i in todo]))
            self.vision_encodes += len(todo)
            self._remember_novelty(model_name, [digests[i] for i in todo], vision)
            if missing:
                rows = [todo.index(keys.index(k)) for k in missing]
                values = vision[rows] if self.reads_instruction else self._soft_prompts(vision[rows], model_name)
                for key, value in zip(missing, values):
                    # A copy: a view would keep the whole batch's tensor alive, which the cache's
                    # byte count would not see.
                    found[key] = value.unsqueeze(0).clone()
                    self.cache.put(key, found[key])
        return [found[k] for k in keys], [self._novel.get((model_name, d), False) for d in digests]

    def _soft_prompts(self, vision: torch.Tensor, model_name: str | None, **qformer_inputs) -> torch.Tensor:
        with self.routing.bridge(model_name):
            return self.model.get_image_features(vision_features=vision, **qformer_inputs)

    def _remember_novelty(self, model_name: str | None, digests: list[str], vision: torch.Tensor) -> None:
        detector = self.routing.novelty(model_name)
        flags = detector.is_novel(vision) if detector is not None else [False] * len(digests)
        for digest, novel in zip(digests, flags):
            self._novel[(model_name, digest)] = novel
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

    def encode_batch(self, requests: list[Request]) -> tuple[dict, torch.Tensor | None, list[tuple[bool, bool]]]:
        """Left-padded `input_ids` / `attention_mask` for `requests`, the soft prompts of all
        their images in reading order (None when there are none), and per request whether one of
        its images, and whether its last image, is unlike the training images."""
        for request in requests:
            check_markers(request, self.processor.image_token)
        encoding = self.processor(
            text=[r.prompt for r in requests],
            images_per_text=[len(r.images) for r in requests],
            qformer_text=_instructions(requests, self.processor),
        )
        owners = [r.model for r in requests for _ in r.images]  # each image's model, in reading order
        if not owners:
            return dict(encoding), None, [(False, False)] * len(requests)
        images = [image for r in requests for image in r.images]
        features: list = [None] * len(images)
        novel: list = [False] * len(images)
        for model_name in dict.fromkeys(owners):  # each model's images through its own bridge
            rows = [i for i, owner in enumerate(owners) if owner == model_name]
            cached, flags = self.cached_features([images[i] for i in rows], model_name)
            if self.reads_instruction:
                vision = torch.cat(cached, dim=0)
                ids, mask = (encoding[k][rows].to(vision.device) for k in ("qformer_input_ids", "qformer_attention_mask"))
                cached = self._soft_prompts(vision, model_name, qformer_input_ids=ids, qformer_attention_mask=mask)
            for i, row in enumerate(rows):
                features[row], novel[row] = cached[i].reshape(1, *cached[i].shape[-2:]), flags[i]
        encoding = {k: v for k, v in encoding.items() if not k.startswith("qformer_")}
        return encoding, torch.cat(features, dim=0), _per_request(novel, requests)

    def encode(self, request: Request) -> Encoded:
        """One request, unpadded; `VLMError` for an empty prompt (no token to start from)."""
        encoding, features, ((novel, last_novel),) = self.encode_batch([request])
        input_ids = encoding["input_ids"][0].tolist()
        if not input_ids:
            raise prompt_problem(0, 1)
        return Encoded(input_ids, features, novel=novel, last_novel=last_novel)


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


def _per_request(flags: list[bool], requests: list[Request]) -> list[tuple[bool, bool]]:
    """Per-image flags (in reading order) -> per request, whether any of its images has one, and
    whether its last image does (the one a question is most likely about: an earlier photo in a
    conversation must not silence the answers about the pictures that follow it)."""
    out, start = [], 0
    for r in requests:
        mine = flags[start:start + len(r.images)]
        out.append((any(mine), bool(mine) and mine[-1]))
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
