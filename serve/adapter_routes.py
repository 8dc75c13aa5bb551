"""Several fine-tunes behind one API: which model a request names, and adding or removing them.

`vlm serve --model BASE --adapter NAME=PATH ...` serves the base under its own name and each LoRA
output of `vlm train` under NAME (`GET /v1/models` lists them all); a request's `model` picks one.
`POST /v1/load_lora_adapter {"lora_name", "lora_path"}` and `POST /v1/unload_lora_adapter
{"lora_name"}` (vLLM's names and bodies) add and remove fine-tunes while serving, requests in flight
included; they name files on the server, so they need the server's `--api-key`.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from vlm.engine import InferenceEngine, ModelNotFound
from vlm.errors import VLMError

from .body import json_body
from .openai_schema import ApiError


def served_models(engine: InferenceEngine, default: str) -> list[str]:
    """Every model name requests may use: the served model's own, then the fine-tunes."""
    return [default, *engine.models()]


def engine_model(engine: InferenceEngine, default: str, name: str) -> str | None:
    """The engine's name for API model `name` (None: its own model), or a 404 naming it."""
    if name == default:
        return None
    if name not in engine.models():
        raise ApiError(404, f"the model {name!r} does not exist (this server has "
                            f"{', '.join(repr(n) for n in served_models(engine, default))})",
                       param="model", code="model_not_found")
    return name


def add_adapter_routes(app: FastAPI, engine: InferenceEngine, settings) -> None:
    """`/load_lora_adapter` and `/unload_lora_adapter` on the `/v1` app."""

    async def fields(request: Request, *names: str) -> list[str]:
        if settings.api_key is None:
            raise ApiError(403, "loading and unloading adapters needs the server's --api-key", code="forbidden")
        data = await json_body(request, settings.max_body_bytes, settings.body_timeout_s)
        values = [data.get(name) if isinstance(data, dict) else None for name in names]
        for name, value in zip(names, values):
            if not isinstance(value, str) or not value.strip():
                raise ApiError(400, f"{name}: a non-empty string is required", param=name)
        return values

    @app.post("/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        name, path = await fields(request, "lora_name", "lora_path")
        if name in served_models(engine, settings.model_name):
            raise ApiError(400, f"lora_name: the model {name!r} is already served", param="lora_name")
        try:
            await run_in_threadpool(engine.add_adapter, name, path)
        except VLMError as e:
            raise ApiError(400, str(e), param="lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        (name,) = await fields(request, "lora_name")
        if name == settings.model_name:
            raise ApiError(400, f"lora_name: {name!r} is the served model itself, not an adapter", param="lora_name")
        try:
            await run_in_threadpool(engine.remove_adapter, name)
        except ModelNotFound:
            raise ApiError(404, f"the model {name!r} does not exist", param="lora_name",
                           code="model_not_found") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
