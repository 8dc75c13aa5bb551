"""Is an image like the ones a model was trained on? A warning for images far outside them.

`vlm train` records statistics of its training images' vision features in the output folder
(`novelty.safetensors`): the mean and a (shrunk) covariance of the features pooled over patches,
and a threshold at a high percentile of held-out training images' Mahalanobis distances. Loading
the folder attaches the detector to the model (`model.novelty`); the inference engine then marks
every request with an image beyond the threshold, and `vlm chat`, the API and `vlm caption` pass
the warning on. A model fine-tuned on X-rays thus says so when someone uploads a holiday photo.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .files import NOVELTY_FILE

WARNING = "this image is unlike the images this model was trained on; the answer may be unreliable"
PERCENTILE = 99.5  # of the held-out training images' distances: the threshold
MARGIN = 1.1  # times that percentile: a test image from the training distribution rarely exceeds it
SHRINKAGE = 0.1  # covariance shrunk towards its mean variance: stable with fewer images than dimensions


def pooled(vision_features: torch.Tensor) -> torch.Tensor:
    """`(images, patches, width)` -> `(images, width)`: the mean over patches, in fp32."""
    return vision_features.float().mean(dim=1)


class NoveltyDetector:
    """Mahalanobis distance of an image's pooled vision features to the training images'.

    `answer`: what the model says instead of answering about an image beyond the threshold (a
    model that knows one narrow kind of picture, such as the demo's coloured shapes, says so rather
    than invent); None (the default for fine-tunes): it answers, and the reply carries the warning."""

    def __init__(self, mean: torch.Tensor, precision: torch.Tensor, threshold: float, images: int,
                 answer: str | None = None):
        self.mean, self.precision, self.threshold, self.images = mean, precision, float(threshold), int(images)
        self.answer = answer or None

    @classmethod
    def fit(cls, features: torch.Tensor) -> NoveltyDetector:
        """From the pooled features `(images, width)` of training images (in random order).

        The mean and covariance come from the first 80%, the threshold from the distances of the
        other 20%: images the statistics have not seen, as a user's images are (their own
        distances would be smaller, and the threshold too tight, with few images per dimension).
        """
        features = features.double()
        held = features.shape[0] // 5 if features.shape[0] >= 50 else 0  # too few: the fitted ones
        fitted = features[: features.shape[0] - held]
        mean = fitted.mean(dim=0)
        centred = fitted - mean
        cov = centred.t() @ centred / max(1, fitted.shape[0] - 1)
        scale = torch.trace(cov) / cov.shape[0]
        cov = (1 - SHRINKAGE) * cov + SHRINKAGE * scale * torch.eye(cov.shape[0], dtype=cov.dtype)
        precision = torch.linalg.inv(cov)
        detector = cls(mean.float(), precision.float(), 0.0, features.shape[0])
        distances = detector.distances((features[-held:] if held else fitted).float())
        detector.threshold = float(torch.quantile(distances, PERCENTILE / 100)) * MARGIN
        return detector

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of each row of pooled `features` `(images, width)`."""
        centred = features.float().to(self.mean.device) - self.mean
        return torch.einsum("id,de,ie->i", centred, self.precision, centred).clamp_min(0).sqrt()

    def is_novel(self, vision_features: torch.Tensor) -> list[bool]:
        """For each image's vision features `(images, patches, width)`: beyond the threshold?"""
        return (self.distances(pooled(vision_features)) > self.threshold).tolist()

    def to(self, device) -> NoveltyDetector:
        return NoveltyDetector(self.mean.to(device), self.precision.to(device), self.threshold, self.images,
                               self.answer)

    # -- files ---------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / NOVELTY_FILE
        save_file({"mean": self.mean.contiguous(), "precision": self.precision.contiguous()}, path,
                  metadata={"threshold": repr(self.threshold), "images": str(self.images),
                            "percentile": repr(PERCENTILE), "margin": repr(MARGIN), "answer": self.answer or ""})
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> NoveltyDetector | None:
        """The detector saved in `folder`, or None when it has none."""
        path = Path(folder) / NOVELTY_FILE
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
        tensors = load_file(path)
        return cls(tensors["mean"], tensors["precision"], float(metadata["threshold"]), int(metadata["images"]),
                   metadata.get("answer") or None)
