"""`POST /v1/embeddings`: text and image vectors in BLIP-2's image-text (ITC) space, for search.

Texts come as OpenAI's `input` (a string or a list of strings); images as vLLM's multimodal
embedding requests do, in `messages` whose content parts are `image_url`s (`data:` URLs). Each
text gets one unit vector; each image one unit vector per query token, concatenated (`queries`
says how many): the image-text score `vlm score` reports as `itc` is the best dot product of the
text's vector with any of the image's query vectors (see `vlm.engine.embed`). `encoding_format`
"float" or "base64" (little-endian float32, what the official `openai` client asks for).
"""

from __future__ import annotations

import base64
from typing import Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from vlm.engine import InferenceEngine
from vlm.errors import VLMError

from .adapter_routes import engine_model
from .body import json_body
from .image_urls import open_image
from .openai_schema import ApiError, Message, validate
from .uploads import RequestImages

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. `user`

    model: str
    input: str | list[str] | None = None
    messages: list[Message] | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)


def parse_embedding_request(data) -> EmbeddingRequest:
    """The validated body, or a 400 naming the field."""
    body = validate(EmbeddingRequest, data)
    if (body.input is None) == (body.messages is None):
        raise ApiError(400, "give texts as `input` or images as `messages`, one of the two", param="input")
    if body.dimensions is not None:
        raise ApiError(400, "dimensions: not supported (the vectors have the model's image-text width)",
                       param="dimensions")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if texts is not None and (not texts or len(texts) > MAX_INPUTS or any(not t.strip() for t in texts)):
        raise ApiError(400, f"input: 1 to {MAX_INPUTS} non-empty strings", param="input")
    return body


def add_embedding_routes(app: FastAPI, engine: InferenceEngine, settings) -> None:
    """`POST /embeddings` on the `/v1` app."""
    def embed(body: EmbeddingRequest, model: str | None) -> tuple[list[tuple], int]:
        """(kind, vector, queries) per input, and the text tokens used."""
        try:
            engine.embeddings.check()
        except VLMError as e:
            raise ApiError(400, str(e), param="model") from None
        if body.input is not None:
            vectors, tokens = engine.embeddings.texts([body.input] if isinstance(body.input, str) else body.input)
            return [("text", v, None) for v in vectors], tokens
        images = RequestImages(settings.images, engine.encoder.pixels)
        for m, message in enumerate(body.messages):
            for p, part in enumerate([] if isinstance(message.content, str) else message.content or []):
                if part.type == "image_url":
                    open_image(part.image_url.url, f"messages[{m}].content[{p}]", settings, images)
        if not len(images):
            raise ApiError(400, "messages: no image_url part to embed", param="messages")
        if len(images) > settings.max_images:
            raise ApiError(400, f"more than {settings.max_images} images in one request", param="messages")
        vectors = engine.embeddings.images(images.decode_all(), model)
        return [("image", v.flatten(), v.shape[0]) for v in vectors], 0

    @app.post("/embeddings")
    async def embeddings(request: Request):
        data = await json_body(request, settings.max_body_bytes, settings.body_timeout_s)
        body = parse_embedding_request(data)
        model = engine_model(engine, settings.model_name, body.model)
        rows, tokens = await run_in_threadpool(embed, body, model)
        return {"object": "list", "model": body.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "data": [_entry(i, kind, vector, queries, body.encoding_format)
                         for i, (kind, vector, queries) in enumerate(rows)]}


def _entry(index: int, kind: str, vector, queries: int | None, encoding: str) -> dict:
    values = vector.numpy().astype("<f4")
    entry = {"object": "embedding", "index": index, "kind": kind,
             "embedding": base64.b64encode(values.tobytes()).decode() if encoding == "base64" else values.tolist()}
    if queries is not None:
        entry["queries"] = queries
    return entry
