"""The chat page's file references checked before Gradio sees them.

Gradio's event routes (`/gradio_api/queue/join`, `/gradio_api/run/...`, `/gradio_api/call/...`)
take file references (`{"path": ..., "meta": {"_type": "gradio.FileData"}}`) from the client, and
Gradio copies each file into its cache (hashing it on the event loop) and serves the copy back.
Its own check (`_check_allowed`) acts only after `Blocks.launch()`, which `vlm chat` never calls
(the page is mounted beside the API), so without this guard any visitor could name `/etc/passwd`
or `/dev/zero`. `FileRefGuard` reads the JSON body of every POST under `/gradio_api/` (except the
upload route itself, whose files Gradio writes into its upload folder) and refuses, before any
file is touched, a request naming a path that is not a regular file inside the upload folders.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from .uploads import upload_stat

log = logging.getLogger(__name__)

GRADIO_PREFIX = "/gradio_api/"
UPLOAD_ROUTE = "/gradio_api/upload"
MAX_EVENT_BODY = 8 * 2**20  # event bodies carry text and file references, never file contents


class FileRefGuard:
    """ASGI middleware: 403 for a Gradio event naming a file outside `upload_dirs` (a live list:
    folders added later count), 413 for an event body over `MAX_EVENT_BODY`."""

    def __init__(self, app, upload_dirs: list[str]):
        self.app, self.upload_dirs = app, upload_dirs

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if scope.get("method") != "POST" or not path.startswith(GRADIO_PREFIX) or path.startswith(UPLOAD_ROUTE):
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_EVENT_BODY:
                await _refuse(send, 413, "the request body is too large")
                return
        refused = self.refused_path(body)
        if refused is not None:
            log.warning("refused a Gradio event naming %r (not an upload to this chat)", refused)
            await _refuse(send, 403, "that file is not an upload to this chat; please attach the image again")
            return
        await self.app(scope, _replay(body, receive), send)

    def refused_path(self, body: bytes) -> str | None:
        """The first file path in `body` that is not a regular file inside the upload folders."""
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            return None  # not JSON: Gradio refuses it, and it names no file
        for path in file_paths(data):
            if path is not None and (not isinstance(path, str) or not upload_stat(path, self.upload_dirs)):
                return str(path)
        return None


def file_paths(data: Any) -> Iterator[Any]:
    """Every `path` of a dict in `data` (Gradio's file references, with or without their meta)."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "path" in item:
                yield item["path"]
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _replay(body: bytes, receive):
    """A `receive` that hands the already-read body over once, then waits on the real one."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _refuse(send, status: int, message: str) -> None:
    payload = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
