"""The subset of OpenAI's chat-completions request that `vlm serve` accepts, as pydantic models,
and OpenAI's error shape.

Fields OpenAI defines that change what is generated but that we do not implement (`n` > 1, tools,
logprobs, JSON response formats, penalties) are refused with a 400 naming the field, rather than
silently ignored; bookkeeping fields (`user`, `metadata`, `store`) are accepted and ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

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


class _NullMeansDefault(BaseModel):
    """Explicit JSON null is the default, as in OpenAI's API: its client and LiteLLM send
    `"temperature": null` and the like for parameters the caller did not set."""

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        optional = {name for name, field in cls.model_fields.items() if not field.is_required()}
        return {k: v for k, v in data.items() if v is not None or k not in optional}


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


PART_KINDS = {"text": "TextPart", "image_url": "ImagePart"}


def _part_kind(part: Any) -> str | None:
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    return PART_KINDS.get(kind) if isinstance(kind, str) else None


# A part's `type` picks its model, so an error names that model's field (or the bad type itself),
# not every model's complaint about a part it was never meant to be.
ContentPart = Annotated[
    Annotated[TextPart, Tag("TextPart")] | Annotated[ImagePart, Tag("ImagePart")],
    Discriminator(_part_kind, custom_error_type="content_part_type",
                  custom_error_message="a content part's type must be 'text' or 'image_url'"),
]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. `name`, `refusal`

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Model, _NullMeansDefault):
    include_usage: bool = False


class ChatCompletionRequest(_NullMeansDefault):
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


def validate(model: type[BaseModel], data: Any):
    """`data` (a parsed JSON body) as `model`, or an `ApiError` (400) naming the offending field."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        # A union reports every arm; the deepest error is about the arm the input was meant for
        # (a bad content part, not "content should be a string").
        worst = max(e.errors(), key=lambda error: len(error["loc"]))
        param = _param(worst["loc"]) + (".type" if worst["type"] == "content_part_type" else "")
        raise ApiError(400, f"{param}: {worst['msg']}", param=param) from None


def parse_request(data: Any) -> ChatCompletionRequest:
    """The validated request, or an `ApiError` (400) naming the offending field."""
    request = validate(ChatCompletionRequest, data)
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
