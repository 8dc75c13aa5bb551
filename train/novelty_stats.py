"""At the end of `vlm train`: statistics of the training images' vision features (`vlm.novelty`),
written to the output folder so the trained model warns about images unlike them."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from vlm.data import image_key, open_example_image
from vlm.novelty import NoveltyDetector, pooled

logger = logging.getLogger(__name__)


def training_images(examples: Sequence, limit: int, seed: int = 0) -> list[tuple[object, object]]:
    """Up to `limit` distinct (example, image) pairs, a fixed random sample of the training images."""
    seen, pairs = set(), []
    for example in examples:
        for image in example.images:
            key = image_key(image)
            if key not in seen:
                seen.add(key)
                pairs.append((example, image))
    random.Random(seed).shuffle(pairs)
    return pairs[:limit]


@torch.no_grad()
def record_novelty(model, processor, examples: Sequence, out: str | Path, limit: int, cache=None,
                   batch_size: int = 32, answer: str | None = None) -> Path | None:
    """Fit a `NoveltyDetector` on the vision features of up to `limit` training images (from the
    run's vision cache where it has them) and save it into `out`, with the `answer` the model gives
    about an image unlike them (None: it answers, warned); None without images."""
    pairs = training_images(examples, limit)
    if len(pairs) < 2:
        return None
    features = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        pixels = processor.image_processor([open_example_image(e, image) for e, image in chunk],
                                           return_tensors="pt")["pixel_values"]
        keys = [image_key(image) for _, image in chunk]
        vision = cache.features(model, pixels, keys) if cache is not None else model.get_vision_features(pixels)
        features.append(pooled(vision).cpu())
    detector = NoveltyDetector.fit(torch.cat(features))
    detector.answer = answer
    path = detector.save(out)
    logger.info("novelty statistics of %d training images: threshold %.1f -> %s", detector.images,
                detector.threshold, path)
    return path
