"""Request models of the OpenAI-compatible routes (pydantic, strict types) and the OpenAI-style error.

Every field is checked here (types, ranges, NaN / infinity refused); limits that depend on the server's
configuration (``n``, images per request, context length) are checked by the app. Unknown extra fields are
ignored, as OpenAI-compatible servers commonly do; known OpenAI features that torchvlm does not implement
(tools, logprobs, penalties other than 0, JSON response formats, ``echo``, ``suffix``, ``best_of``) are
refused with a 400 instead of being silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

__all__ = [
    "ApiError", "ChatCompletionRequest", "CompletionRequest", "ChatMessage", "TextPart", "ImagePart",
    "ImageURL", "StreamOptions", "error_body",
]

_MAX_SEED = 2**63 - 1


class ApiError(Exception):
    """An error answered to the client as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        """The JSON body."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


NonEmptyStr = Annotated[str, Field(min_length=1, max_length=4096)]
Stop = Union[NonEmptyStr, Annotated[list[NonEmptyStr], Field(max_length=16)], None]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]


class TextPart(_Model):
    """``{"type": "text", "text": ...}``."""

    type: Literal["text"]
    text: str


class ImageURL(_Model):
    """``{"url": ..., "detail": ...}`` (``detail`` is accepted and ignored)."""

    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Model):
    """``{"type": "image_url", "image_url": {"url": ...}}``."""

    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(_Model):
    """One chat message; ``developer`` is read as ``system``."""

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, Annotated[list[ContentPart], Field(max_length=256)], None] = None
    name: str | None = None


class StreamOptions(_Model):
    """``stream_options``: ``include_usage`` adds a last chunk with the usage (and ``usage: null`` on others)."""

    include_usage: bool = False


class _Sampling(_Model):
    model: str = Field(min_length=1, max_length=512)
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=-1, le=1_000_000)] | None = None  # extension (vLLM): -1 / 0 = off
    min_p: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None  # extension
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0, allow_inf_nan=False)] | None = None  # extension
    seed: Annotated[int, Field(ge=0, le=_MAX_SEED)] | None = None
    stop: Stop = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension (vLLM): generate max_tokens tokens
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logprobs: Any = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None

    # refusals as field validators, so the error's ``param`` names the field
    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalties(cls, v):
        if v:
            raise ValueError("not supported (only 0)")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v not in (None, False, 0):
            raise ValueError("logprobs are not supported")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported")
        return v

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, v, info: ValidationInfo):
        if v is not None and not info.data.get("stream"):
            raise ValueError("only allowed with stream: true")
        return v


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=256)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    top_logprobs: Any = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v):
        if v:
            raise ValueError("tools are not supported")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, v):
        if v not in (None, "none", "auto"):
            raise ValueError("tool_choice is not supported")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, v):
        if v not in (None, 0):
            raise ValueError("top_logprobs is not supported")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_format_only(cls, v):
        if v is not None and v.get("type") != "text":
            raise ValueError("only {'type': 'text'} is supported")
        return v


class CompletionRequest(_Sampling):
    """``POST /v1/completions`` (text prompts only)."""

    prompt: Union[str, Annotated[list[str], Field(min_length=1, max_length=1)]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=1)] | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise ValueError("suffix is not supported")
        return v
