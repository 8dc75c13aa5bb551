"""The OpenAI-compatible API: `POST /v1/chat/completions`, `GET /v1/models`, on the shared engine.

Any OpenAI client talks to it (`openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...)`).
Messages carry text and `image_url` parts (`data:` URLs with base64 images; remote URLs only with
`--allow-remote-images`), placed in the prompt where the user put them. The API is stateless like
OpenAI's: clients resend the conversation, and images seen before are found in the engine's
feature cache by content, so a follow-up costs no vision-tower pass. Errors use OpenAI's JSON shape
and status codes; bad input is a 4xx and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlm.engine import (
    Completion,
    EngineBusy,
    EngineFailed,
    GenerationSettings,
    InferenceEngine,
    ModelNotFound,
    OutOfMemory,
    Stream,
)
from vlm.engine import Request as EngineRequest
from vlm.context import fit_context
from vlm.errors import VLMError

from .body import BODY_TIMEOUT_S, json_body
from .metrics import CONTENT_TYPE_LATEST, ServeMetrics, StatusCounter, not_ready
from .adapter_routes import add_adapter_routes, engine_model, served_models
from .conversation import Turn, prompt_tokens, render_prompt
from .embeddings_api import add_embedding_routes
from .image_urls import image_errors, open_image
from .openai_schema import ApiError, ChatCompletionRequest, parse_request
from .uploads import REMOTE_TIMEOUT_S, ImageLimits, RequestImages

log = logging.getLogger(__name__)
MAX_IMAGES_PER_REQUEST = 16
DISCONNECT_POLL_S = 0.5  # how often a waiting reply checks that its client is still there
# Server-sent events must reach the client as they are made: no caching, no proxy buffering.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ApiSettings:
    """What the API serves and what it accepts."""

    model_name: str
    api_key: str | None = None
    allow_remote_images: bool = False
    allow_private_image_hosts: bool = False
    remote_timeout_s: float = REMOTE_TIMEOUT_S
    max_body_bytes: int = 64 * 1024 * 1024
    body_timeout_s: float = BODY_TIMEOUT_S
    max_images: int = MAX_IMAGES_PER_REQUEST
    images: ImageLimits = field(default_factory=ImageLimits)  # shared with the chat page in `vlm chat`


def create_api(engine: InferenceEngine, settings: ApiSettings, metrics: ServeMetrics | None = None) -> FastAPI:
    """The `/v1` application (mount it at `/v1`); `metrics` counts its answers by status code."""
    app = FastAPI(title="vlm OpenAI-compatible API", openapi_url=None, docs_url=None, redoc_url=None,
                  dependencies=[Depends(require_key(settings.api_key))])
    if metrics is not None:  # outside the error handlers: it sees the status they answer with
        app.add_middleware(StatusCounter, metrics=metrics)
    created = int(time.time())
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(Exception, _server_error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        """Unknown routes and methods, in OpenAI's error shape like every other error."""
        message = f"{request.method} {request.url.path}: {error.detail}"
        return JSONResponse(ApiError(error.status_code, message).body(), status_code=error.status_code,
                            headers=error.headers)

    @app.get("/models")
    async def models():
        return {"object": "list",
                "data": [_model_card(name, created) for name in served_models(engine, settings.model_name)]}

    @app.get("/models/{name:path}")
    async def model(name: str):
        engine_model(engine, settings.model_name, name)  # 404 unless served
        return _model_card(name, created)

    add_adapter_routes(app, engine, settings)
    add_embedding_routes(app, engine, settings)

    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        data = await json_body(request, settings.max_body_bytes, settings.body_timeout_s)
        body = await run_in_threadpool(parse_request, data)
        model = engine_model(engine, settings.model_name, body.model)
        if not engine.generates:
            raise ApiError(400, f"{body.model!r} has no language model: this server answers /v1/embeddings only",
                           param="model")
        engine_request = await run_in_threadpool(build_request, engine, body, settings, model)
        stream = _submit(engine, engine_request)
        reply = Reply(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_events(stream, request, reply, include_usage), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        try:
            async for _ in pieces(stream, request):
                pass
        finally:
            stream.cancel()  # a client that went away (or a server shutting down) ends this reply only
        if not stream.done:
            raise ApiError(499, "the client closed the connection")  # nobody reads this
        completion = stream.completion
        failure = _failure(completion)
        if failure is not None:
            raise failure
        out = reply.body("chat.completion", choices=[{
            "index": 0, "message": {"role": "assistant", "content": completion.text},
            "finish_reason": _finish(completion.finish_reason)}], usage=_usage(completion))
        if completion.warning:  # not in OpenAI's schema: clients that do not know it ignore it
            out["warning"] = completion.warning
        return out

    return app


def make_app(engine, api_settings, with_api: bool = True):
    """The root FastAPI app: the probes `/health` and `/ready` (open: load balancers call them), and
    with `with_api` `/v1` (the API) and `/metrics` (Prometheus), behind the API key when one is set;
    `vlm chat` mounts its page at `/`."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(Exception, _server_error)

    @app.get("/health")
    async def health():
        """Alive: answered while the process serves HTTP."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """Ready for a request: model loaded, engine running, room in its queue; else a 503."""
        reason = not_ready(engine)
        if reason is not None:
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        return {"status": "ready"}

    if not with_api:  # metrics name adapters and traffic: they are exposed as the API would be
        return app
    monitoring = ServeMetrics(engine)

    @app.get("/metrics", dependencies=[Depends(require_key(api_settings.api_key))])
    async def metrics():
        return Response(monitoring.text(), media_type=CONTENT_TYPE_LATEST)

    app.mount("/v1", create_api(engine, api_settings, monitoring))
    return app


def require_key(api_key: str | None):
    """A FastAPI dependency: a 401 in OpenAI's shape unless the request carries `Bearer api_key`
    (everything passes when `api_key` is None)."""

    async def check_key(request: Request) -> None:
        given = request.headers.get("authorization", "")
        if api_key is not None and not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or incorrect API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    return check_key


async def _api_error(_, error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _server_error(request: Request, error: Exception) -> JSONResponse:
    """A bug while handling one request: a 500 in OpenAI's shape (the traceback goes to the log)."""
    log.error("%s %s failed", request.method, request.url.path, exc_info=error)
    return JSONResponse(ApiError(500, "the server failed on this request; see its log", kind="server_error").body(),
                        status_code=500)


def _submit(engine: InferenceEngine, request: EngineRequest) -> Stream:
    try:
        return engine.submit(request)
    except EngineBusy as e:
        raise ApiError(503, str(e), code="server_busy", kind="server_error", headers={"Retry-After": "1"}) from None
    except EngineFailed as e:
        raise ApiError(500, str(e), kind="server_error") from None
    except ModelNotFound as e:  # unloaded since the request was checked
        raise ApiError(404, str(e), param="model", code="model_not_found") from None
    except VLMError as e:  # the engine is closed: the server is shutting down
        raise ApiError(503, str(e), code="server_shutting_down", kind="server_error") from None


# -- request -> engine request ---------------------------------------------------------------------
def build_request(engine: InferenceEngine, body: ChatCompletionRequest, settings: ApiSettings,
                  model: str | None = None) -> EngineRequest:
    """The engine request for a chat-completions body, for the engine's `model` (None: its own): the
    prompt rendered as the chat page renders it, in the format that model was trained with."""
    processor = engine.processor_for(model)
    turns, system = messages_to_turns(body, settings, RequestImages(settings.images, engine.encoder.pixels),
                                      processor.image_token)
    try:
        prompt = render_prompt(processor, turns, system)
    except VLMError as e:
        raise ApiError(400, str(e), param="messages") from None
    images = [image for turn in turns for image in turn.images]
    try:  # the one context rule (vlm.context); the API refuses rather than drop turns, as OpenAI's does
        fitted = fit_context(turns, lambda kept: prompt_tokens(processor, kept, system), engine.context_length,
                             body.max_completion_tokens or body.max_tokens, drop_oldest=False)
    except VLMError as e:
        raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
    try:
        generation = GenerationSettings(max_new_tokens=fitted.max_new_tokens, temperature=body.temperature,
                                        top_p=body.top_p, seed=body.seed, stop=body.stop_strings())
    except VLMError as e:
        raise ApiError(400, str(e)) from None
    return EngineRequest(prompt, images, generation, origin="api", model=model)


def messages_to_turns(body: ChatCompletionRequest, settings: ApiSettings, images: RequestImages,
                      marker: str = "<image>") -> tuple[list[Turn], str | None]:
    """OpenAI messages -> chat turns (images decoded into pixel values by `images`, in the order
    sent) and the system prompt. No text may hold the processor's image `marker`: images are
    `image_url` parts."""
    turns: list[Turn] = []
    system: list[str] = []
    count = 0
    for m, message in enumerate(body.messages):
        where = f"messages[{m}]"
        parts = [message.content] if isinstance(message.content, str) else list(message.content or [])
        _check_no_marker(parts, where, marker)
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
                open_image(part.image_url.url, f"{where}.content[{p}]", settings, images)
                turns[-1].images.append(None)  # its pixel values once every image is in
                turns[-1].parts.append({"type": "image"})
    if not turns or turns[-1].reply is not None or not turns[-1].parts:
        raise ApiError(400, "the last message must be a user message with text or images", param="messages")
    pixels = iter(image_errors(images.decode_all, "messages"))
    for turn in turns:
        turn.images = [next(pixels) for _ in turn.images]
    return turns, "\n".join(system) or None


def _check_no_marker(parts: list, where: str, marker: str) -> None:
    for part in parts:
        text = part if isinstance(part, str) else part.text if part.type == "text" else ""
        if marker in text:
            raise ApiError(400, f"{where}: the text may not contain {marker}; send images as image_url parts",
                           param=where)


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


# -- responses -------------------------------------------------------------------------------------
@dataclass
class Reply:
    """What every response body of one completion shares: its id, creation time and model."""

    id: str
    created: int
    model: str

    def body(self, kind: str, **fields) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, **fields}

    def chunk(self, delta: dict, finish: str | None = None, **extra) -> str:
        """One `chat.completion.chunk` server-sent event."""
        return _event(self.body("chat.completion.chunk",
                                choices=[{"index": 0, "delta": delta, "finish_reason": finish}], **extra))


def _event(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "vlm"}


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


def _generation_error(error: BaseException) -> ApiError:
    """A failed reply as an API error: only `VLMError` is the client's bad input (400); out of
    memory, a failed engine and a bug are the server's fault."""
    if isinstance(error, OutOfMemory):
        return ApiError(503, str(error), code="out_of_memory", kind="server_error", headers={"Retry-After": "5"})
    if isinstance(error, VLMError):
        return ApiError(400, str(error))
    return ApiError(500, str(error), kind="server_error")


def _failure(completion: Completion) -> ApiError | None:
    """The API error of a reply that did not complete, else None."""
    if completion.error is not None:
        return _generation_error(completion.error)
    if completion.finish_reason == "cancelled":  # not by its client (that one left): the engine closed
        return ApiError(503, "the server is shutting down; try again", code="server_shutting_down",
                        kind="server_error")
    return None


async def pieces(stream: Stream, request: Request) -> AsyncIterator[str]:
    """The stream's text pieces as the engine makes them, awaited on the event loop (no worker
    thread waits for them). Ends early, with the stream cancelled and `stream.done` false, when
    the client disconnects."""
    loop = asyncio.get_running_loop()
    update = asyncio.Event()

    def wake() -> None:  # runs in the engine's thread
        try:
            loop.call_soon_threadsafe(update.set)
        except RuntimeError:  # the event loop has closed (the server stopped): nobody waits any more
            pass

    stream.on_update(wake)
    next_check = loop.time() + DISCONNECT_POLL_S
    while True:
        update.clear()  # before `take`: a piece pushed after it sets the event again
        for piece in stream.take():
            yield piece
        if stream.done:
            return
        if loop.time() >= next_check:
            if await request.is_disconnected():
                stream.cancel()
                return
            next_check = loop.time() + DISCONNECT_POLL_S
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(update.wait(), timeout=next_check - loop.time())


async def _events(stream: Stream, request: Request, reply: Reply, include_usage: bool):
    """Server-sent `chat.completion.chunk` events, ending with `data: [DONE]`."""
    try:
        yield reply.chunk({"role": "assistant", "content": ""})
        async for piece in pieces(stream, request):
            yield reply.chunk({"content": piece})
        if not stream.done:  # the client went away
            return
        completion = stream.completion
        failure = _failure(completion)
        if failure is not None:  # the reply failed after the stream began
            yield _event(failure.body())
            yield "data: [DONE]\n\n"
            return
        warning = {"warning": completion.warning} if completion.warning else {}
        yield reply.chunk({}, _finish(completion.finish_reason), **warning)
        if include_usage:
            yield _event(reply.body("chat.completion.chunk", choices=[], usage=_usage(completion)))
        yield "data: [DONE]\n\n"
    finally:
        stream.cancel()  # a client that went away ends this reply only
