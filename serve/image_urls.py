"""An API request's `image_url`s: `data:` URLs, or remote http(s) ones where the server allows them,
checked against the image limits (shared by chat completions and embeddings)."""

from __future__ import annotations

import base64
import binascii

from vlm.errors import VLMError

from .openai_schema import ApiError
from .remote import any_address, fetch_remote, is_public_address
from .uploads import ImageBudgetExceeded, RequestImages, ServerBusyDecoding


def open_image(url: str, where: str, settings, images: RequestImages) -> None:
    """Add an `image_url` (a `data:` URL, or http(s) when remote images are allowed) to the
    request's `images`, within the image limits (decoded later, by `images.decode_all`)."""
    limit = settings.images.max_bytes
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise ApiError(400, f"{where}: expected a data URL like data:image/png;base64,...", param=where)
        if len(payload) * 3 // 4 > limit:
            raise ApiError(400, f"{where}: image over the {limit // 2**20} MB limit", param=where)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: the data URL is not valid base64", param=where) from None
    elif url.startswith(("http://", "https://")):
        if not settings.allow_remote_images:
            raise ApiError(400, f"{where}: remote image URLs are disabled on this server; send the image as a "
                                "data: URL (or start it with --allow-remote-images)", param=where)
        allowed = any_address if settings.allow_private_image_hosts else is_public_address
        data = fetch_remote(url, where, limit, settings.remote_timeout_s, allowed)
    else:
        raise ApiError(400, f"{where}: unsupported image URL (use a data: URL)", param=where)
    image_errors(lambda: images.add_bytes(data, where), where)


def image_errors(work, where: str):
    """`work()` with the image limits' errors as API errors: 413 over the request's pixel budget,
    503 when the server's decode budget stays full, 400 for a bad image."""
    try:
        return work()
    except ImageBudgetExceeded as e:
        raise ApiError(413, str(e), param=where, code="request_too_large") from None
    except ServerBusyDecoding as e:
        raise ApiError(503, str(e), code="server_busy", kind="server_error", headers={"Retry-After": "1"}) from None
    except VLMError as e:
        raise ApiError(400, str(e), param=where) from None
