"""Checks made before a request is parsed: the API key, and the body size (a huge body is refused unread)."""
from __future__ import annotations

import hmac
from typing import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from kcache.server.errors import APIError, error_response


class Guard:
    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int, on_reject: Callable[[], None]):
        self.app, self.max_body_bytes, self.on_reject = app, max_body_bytes, on_reject
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        error = self._check(scope["path"], headers)
        if error is not None:
            self.on_reject()
            return await error_response(error)(scope, receive, send)
        await self.app(scope, self._limited(receive), send)

    def _check(self, path: str, headers: dict[bytes, bytes]) -> APIError | None:
        # /health and /metrics stay open, as in vLLM: probes and scrapers carry no key
        if self.expected and path.startswith("/v1/"):
            # compare_digest: the time taken reveals nothing about how much of the key matched
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                return APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                                code="invalid_api_key")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            return APIError(400, "the Content-Length header is not a number")
        if int(length) > self.max_body_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body exceeds {self.max_body_bytes} bytes", code="request_too_large")

    def _limited(self, receive: Receive) -> Receive:
        """A body without Content-Length (chunked) is counted as it arrives."""
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                raise self._too_large()  # FastAPI re-raises errors from reading the body; our handler answers
            return message

        return limited
