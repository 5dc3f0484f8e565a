"""Error shapes of the HTTP layer. The hosted routes answer `{"error": "..."}` (plus context fields such as
`request_id`); a route raises `ApiError` and the handlers registered by `install_error_handlers` render it.
A client error is never 422 on these routes: 422 means the job FAILED."""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..jobs.store import StoreUnavailable
from .middleware import client_disconnect_handler
from .schemas import ErrorResponse

log = logging.getLogger("chatterbox_serverless.api")

MAX_ECHO = 80        # characters of client input (an id, a path) an error message repeats at most


class ApiError(Exception):
    def __init__(self, code: int, message: str, headers: dict[str, str] | None = None, /, **extra: Any):
        super().__init__(message)
        self.code, self.message, self.headers, self.extra = code, message, headers or {}, extra


def error_response(code: int, message: str, headers: dict[str, str] | None = None, /, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=code, headers=headers)


def echo(value: str) -> str:
    """Client input as an error message may repeat it: bounded."""
    return value if len(value) <= MAX_ECHO else value[:MAX_ECHO] + "…"


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in (
        (400, "Invalid parameters or request format"), (401, "Missing or invalid API key"),
        (403, "Revoked API key"), (404, "Not found or expired"), (429, "Queue full or rate limited"),
        (502, "No worker able to serve"))}
NOT_ENOUGH_CREDITS = {406: {"model": ErrorResponse, "description": "Not enough credits (nothing was queued)"}}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e.code, e.message, e.headers, **e.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        path = echo(request.url.path)
        if e.status_code == 404:
            message = f"not found: {request.method} {path}"
        elif e.status_code == 405:
            allowed = (e.headers or {}).get("Allow", "")
            message = f"method {request.method} is not allowed on {path}" + \
                (f" (allowed: {allowed})" if allowed else "")
        else:
            message = str(e.detail) if e.detail else "request failed"
        return error_response(e.status_code, message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        err = (e.errors() or [{}])[0]
        loc = ".".join(str(x) for x in err.get("loc", ())[1:]) or "request"
        return error_response(400, f"parameter '{loc}': {err.get('msg', 'invalid')}")

    @app.exception_handler(StoreUnavailable)
    async def _store_down(request: Request, e: StoreUnavailable):
        log.error("store unavailable: %s", e)
        return error_response(502, "service temporarily unavailable: the job store cannot be reached or written; "
                                   "retry later", {"Retry-After": "5"})

    app.add_exception_handler(ClientDisconnect, client_disconnect_handler)

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal server error", request_id=getattr(request.state, "request_id", None))
