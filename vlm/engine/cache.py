"""A content-addressed cache of encoded images, bounded in bytes.

Keys are digests of what the vision tower would read (the preprocessed pixels), so the same
picture sent again (a chat follow-up, an API client resending its conversation, a second question
about one image in a caption list) is found whatever its file name or upload path. Values are
tensors on the model's device; the bound counts their bytes, least recently used first out.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch


def pixel_digest(pixel_values: torch.Tensor) -> str:
    """Digest of one image's preprocessed pixels (`(3, H, W)`): the cache key."""
    data = pixel_values.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{data.dtype}{tuple(data.shape)}".encode())
    h.update(data.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """Thread-safe LRU of `digest -> tensor`, holding at most `max_bytes` of tensor data."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: torch.Tensor) -> None:
        """Insert `value`; older entries leave until the total fits. A tensor larger than the
        whole budget is not kept."""
        size = value.numel() * value.element_size()
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
            if size > self.max_bytes:
                return
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.numel() * dropped.element_size()

    def clear(self) -> None:
        """Drop everything (after an out-of-memory, to give the memory back)."""
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
