"""Frozen vision-tower features, computed once per image and reused across steps and epochs.

With the vision tower frozen (every recipe but `full` with `vision_model` unfrozen) and free of
dropout, an image's patch features are the same every time it is seen, and fine-tuning sees each
image many times: several epochs, several questions per image (easy-vqa has ~10 rows an image,
VQAv2 ~5). The vision tower is a large share of a step (BLIP-2's ViT-g is most of it), so the
trainer asks this cache first and runs the tower only on images it has not seen.

Entries live in CPU memory up to `max_bytes` (`vision_cache_gb`); once full, further images are
computed as usual, so memory stays bounded on datasets of any size. With `vision_cache_dir` the
features are also written to disk, where a later run on the same images with the same vision
tower (stage 2 after stage 1, a resumed run) reads them instead of running the tower again. Features are computed under
the same autocast as the model's forward, so a cached step computes what an uncached one would.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)
DROPOUT_KEYS = ("attention_dropout", "attention_probs_dropout_prob", "hidden_dropout_prob", "dropout", "drop_path_rate")


class VisionFeatureCache:
    """`key -> vision features` of one image, bounded by a byte budget."""

    def __init__(self, max_bytes: int, folder: str | os.PathLike | None = None, tower_id: str = ""):
        """`folder`: also keep the features on disk, for later runs with the same vision tower
        (`tower_id` names it: a folder written for another tower is not read)."""
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._store: dict[str, torch.Tensor] = {}
        self._full_logged = False
        self.folder = Path(folder) / hashlib.sha256(tower_id.encode()).hexdigest()[:16] if folder else None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self._store)

    def features(self, model, pixel_values: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        """Vision features for the images of a batch (`pixel_values` rows named by `keys`).

        `model` is the bare model (`VisionLanguageModel` or the stage-1 `ImageTextModel`). Each row
        comes from memory, else from the folder on disk, else from the tower, which runs (without
        gradients) once for all the rows found in neither; what it computes is kept in both.
        """
        if len(keys) != pixel_values.shape[0]:
            raise ValueError(f"{len(keys)} image keys for {pixel_values.shape[0]} images")
        found = [self._store.get(key) if key in self._store else self._from_disk(key) for key in keys]
        missing: dict[str, int] = {}  # key -> its first row; an image twice in a batch runs once
        for i, (key, feature) in enumerate(zip(keys, found)):
            if feature is None and key not in missing:
                missing[key] = i
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if not missing:
            return torch.stack([f.to(pixel_values.device, non_blocking=True) for f in found])
        with torch.no_grad():
            fresh = dict(zip(missing, model.get_vision_features(pixel_values[list(missing.values())])))
        for key, feature in fresh.items():
            self._put(key, feature)
        device = next(iter(fresh.values())).device
        return torch.stack([fresh[k] if f is None else f.to(device, non_blocking=True) for k, f in zip(keys, found)])

    def _path(self, key: str) -> Path:
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"

    def _from_disk(self, key: str) -> torch.Tensor | None:
        if self.folder is None or not self._path(key).is_file():
            return None
        feature = load_file(self._path(key))["features"]
        self._put(key, feature, write=False)
        return feature

    def _put(self, key: str, feature: torch.Tensor, write: bool = True) -> None:
        if write and self.folder is not None:  # written whole, then renamed: never half a file
            tmp = self._path(key).with_suffix(f".{os.getpid()}.tmp")
            save_file({"features": feature.detach().to("cpu").contiguous()}, tmp)
            os.replace(tmp, self._path(key))
        size = feature.numel() * feature.element_size()
        if self.bytes + size > self.max_bytes:
            if not self._full_logged:
                logger.info("vision feature cache full at %d images (%.1f GB); the rest are computed each time",
                            len(self._store), self.bytes / 1e9)
                self._full_logged = True
            return
        self._store[key] = feature.detach().to("cpu", copy=True)
        self.bytes += size


def tower_fingerprint(vision_model: torch.nn.Module, image_processor=None, precision: str = "") -> str:
    """A digest of the vision tower's weights (and dtype), the image processor's settings (size,
    normalisation) and the autocast precision: features on disk are for this combination only."""
    h = hashlib.blake2b(digest_size=16)
    h.update(precision.encode())
    if image_processor is not None:
        h.update(image_processor.to_json_string().encode())
    for name, param in vision_model.state_dict().items():
        h.update(name.encode())
        h.update(param.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_blocker(model, vision_trainable: bool, sharded: bool) -> str | None:
    """Why features of `model`'s vision tower cannot be cached, or None when they can."""
    if vision_trainable:
        return "the vision tower trains"
    if sharded:
        return "FSDP/DeepSpeed shard the vision tower"
    vision = model.vision_model
    for key in DROPOUT_KEYS:  # some towers call dropout as a function, so read the config too
        if (getattr(vision.config, key, 0) or 0) > 0:
            return f"the vision tower has dropout ({key}={getattr(vision.config, key)})"
    stochastic = [name for name, m in vision.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    if stochastic:
        return f"the vision tower has dropout ({stochastic[0]})"
    return None
