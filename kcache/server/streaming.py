"""Turning engine outputs into OpenAI responses: whole ones, or server-sent event chunks."""
from __future__ import annotations

import uuid
from typing import AsyncIterator

from pydantic import BaseModel

from kcache.engine.async_engine import EngineError
from kcache.engine.llm_engine import RequestOutput
from kcache.server import protocol as p
from kcache.server.errors import error_body, from_engine
from kcache.server.metrics import Metrics


def usage(out: RequestOutput) -> p.Usage:
    n_prompt, n_new = len(out.prompt_token_ids), len(out.token_ids)
    cached = p.PromptTokensDetails(cached_tokens=out.metrics.get("cached_prompt_tokens", 0))
    return p.Usage(prompt_tokens=n_prompt, completion_tokens=n_new, total_tokens=n_prompt + n_new,
                   prompt_tokens_details=cached)


class CompletionFormat:
    def __init__(self, model: str):
        self.id, self.model = f"cmpl-{uuid.uuid4().hex}", model

    def response(self, out: RequestOutput) -> BaseModel:
        choice = p.CompletionChoice(text=out.text, finish_reason=out.finish_reason)
        return p.CompletionResponse(id=self.id, model=self.model, choices=[choice], usage=usage(out))

    def opening(self) -> list[BaseModel]:
        return []

    def piece(self, text: str, finish_reason: str | None = None) -> list[BaseModel]:
        if not text and not finish_reason:
            return []
        return [p.CompletionResponse(id=self.id, model=self.model,
                                     choices=[p.CompletionChoice(text=text, finish_reason=finish_reason)])]

    def usage_chunk(self, out: RequestOutput) -> BaseModel:
        return p.CompletionResponse(id=self.id, model=self.model, choices=[], usage=usage(out))


class ChatFormat:
    def __init__(self, model: str):
        self.id, self.model = f"chatcmpl-{uuid.uuid4().hex}", model

    def response(self, out: RequestOutput) -> BaseModel:
        choice = p.ChatChoice(message=p.AssistantMessage(content=out.text), finish_reason=out.finish_reason)
        return p.ChatCompletionResponse(id=self.id, model=self.model, choices=[choice], usage=usage(out))

    def _chunk(self, delta: p.Delta, finish_reason: str | None = None) -> BaseModel:
        return p.ChatCompletionChunk(id=self.id, model=self.model,
                                     choices=[p.ChatChunkChoice(delta=delta, finish_reason=finish_reason)])

    def opening(self) -> list[BaseModel]:
        return [self._chunk(p.Delta(role="assistant", content=""))]

    def piece(self, text: str, finish_reason: str | None = None) -> list[BaseModel]:
        chunks = [self._chunk(p.Delta(content=text))] if text else []
        if finish_reason:  # as OpenAI does: the finish reason comes in a chunk of its own, with an empty delta
            chunks.append(self._chunk(p.Delta(), finish_reason))
        return chunks

    def usage_chunk(self, out: RequestOutput) -> BaseModel:
        return p.ChatCompletionChunk(id=self.id, model=self.model, choices=[], usage=usage(out))


def event(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


async def sse(fmt, first: RequestOutput, outputs: AsyncIterator[RequestOutput], include_usage: bool,
              metrics: Metrics) -> AsyncIterator[str]:
    """The stream after its first output, ending with `data: [DONE]`; each chunk carries the engine's new text
    (`RequestOutput.new_text`, held back while a stop string could claim it). When the client leaves, Starlette cancels the
    response; however this generator is then left (cancelled inside `anext`, or closed later), `outputs` is closed,
    which aborts the request and frees its blocks."""
    ended = False
    try:
        for chunk in fmt.opening():
            yield event(chunk)
        out = first
        while not out.finished:
            for chunk in fmt.piece(out.new_text):
                yield event(chunk)
            out = await anext(outputs)
        for chunk in fmt.piece(out.new_text, out.finish_reason):
            yield event(chunk)
        metrics.finished(out)
        ended = True
        if include_usage:
            yield event(fmt.usage_chunk(out))
    except EngineError as e:  # the headers are sent: the error travels as an event, as in OpenAI's API
        ended = True
        metrics.outcome("error")
        yield event(error_body(from_engine(e)))
    finally:
        if not ended:
            metrics.outcome("abort")
            await outputs.aclose()
    yield "data: [DONE]\n\n"
