"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from kcache.engine.async_engine import EngineShutdownError
from kcache.engine.llm_engine import RequestError
from kcache.server.protocol import ErrorInfo, ErrorResponse


class APIError(HTTPException):
    """An HTTPException, so that FastAPI passes it through untouched even when raised while reading the body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(status, message)
        self.param, self.code = param, code

    @property
    def status(self) -> int:
        return self.status_code


def error_body(e: APIError) -> ErrorResponse:
    kind = "invalid_request_error" if e.status < 500 else "server_error"
    return ErrorResponse(error=ErrorInfo(message=e.detail, type=kind, param=e.param, code=e.code))


def error_response(e: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(error_body(e).model_dump(), status_code=e.status, headers=headers)


def from_validation(exc: RequestValidationError) -> APIError:
    """One 400 naming every bad field, e.g. "temperature: Input should be a finite number"."""
    errors = exc.errors()
    if any(err["type"] == "json_invalid" for err in errors):
        detail = errors[0].get("ctx", {}).get("error", "")
        return APIError(400, f"the body is not valid JSON: {detail}".rstrip(": "))
    parts, params = [], []
    for err in errors:
        param = ".".join(str(x) for x in err["loc"] if x != "body")
        msg = err["msg"].removeprefix("Value error, ")
        if not param and err["type"].endswith("_type"):  # a list, a string, or a body not sent as JSON
            msg = "the body must be a JSON object (send Content-Type: application/json)"
        parts.append(f"{param}: {msg}" if param else msg)
        params += [param] if param else []
    return APIError(400, "; ".join(parts), param=params[0] if params else None)


def from_engine(e: Exception) -> APIError:
    """The engine refused the request (400), is shutting down (503) or failed (500)."""
    status = 400 if isinstance(e, RequestError) else 503 if isinstance(e, EngineShutdownError) else 500
    return APIError(status, str(e))
