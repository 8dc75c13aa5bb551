"""The OpenAI-compatible API: `POST /v1/chat/completions`, `GET /v1/models`, on the shared engine.

Any OpenAI client talks to it (`openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...)`).
Messages carry text and `image_url` parts (`data:` URLs with base64 images; remote URLs only with
`--allow-remote-images`), placed in the prompt where the user put them. The API is stateless like
OpenAI's: clients resend the conversation, and images seen before are found in the engine's
feature cache by content, so a follow-up costs no vision-tower pass. Errors use OpenAI's JSON shape
and status codes; bad input is a 4xx and the server keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from vlm.engine import EngineBusy, EngineFailed, GenerationSettings, InferenceEngine, OutOfMemory
from vlm.engine import Request as EngineRequest
from vlm.errors import VLMError
from vlm.images import load_image_bytes

from .conversation import Turn, render_prompt
from .openai_schema import ApiError, ChatCompletionRequest, parse_request
from .uploads import MAX_UPLOAD_BYTES, MAX_UPLOAD_PIXELS

MAX_IMAGES_PER_REQUEST = 16
REMOTE_TIMEOUT_S = 10.0


@dataclass
class ApiSettings:
    """What the API serves and what it accepts."""

    model_name: str
    api_key: str | None = None
    allow_remote_images: bool = False
    max_body_bytes: int = 64 * 1024 * 1024
    max_image_bytes: int = MAX_UPLOAD_BYTES
    max_images: int = MAX_IMAGES_PER_REQUEST
    max_pixels: int = MAX_UPLOAD_PIXELS


def create_api(engine: InferenceEngine, settings: ApiSettings) -> FastAPI:
    """The `/v1` application (mount it at `/v1`)."""
    app = FastAPI(title="vlm OpenAI-compatible API", openapi_url=None, docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if not _key_ok(request, settings.api_key):
            return _bad_key()
        return await call_next(request)

    @app.get("/models")
    async def models():
        return {"object": "list", "data": [_model_card(settings.model_name, created)]}

    @app.get("/models/{name:path}")
    async def model(name: str):
        if name != settings.model_name:
            raise ApiError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return _model_card(name, created)

    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        body = parse_request(_json(await _read_body(request, settings.max_body_bytes)))
        if body.model != settings.model_name:
            raise ApiError(404, f"the model {body.model!r} does not exist (this server has {settings.model_name!r})",
                           param="model", code="model_not_found")
        engine_request = await run_in_threadpool(build_request, engine, body, settings)
        try:
            stream = engine.submit(engine_request)
        except EngineBusy as e:
            raise ApiError(503, str(e), code="server_busy", kind="server_error", headers={"Retry-After": "1"}) from None
        except EngineFailed as e:
            raise ApiError(500, str(e), kind="server_error") from None
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_events(stream, reply_id, settings.model_name, include_usage),
                                     media_type="text/event-stream")
        completion = await run_in_threadpool(stream.result)
        if completion.error is not None:
            raise _generation_error(completion.error)
        body = {
            "id": reply_id, "object": "chat.completion", "created": int(time.time()), "model": settings.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                         "finish_reason": _finish(completion.finish_reason)}],
            "usage": _usage(completion),
        }
        if completion.warning:  # not in OpenAI's schema: clients that do not know it ignore it
            body["warning"] = completion.warning
        return body

    return app


def metrics_text(engine) -> str:
    """The engine's counters in Prometheus' text format (GET /metrics)."""
    stats = engine.stats
    cache = engine.feature_cache
    values = {
        "vlm_requests_total": stats["requests"],
        "vlm_completion_tokens_total": stats["completion_tokens"],
        "vlm_decode_steps_total": stats["decode_steps"],
        "vlm_vision_encodes_total": engine.encoder.vision_encodes,
        "vlm_feature_cache_hits_total": cache.hits,
        "vlm_feature_cache_bytes": cache.nbytes,
        "vlm_running_requests": engine.running,
        "vlm_waiting_requests": engine.waiting,
        "vlm_peak_batch_size": stats["peak_batch"],
        "vlm_out_of_memory_total": stats["out_of_memory"],
    }
    return "".join(f"{name} {value}\n" for name, value in values.items())


def make_app(engine, api_settings, with_api: bool = True):
    """The root FastAPI app: `/v1` (the API) and `/metrics`; `vlm chat` mounts its page at `/`."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/metrics")
    async def metrics(request: Request):
        if not _key_ok(request, api_settings.api_key):
            return _bad_key()
        return PlainTextResponse(metrics_text(engine))

    if with_api:
        app.mount("/v1", create_api(engine, api_settings))
    return app


def _key_ok(request: Request, api_key: str | None) -> bool:
    given = request.headers.get("authorization", "")
    return api_key is None or hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())


def _bad_key() -> JSONResponse:
    error = ApiError(401, "missing or incorrect API key (send Authorization: Bearer KEY)", code="invalid_api_key")
    return JSONResponse(error.body(), status_code=401)


# -- request -> engine request ---------------------------------------------------------------------
def build_request(engine: InferenceEngine, body: ChatCompletionRequest, settings: ApiSettings) -> EngineRequest:
    """The engine request for a chat-completions body (prompt rendered as the chat page renders it)."""
    turns, system = messages_to_turns(body, settings)
    processor = engine.processor
    try:
        prompt = render_prompt(processor, turns, system)
    except VLMError as e:
        raise ApiError(400, str(e), param="messages") from None
    images = [image for turn in turns for image in turn.images]
    length = processor(text=prompt, images_per_text=[len(images)])["input_ids"].shape[1]
    room = engine.context_length - length
    if room < 1:
        raise ApiError(400, f"the messages need {length} tokens (images included); this model reads at most "
                            f"{engine.context_length}", param="messages", code="context_length_exceeded")
    wanted = body.max_completion_tokens or body.max_tokens or room
    try:
        generation = GenerationSettings(max_new_tokens=min(wanted, room), temperature=body.temperature,
                                        top_p=body.top_p, seed=body.seed, stop=body.stop_strings())
    except VLMError as e:
        raise ApiError(400, str(e)) from None
    return EngineRequest(prompt, images, generation)


def messages_to_turns(body: ChatCompletionRequest, settings: ApiSettings) -> tuple[list[Turn], str | None]:
    """OpenAI messages -> chat turns (images decoded, in the order sent) and the system prompt."""
    turns: list[Turn] = []
    system: list[str] = []
    count = 0
    for m, message in enumerate(body.messages):
        where = f"messages[{m}]"
        parts = [message.content] if isinstance(message.content, str) else list(message.content or [])
        if message.role in ("system", "developer"):
            system.extend(_texts(parts, where, allow_images=False))
        elif message.role == "assistant":
            if not turns:
                turns.append(Turn())  # an assistant message first: an empty user turn before it
            turns[-1].reply = (turns[-1].reply or "") + "\n".join(_texts(parts, where, allow_images=False))
        else:
            if not turns or turns[-1].reply is not None:
                turns.append(Turn())
            for p, part in enumerate(parts):
                if isinstance(part, str) or part.type == "text":
                    turns[-1].parts.append({"type": "text", "text": part if isinstance(part, str) else part.text})
                    continue
                count += 1
                if count > settings.max_images:
                    raise ApiError(400, f"more than {settings.max_images} images in one request", param=where)
                turns[-1].images.append(open_image(part.image_url.url, f"{where}.content[{p}]", settings))
                turns[-1].parts.append({"type": "image"})
    if not turns or turns[-1].reply is not None or not turns[-1].parts:
        raise ApiError(400, "the last message must be a user message with text or images", param="messages")
    return turns, "\n".join(system) or None


def _texts(parts: list, where: str, allow_images: bool) -> list[str]:
    out = []
    for p, part in enumerate(parts):
        if isinstance(part, str):
            out.append(part)
        elif part.type == "text":
            out.append(part.text)
        elif not allow_images:
            raise ApiError(400, f"{where}.content[{p}]: only user messages may hold images",
                           param=f"{where}.content[{p}]")
    return out


def open_image(url: str, where: str, settings: ApiSettings):
    """Decode an `image_url` (a `data:` URL, or http(s) when remote images are allowed)."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise ApiError(400, f"{where}: expected a data URL like data:image/png;base64,...", param=where)
        if len(payload) * 3 // 4 > settings.max_image_bytes:
            raise ApiError(400, f"{where}: image over the {settings.max_image_bytes // 2**20} MB limit", param=where)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: the data URL is not valid base64", param=where) from None
    elif url.startswith(("http://", "https://")):
        if not settings.allow_remote_images:
            raise ApiError(400, f"{where}: remote image URLs are disabled on this server; send the image as a "
                                "data: URL (or start it with --allow-remote-images)", param=where)
        data = fetch_remote(url, where, settings.max_image_bytes)
    else:
        raise ApiError(400, f"{where}: unsupported image URL (use a data: URL)", param=where)
    try:
        return load_image_bytes(data, where, settings.max_pixels)
    except VLMError as e:
        raise ApiError(400, str(e), param=where) from None


def fetch_remote(url: str, where: str, max_bytes: int) -> bytes:
    """GET `url` within the time and size limits."""
    import httpx

    try:
        with httpx.stream("GET", url, timeout=REMOTE_TIMEOUT_S, follow_redirects=True) as response:
            response.raise_for_status()
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > max_bytes:
                    raise ApiError(400, f"{where}: image over the {max_bytes // 2**20} MB limit", param=where)
            return bytes(data)
    except httpx.HTTPError as e:
        raise ApiError(400, f"{where}: cannot fetch the image ({e})", param=where) from None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is over the {limit // 2**20} MB limit", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over the {limit // 2**20} MB limit", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _json(data: bytes):
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None


# -- responses -------------------------------------------------------------------------------------
def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "vlm"}


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


def _generation_error(error: BaseException) -> ApiError:
    """A failed reply as an API error: out of memory and a failed engine are the server's fault."""
    if isinstance(error, OutOfMemory):
        return ApiError(503, str(error), code="out_of_memory", kind="server_error", headers={"Retry-After": "5"})
    if isinstance(error, EngineFailed):
        return ApiError(500, str(error), kind="server_error")
    return ApiError(400, str(error))


async def _events(stream, reply_id: str, model: str, include_usage: bool):
    """Server-sent `chat.completion.chunk` events, ending with `data: [DONE]`."""
    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {"id": reply_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for piece in iterate_in_threadpool(iter(stream)):
            yield chunk({"content": piece})
        completion = stream.completion
        warning = {"warning": completion.warning} if completion.warning else {}
        yield chunk({}, _finish(completion.finish_reason), **warning)
        if include_usage:
            body = json.loads(chunk({})[len("data: "):])
            body["choices"], body["usage"] = [], _usage(completion)
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
    except (VLMError, EngineFailed) as e:  # the reply failed after the stream began
        yield f"data: {json.dumps(_generation_error(e).body())}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        stream.cancel()  # a client that went away ends this reply only
