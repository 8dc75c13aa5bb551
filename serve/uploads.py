"""Checking chat uploads: size, decoded pixels, decompression bombs, non-images, truncation.

Every refusal is a `VLMError` whose message names the file by its uploaded name (never the
server's temp path) and says what to do, so the chat can show it as-is.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from vlm.errors import VLMError
from vlm.images import load_image

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
REMOTE_TIMEOUT_S = 10.0  # total seconds a remote image URL may take (vlm serve --allow-remote-images)
MAX_UPLOAD_PIXELS = 40_000_000  # e.g. 8000x5000; a bomb decodes to far more
MAX_IMAGES_PER_MESSAGE = 8


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
    real = os.path.realpath(path)  # resolves symlinks and "..", so neither can leave the folder
    inside = False
    for folder in upload_dirs:
        root = os.path.realpath(folder)
        try:
            inside = inside or os.path.commonpath([real, root]) == root
        except ValueError:  # different drives (Windows)
            continue
    not_upload = f"{name}: that file is not an upload to this chat; please attach the image again"
    if not inside:
        raise VLMError(not_upload)
    try:
        info = os.stat(real)
    except OSError:
        raise VLMError(f"{name}: the upload is gone from the server; please send it again") from None
    if not stat.S_ISREG(info.st_mode):
        raise VLMError(not_upload)
    if info.st_size > max_bytes:
        raise VLMError(f"{name}: {info.st_size / 2**20:.1f} MB is over the {max_bytes / 2**20:.0f} MB upload limit")


def check_count(paths: list[str], limit: int = MAX_IMAGES_PER_MESSAGE) -> None:
    """Refuse a message with more images than the model can sensibly take at once."""
    if len(paths) > limit:
        raise VLMError(f"{len(paths)} images in one message; send at most {limit} at a time")
