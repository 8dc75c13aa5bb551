"""The subset of OpenAI's chat-completions request that `vlm serve` accepts, as pydantic models,
and OpenAI's error shape.

Fields OpenAI defines that change what is generated but that we do not implement (`n` > 1, tools,
logprobs, JSON response formats, penalties) are refused with a 400 naming the field, rather than
silently ignored; bookkeeping fields (`user`, `metadata`, `store`) are accepted and ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Generation-changing fields we do not implement, and the values that mean "off".
UNSUPPORTED = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "logprobs": (None, False), "top_logprobs": (None, 0), "response_format": (None, {"type": "text"}),
    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
}


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Model):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. `name`, `refusal`

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart | ImagePart] | None = None


class StreamOptions(_Model):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # checked against UNSUPPORTED and ignored otherwise

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)


def parse_request(data: Any) -> ChatCompletionRequest:
    """The validated request, or an `ApiError` (400) naming the offending field."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        request = ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise ApiError(400, f"{_param(first['loc'])}: {first['msg']}", param=_param(first["loc"])) from None
    if request.n != 1:
        raise ApiError(400, "n: only n=1 is supported", param="n")
    if isinstance(request.stop, list) and len(request.stop) > 4:
        raise ApiError(400, "stop: at most 4 stop sequences", param="stop")
    for name, off in UNSUPPORTED.items():
        if name in (request.model_extra or {}) and request.model_extra[name] not in off:
            raise ApiError(400, f"{name}: not supported by this server", param=name)
    return request


def _param(loc: tuple) -> str:
    """A pydantic location as OpenAI writes params: messages[0].content[1].image_url."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[union[TextPart,ImagePart]]", "TextPart", "ImagePart") or "[" in str(part):
            continue  # union arm names, not fields
        else:
            out += f".{part}" if out else str(part)
    return out
