"""Images that clients send (chat uploads, API data URLs): size, decoded pixels, memory, bad files.

Every refusal is a `VLMError` whose message names the file by its uploaded name (never the
server's temp path) and says what to do, so the chat can show it as-is.

Memory: a small file can decode to a huge image (a 130 KB PNG of 6300x6300 pixels is 119 MB
decoded). So each image is decoded only within a server-wide budget of pixels being decoded at
once (`PixelBudget`; the others wait), turned into the model's pixel values at once and its
full-size copy dropped, and one request's images together may not exceed `max_request_pixels`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from vlm.errors import VLMError
from vlm.images import file_image_size, image_size, load_image, load_image_bytes

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
REMOTE_TIMEOUT_S = 10.0  # total seconds a remote image URL may take (vlm serve --allow-remote-images)
MAX_UPLOAD_PIXELS = 40_000_000  # e.g. 8000x5000; a bomb decodes to far more
MAX_IMAGES_PER_MESSAGE = 8
MAX_REQUEST_PIXELS = 200_000_000  # one request's images together (five of the largest allowed)
MAX_DECODING_PIXELS = 100_000_000  # decoded at once over the whole server (~300 MB of RGB)
DECODE_WAIT_S = 30.0
LARGE_IMAGE_PIXELS = 4_000_000  # after decoding one this large, freed heap memory goes back to the OS


class ImageBudgetExceeded(VLMError):
    """A request whose images decode to more pixels than one request may have (HTTP 413)."""


class ServerBusyDecoding(VLMError):
    """No room in the server's decode budget within the wait (HTTP 503: try again)."""


class PixelBudget:
    """Pixels being decoded at once across the whole server; a decode waits until it fits."""

    def __init__(self, limit: int = MAX_DECODING_PIXELS, wait_s: float = DECODE_WAIT_S):
        self.limit, self.wait_s, self.used = int(limit), float(wait_s), 0
        self._room = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Hold `pixels` of the budget while the block runs (an image larger than the whole
        budget runs alone); `ServerBusyDecoding` after `wait_s` without room."""
        pixels = min(int(pixels), self.limit)
        with self._room:
            if not self._room.wait_for(lambda: self.used + pixels <= self.limit, timeout=self.wait_s):
                raise ServerBusyDecoding(f"the server is busy decoding other images; try again shortly "
                                         f"(--max-decoding-pixels {self.limit:,})")
            self.used += pixels
        try:
            yield
        finally:
            with self._room:
                self.used -= pixels
                self._room.notify_all()


@dataclass
class ImageLimits:
    """What one image and one request may cost, and the server's shared decode budget."""

    max_bytes: int = MAX_UPLOAD_BYTES
    max_pixels: int = MAX_UPLOAD_PIXELS
    max_request_pixels: int = MAX_REQUEST_PIXELS
    budget: PixelBudget = field(default_factory=PixelBudget)


class RequestImages:
    """The images of one request: each is `add`ed first (its header read, the request's pixel total
    checked, nothing decoded), then `decode_all` decodes them one at a time within the server's
    budget, each turned into pixel values by `to_pixels` at once (its full-size copy dropped)."""

    def __init__(self, limits: ImageLimits, to_pixels: Callable[[Image.Image], object]):
        self.limits, self.to_pixels, self.pixels = limits, to_pixels, 0
        self._pending: list[tuple[int, Callable[[], Image.Image]]] = []

    def add_bytes(self, data: bytes, name: str) -> None:
        """An image sent as bytes; `VLMError` naming `name` when it is refused."""
        if len(data) > self.limits.max_bytes:
            raise VLMError(f"{name}: {len(data) / 2**20:.1f} MB is over the {self.limits.max_bytes / 2**20:g} MB "
                           "image limit")
        width, height = image_size(data, name)
        self._add(width * height, lambda: load_image_bytes(data, name, self.limits.max_pixels), name)

    def add_file(self, path: str, name: str) -> None:
        """An image file (already checked to be a regular file within the size limit)."""
        width, height = file_image_size(path)
        self._add(width * height, lambda: load_image(path, self.limits.max_pixels), name)

    def _add(self, pixels: int, decode: Callable[[], Image.Image], name: str) -> None:
        if pixels > self.limits.max_pixels:
            decode()  # raises the per-image error naming the size, without decoding
        self.pixels += pixels
        if self.pixels > self.limits.max_request_pixels:
            raise ImageBudgetExceeded(
                f"{name}: this request's images decode to over {self.limits.max_request_pixels:,} pixels in all "
                "(--max-request-pixels); send fewer or smaller images")
        self._pending.append((pixels, decode))

    def __len__(self) -> int:
        """Images added and not decoded yet."""
        return len(self._pending)

    def decode_all(self) -> list:
        """The pixel values of every added image, in the order added."""
        out = []
        for pixels, decode in self._pending:
            with self.limits.budget.hold(pixels):
                out.append(self.to_pixels(decode()))
            if pixels >= LARGE_IMAGE_PIXELS:
                release_memory()
        self._pending = []
        return out


def release_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps freed blocks under 32 MB, e.g. a large
    image's rows, in its arenas; resident memory would stay at a burst's peak). No-op elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


def display_name(path: str | os.PathLike) -> str:
    """The name the user uploaded the file under (its basename)."""
    return Path(path).name or "upload"


def open_upload(
    path: str | os.PathLike, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_UPLOAD_PIXELS
) -> Image.Image:
    """Open one uploaded file as an RGB image, or raise `VLMError` with a message for the user."""
    name = display_name(path)
    try:
        size = os.path.getsize(path)
    except OSError:
        raise VLMError(f"{name}: the upload is gone from the server; please send it again") from None
    if size > max_bytes:
        raise VLMError(f"{name}: {size / 2**20:.1f} MB is over the {max_bytes / 2**20:.0f} MB upload limit")
    try:
        return load_image(path, max_pixels=max_pixels)
    except VLMError as e:
        # load_image names the full server path; users should see only their file's name.
        reason = str(e).split(": ", 1)[-1] if str(e).startswith(str(path)) else str(e)
        raise VLMError(f"{name}: {reason}") from None


def check_upload_file(
    path: str | os.PathLike, upload_dirs: Iterable[str | os.PathLike], max_bytes: int = MAX_UPLOAD_BYTES
) -> None:
    """Refuse anything but a regular file inside one of `upload_dirs`, within `max_bytes`.

    Run before the file is read at all: a chat history can come from the client, so a path in
    it may name `/dev/zero` (reading it never ends) or any image the server can read.
    """
    name = display_name(path)
    info = upload_stat(path, upload_dirs)
    if info is None:
        raise VLMError(f"{name}: that file is not an upload to this chat; please attach the image again")
    if info is False:
        raise VLMError(f"{name}: the upload is gone from the server; please send it again")
    if info.st_size > max_bytes:
        raise VLMError(f"{name}: {info.st_size / 2**20:.1f} MB is over the {max_bytes / 2**20:.0f} MB upload limit")


def upload_stat(path: str | os.PathLike, upload_dirs: Iterable[str | os.PathLike]) -> os.stat_result | None | bool:
    """The file's stat when `path` is a regular file inside one of `upload_dirs` (symlinks and ".."
    resolved first, so neither can leave the folder); None when it is not (outside, a device, a
    FIFO, a folder); False when it does not exist (any more). Reads nothing from the file."""
    real = os.path.realpath(path)
    inside = False
    for folder in upload_dirs:
        root = os.path.realpath(folder)
        try:
            inside = inside or os.path.commonpath([real, root]) == root
        except ValueError:  # different drives (Windows)
            continue
    if not inside:
        return None
    try:
        info = os.stat(real)
    except OSError:
        return False
    return info if stat.S_ISREG(info.st_mode) else None


def check_count(paths: list[str], limit: int = MAX_IMAGES_PER_MESSAGE) -> None:
    """Refuse a message with more images than the model can sensibly take at once."""
    if len(paths) > limit:
        raise VLMError(f"{len(paths)} images in one message; send at most {limit} at a time")
