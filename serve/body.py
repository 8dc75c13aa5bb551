"""Reading and parsing API request bodies with bounded time, memory and work.

A body must be JSON (`Content-Type: application/json`): a web page may post `text/plain` to any
address without a CORS preflight, so accepting it would let any site a user visits drive an
unauthenticated server on their machine. The body must arrive within a deadline (a client that
sends half a body and stalls would hold a connection forever), stay within the size limit, and
hold at most `MAX_JSON_CONTAINERS` objects and arrays nested at most `MAX_JSON_DEPTH` deep: a
60 MB body of tiny parts otherwise becomes gigabytes of Python objects. Parsing runs off the event
loop. Every refusal is an `ApiError` in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from .openai_schema import ApiError

MAX_JSON_CONTAINERS = 20_000  # objects + arrays in one body: a long conversation has a few thousand
MAX_JSON_DEPTH = 32  # a chat request nests about 6 deep
BODY_TIMEOUT_S = 30.0


def require_json(request: Request) -> None:
    """415 unless the request says its body is JSON."""
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, f"the body must be JSON sent as Content-Type: application/json (got {kind or 'none'})",
                       code="unsupported_media_type")


async def read_body(request: Request, limit: int, timeout_s: float = BODY_TIMEOUT_S) -> bytes:
    """The whole body, or 413 past `limit` bytes, or 408 when it has not arrived within `timeout_s`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0

    async def receive_all() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)

    try:
        await asyncio.wait_for(receive_all(), timeout_s)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s", code="request_timeout") from None
    return b"".join(chunks)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over the {limit / 2**20:g} MB limit (--max-request-mb)",
                    code="request_too_large")


async def json_body(request: Request, limit: int, timeout_s: float = BODY_TIMEOUT_S) -> Any:
    """The request's JSON body: `require_json`, then `read_body` within `limit` bytes and
    `timeout_s`, then `parse_json`."""
    require_json(request)
    return await parse_json(await read_body(request, limit, timeout_s))


async def parse_json(data: bytes) -> Any:
    """The body's JSON value, parsed in a worker thread after a cheap bound on its size in objects."""
    containers = data.count(b"{") + data.count(b"[")  # an upper bound: brackets inside strings count too
    if containers > MAX_JSON_CONTAINERS:
        raise ApiError(413, f"the request holds over {MAX_JSON_CONTAINERS:,} JSON objects and arrays",
                       code="request_too_large")
    return await run_in_threadpool(_parse, data)


def _parse(data: bytes) -> Any:
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise ApiError(400, f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels") from None
    check_json(value)
    return value


def check_json(value: Any) -> None:
    """400 for JSON nested deeper than `MAX_JSON_DEPTH`, or holding a string that is not valid Unicode
    (a lone surrogate such as "\\ud800", which JSON allows but no tokenizer can encode)."""
    stack = [(value, 1, "")]
    while stack:
        item, depth, where = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, f"{where or 'the body'}: a string holds a lone UTF-16 surrogate",
                               param=where or None) from None
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels")
        pairs = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in pairs:
            if isinstance(key, str):
                stack.append((key, depth, where))
            stack.append((child, depth + 1, f"{where}[{key}]" if isinstance(key, int) else _join(where, key)))


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
