"""Image -> pixel tensor for one image, fast where that is provably exact.

Without torchvision, transformers' BLIP/CLIP-style image processors take a PIL + NumPy path
that converts each image several times (PIL -> float64 array -> PIL -> float32 ...), about
10 ms per image. For processors that only resize to a fixed height x width, rescale and
normalize, the same numbers come from one PIL resize and a 256-entry lookup table per channel:
rescale and normalize act on each uint8 value independently, so the table holds exactly the
float32 results the processor computes. `make_preprocess` checks the fast path against the
processor on a test image and uses it only when every value is identical.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image


def _fast_params(ip) -> dict | None:
    """The settings the fast path needs, or None when this processor does something else."""
    size = getattr(ip, "size", None)
    get = size.get if isinstance(size, dict) else (lambda k, d=None: getattr(size, k, d))
    height, width = get("height"), get("width")
    if not (getattr(ip, "do_resize", False) and height and width):
        return None
    if any(getattr(ip, flag, False) for flag in ("do_center_crop", "do_pad", "do_reduce_labels")):
        return None
    if getattr(ip, "do_rescale", False) is False or getattr(ip, "do_normalize", False) is False:
        return None
    return {
        "size": (int(width), int(height)),
        "resample": int(getattr(ip, "resample", Image.BICUBIC)),
        "scale": float(ip.rescale_factor),
        "mean": np.asarray(ip.image_mean, dtype=np.float32),
        "std": np.asarray(ip.image_std, dtype=np.float32),
    }


def _lookup_table(scale: float, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(256, 3) float32: the processor's rescale (float64 then float32) and normalize, per value."""
    values = (np.arange(256, dtype=np.float64) * scale).astype(np.float32)
    return ((values[:, None] - mean[None, :]) / std[None, :]).astype(np.float32)


class FastPreprocess:
    """Resize + lookup-table rescale/normalize; call with an RGB PIL image, get (3, H, W)."""

    def __init__(self, params: dict):
        self.size, self.resample = params["size"], params["resample"]
        self.table = _lookup_table(params["scale"], params["mean"], params["std"])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(image.convert("RGB").resize(self.size, resample=self.resample))
        channels = [self.table[array[..., c], c] for c in range(3)]
        return torch.from_numpy(np.stack(channels))


class ProcessorPreprocess:
    """The image processor itself, one image at a time (so one bad image fails alone)."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.image_processor([image], return_tensors="pt")["pixel_values"][0]


def make_preprocess(image_processor) -> Callable[[Image.Image], torch.Tensor]:
    """The fastest exact per-image preprocessing for `image_processor`."""
    slow = ProcessorPreprocess(image_processor)
    params = _fast_params(image_processor)
    if params is None:
        return slow
    fast = FastPreprocess(params)
    rng = np.random.default_rng(0)
    probe = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    try:
        expected = slow(probe)
        if expected.shape == fast(probe).shape and torch.equal(expected, fast(probe)):
            return fast
    except (ValueError, TypeError, KeyError, AttributeError):  # an unusual processor: its own path is safe
        pass
    return slow
