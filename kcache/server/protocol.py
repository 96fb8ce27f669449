"""OpenAI's request and response shapes (the subset kcache serves), as pydantic models.

Unknown request fields are ignored, as OpenAI-compatible servers do (clients and frameworks send many); fields that
would change the answer in a way kcache cannot honour (n > 1, logprobs, penalties, tools, ...) are refused.
"""
from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_serializer, model_validator

# Accepted only at these values (None = absent): anything else changes the answer in a way kcache does not support.
NEUTRAL = {
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "logprobs": (None, False, 0),
    "top_logprobs": (None, 0), "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "tools": (None, []), "response_format": (None, {"type": "text"}),
}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    model: str
    temperature: float = Field(1.0, ge=0.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0, description="extension (as in vLLM): 0 disables top-k filtering")
    seed: int | None = Field(None, ge=-2**63, lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    kcache: dict[str, Any] | None = Field(None, description="per-request KCache settings; must equal the server's")
    # unsupported unless neutral (see NEUTRAL)
    n: int | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data):
        """As in OpenAI's API, an explicit null means the field's default (clients send `"temperature": null`)."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator(*NEUTRAL, check_fields=False)
    @classmethod
    def _refuse_unsupported(cls, value, info):
        if value not in NEUTRAL[info.field_name]:
            more = "; send separate requests" if info.field_name in ("n", "best_of") else ""
            raise ValueError(f"not supported by kcache (got {value!r}){more}")
        return value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v):
        if v is not None and "" in ([v] if isinstance(v, str) else v):
            raise ValueError("stop strings must not be empty")
        return v

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int = Field(16, ge=1)  # OpenAI's default for completions
    echo: Any = None
    suffix: Any = None
    best_of: Any = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("send one prompt per request (batches of prompts are not supported)")
            return v[0]
        return v


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v):
        """OpenAI's content parts, flattened to text; images and audio are not supported."""
        if not isinstance(v, list):
            return v or ""
        if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in v):
            raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
        return "".join(part["text"] for part in v)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="default: the rest of the context")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name; wins over max_tokens")
    tools: Any = None
    response_format: Any = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (not prefilled again)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class CompletionResponse(BaseModel):
    """A whole completion, or (object "text_completion" too, as OpenAI does) one streamed chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _absent_not_null(self, handler):
        """As OpenAI streams it: {"content": "..."}, not {"role": null, "content": "..."}."""
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "kcache"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
