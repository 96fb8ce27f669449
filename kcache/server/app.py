"""The FastAPI app: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus /health and /metrics."""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response, StreamingResponse

from kcache.config import KCacheConfig, SamplingParams
from kcache.engine.async_engine import AsyncEngine, EngineError
from kcache.engine.llm_engine import RequestError
from kcache.server import protocol as p
from kcache.server.errors import APIError, error_response, from_engine, from_validation
from kcache.server.metrics import Metrics
from kcache.server.middleware import Guard
from kcache.server.streaming import ChatFormat, CompletionFormat, sse

log = logging.getLogger("kcache")

DEFAULT_MAX_BODY_BYTES = 8 << 20


class ClientDisconnected(Exception):
    """The client hung up before its response started."""


class Server:
    """What the routes share. Only read-only engine attributes are used here: engine calls stay on its thread.
    The tokenizer is shared with that thread; both only read it (nothing sets truncation or padding on it)."""

    def __init__(self, engine: AsyncEngine, model_name: str):
        self.engine, self.model_name = engine, model_name
        core = engine.engine
        self.tokenizer, self.max_model_len, self.cfg = core.tokenizer, core.max_model_len, core.cfg
        self.metrics = Metrics(engine)

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist: this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if not isinstance(prompt, str):
            return prompt
        return refused_is_400(lambda: self.tokenizer.encode(prompt, add_special_tokens=True), "prompt")

    def chat_ids(self, messages: list[p.ChatMessage]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
        try:
            ids = refused_is_400(lambda: self.tokenizer.apply_chat_template(
                [m.model_dump() for m in messages], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"],
                "messages")
        except TemplateError as e:  # the template's own checks, e.g. on the order of roles
            raise APIError(400, f"the chat template refused these messages: {e}", param="messages") from None
        return list(ids)

    def sampling_params(self, req: p.CompletionRequest | p.ChatCompletionRequest, n_prompt: int,
                        max_tokens: int | None, prompt_param: str) -> SamplingParams:
        room = self.max_model_len - n_prompt
        if room <= 0:
            raise APIError(400, f"the prompt has {n_prompt} tokens; the model's context is {self.max_model_len} tokens",
                           param=prompt_param, code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"the model's context is {self.max_model_len} tokens: the prompt's {n_prompt} tokens "
                           f"leave room for at most {room} new tokens, not max_tokens={max_tokens}",
                           param="max_tokens", code="context_length_exceeded")
        return SamplingParams(max_tokens=max_tokens or room, temperature=req.temperature, top_k=req.top_k,
                              top_p=req.top_p, seed=req.seed, stop=req.stop_strings, ignore_eos=req.ignore_eos,
                              stream_text=bool(req.stream))

    def check_kcache(self, requested: dict | None) -> None:
        """The engine decodes every request of a batch under one KCache configuration, the server's, so a request
        may restate it but not change it."""
        if not requested:
            return
        if self.cfg.cache != "kcache":
            raise APIError(400, "this server runs the full KV cache (--cache full): per-request kcache settings do not "
                           "apply", param="kcache")
        ours = self.cfg.kcache
        try:
            wanted = KCacheConfig(**{**ours.model_dump(), **requested})
        except ValidationError as e:
            raise APIError(400, "; ".join(f"kcache.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()),
                           param="kcache") from None
        if wanted != ours:
            asked = ", ".join(f"{k}={v!r}" for k, v in wanted.model_dump().items() if v != getattr(ours, k))
            server = ", ".join(f"{k}={v!r}" for k, v in ours.model_dump().items())
            raise APIError(400, f"kcache settings are per server, not per request: the engine runs every request of a "
                           f"batch under one KCache configuration ({server}); this request asks for {asked}. Start a "
                           "server with those settings instead.", param="kcache", code="kcache_config_mismatch")

    async def respond(self, request: Request, req, ids: list[int], max_tokens: int | None, fmt, prompt_param: str):
        params = self.sampling_params(req, len(ids), max_tokens, prompt_param)
        self.check_kcache(req.kcache)
        outputs = self.engine.generate(ids, params, fmt.id)
        try:
            if req.stream:
                # the first output comes before the headers, so that a refused request still gets its 4xx status
                first = await until_disconnected(request, anext(outputs))
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                body = sse(fmt, first, outputs, include_usage, self.metrics)
                return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            final = await until_disconnected(request, last(outputs))
        except (RequestError, EngineError) as e:
            raise from_engine(e) from None
        self.metrics.finished(final)
        return fmt.response(final)

    def reject(self, request: Request, e: APIError) -> Response:
        if request.url.path.startswith("/v1/"):
            self.metrics.outcome("rejected" if e.status < 500 else "error")
        return error_response(e)


def refused_is_400(tokenize, param: str):
    """Run a tokenizer call on the request's text: whatever the tokenizer refuses (e.g. a lone UTF-16 surrogate,
    which is valid JSON) is the request's fault, a 400, not a crash."""
    try:
        return tokenize()
    except TemplateError:
        raise
    except Exception as e:  # tokenizers raise TypeError, ValueError, or their own types
        raise APIError(400, f"the tokenizer cannot encode this {param}: {type(e).__name__}: {e}", param=param) from None


async def last(outputs):
    async for out in outputs:
        pass
    return out


async def until_disconnected(request: Request, awaitable):
    """Awaits `awaitable` unless the client hangs up first; then cancels it, which aborts its request. (Once a stream
    has started, Starlette watches for the hang-up itself and cancels the stream.)"""
    work = asyncio.ensure_future(awaitable)
    hangup = asyncio.ensure_future(_hangup(request))
    try:
        done, _ = await asyncio.wait((work, hangup), return_when=asyncio.FIRST_COMPLETED)
    finally:
        hangup.cancel()
        work.cancel()  # a no-op once done
    if work not in done:
        raise ClientDisconnected()
    return work.result()


async def _hangup(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def build_app(engine: AsyncEngine, model_name: str, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    server = Server(engine, model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await engine.shutdown()  # uvicorn has drained the connections (see cli.py): nothing is left to wait for

    app = FastAPI(title="kcache", summary="OpenAI-compatible server for KCache", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes,
                       on_reject=lambda: server.metrics.outcome("rejected"))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return server.reject(request, exc if isinstance(exc, APIError) else APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return server.reject(request, from_validation(exc))

    @app.exception_handler(ClientDisconnected)
    async def gone(request: Request, exc: ClientDisconnected):
        server.metrics.outcome("abort")
        return Response(status_code=499)  # nobody reads it

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        log.exception("unhandled error in %s", request.url.path)
        return server.reject(request, APIError(500, f"internal error: {type(exc).__name__}: {exc}"))

    @app.get("/health")
    async def health():
        if not engine.alive:
            raise APIError(503, "the engine is not running")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> p.ModelList:
        return p.ModelList(data=[p.ModelCard(id=model_name, max_model_len=server.max_model_len)])

    @app.post("/v1/completions")
    async def completions(req: p.CompletionRequest, request: Request):
        server.check_model(req.model)
        ids = server.prompt_ids(req.prompt)
        return await server.respond(request, req, ids, req.max_tokens, CompletionFormat(model_name), "prompt")

    @app.post("/v1/chat/completions")
    async def chat_completions(req: p.ChatCompletionRequest, request: Request):
        server.check_model(req.model)
        ids = server.chat_ids(req.messages)
        max_tokens = req.max_completion_tokens or req.max_tokens
        return await server.respond(request, req, ids, max_tokens, ChatFormat(model_name), "messages")

    return app
