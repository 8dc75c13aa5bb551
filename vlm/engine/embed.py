"""Image and text vectors in BLIP-2's image-text (ITC) space, for search indexes (`/v1/embeddings`).

A text is one unit vector (its [CLS] output through `text_projection`); an image is one unit vector
per query token (`num_query_tokens` of them, through `vision_projection`). Their agreement is
BLIP-2's ITC, exactly as `vlm score` computes it: the best dot product over the image's query
vectors, `max_q <image[q], text>`. An index keeps every query vector of an image (and takes the
best hit per image), or searches `(images x queries)` rows and folds them by image.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from ..errors import VLMError
from .adapters import AdapterRouting
from .encode import Encoder

MAX_TEXT_TOKENS = 512  # the Q-Former's position limit; `vlm score` truncates texts the same way


class Embedder:
    """ITC-space vectors from the engine's model (`available` only with BLIP-2's stage-1 heads);
    runs under the engine's model lock, between decode steps."""

    def __init__(self, model, processor, encoder: Encoder, routing: AdapterRouting, lock: threading.RLock):
        self.model, self.processor, self.encoder, self.routing, self.lock = model, processor, encoder, routing, lock

    @property
    def available(self) -> bool:
        config = getattr(self.model, "config", None)
        return bool(getattr(config, "has_image_text_heads", False)) and self.processor.qformer_tokenizer is not None

    def check(self) -> None:
        """`VLMError` unless this model has the image-text heads embeddings come from."""
        if not self.available:
            raise VLMError("this model has no image-text (ITC) heads to embed with: serve a Blip2ForImageTextRetrieval "
                           "checkpoint or a `vlm train --recipe stage1` output (or a model trained from one)")

    @torch.inference_mode()
    def texts(self, texts: list[str]) -> tuple[torch.Tensor, int]:
        """`(texts, dim)` unit vectors, and the tokens they took."""
        self.check()
        tokens = self.processor.qformer_tokenizer(texts, padding="longest", truncation=True,
                                                  max_length=MAX_TEXT_TOKENS, return_tensors="pt")
        with self._model():
            device = next(self.model.parameters()).device
            vectors = self.model.text_embeddings(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        return vectors.float().cpu(), int(tokens["attention_mask"].sum())

    @torch.inference_mode()
    def images(self, images: list, model_name: str | None = None) -> torch.Tensor:
        """`(images, queries, dim)` unit vectors (through `model_name`'s bridge, when a fine-tune)."""
        self.check()
        pixels = torch.stack([self.encoder.pixels(image) for image in images])
        with self._model(), self.routing.bridge(model_name):
            vectors = self.model.image_embeddings(pixel_values=pixels)
        return vectors.float().cpu()

    @contextlib.contextmanager
    def _model(self):
        with self.lock:
            if self.model is None:
                raise VLMError("the inference engine is closed")
            yield
