"""Error shapes of the HTTP layer. The hosted routes answer `{"error": "..."}` (plus context fields such as
`request_id`); a route raises `ApiError` and the handlers registered by `install_error_handlers` render it.
A client error is never 422 on these routes: 422 means the job FAILED.

The OpenAI-compatible routes (paths under OPENAI_PREFIXES: /v1/audio/..., /v1/models) answer in OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, whatever raised (auth, validation, unknown routes included):
`openai_error` maps the status to what OpenAI's SDK expects (406 "not enough credits" is OpenAI's 429
insufficient_quota; answers the SDK must not retry, such as a FAILED job or a 504 whose job goes on, carry
`x-should-retry: false`)."""
from __future__ import annotations

import logging
import re
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


OPENAI_PREFIXES = ("/v1/audio/", "/v1/models")
_OPENAI_KIND = {400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
                403: ("permission_error", "permission_denied"), 404: ("invalid_request_error", "not_found"),
                405: ("invalid_request_error", "method_not_allowed"), 408: ("invalid_request_error", "timeout"),
                409: ("invalid_request_error", "conflict"), 413: ("invalid_request_error", "request_too_large"),
                415: ("invalid_request_error", "unsupported_media_type"),
                422: ("server_error", "generation_failed"), 429: ("rate_limit_error", "rate_limit_exceeded"),
                502: ("server_error", "service_unavailable"), 503: ("server_error", "service_unavailable"),
                504: ("server_error", "timeout")}
_PARAM = re.compile(r"^(?:missing required )?parameter '([^']+)'")


def is_openai_route(request: Request) -> bool:
    return request.url.path.startswith(OPENAI_PREFIXES)


def openai_error(code: int, message: str, headers: dict[str, str] | None = None, /, **extra: Any) -> JSONResponse:
    """OpenAI's error body and the status its SDK maps (BadRequestError 400, AuthenticationError 401, ...);
    `extra` may name `param` and `openai_code`, else they are read from the message and the status."""
    headers = dict(headers or {})
    if code == 406:              # not enough credits: OpenAI's insufficient_quota (a 429 retrying cannot fix)
        code, kind, err_code = 429, "insufficient_quota", "insufficient_quota"
        headers["x-should-retry"] = "false"
    else:
        kind, err_code = _OPENAI_KIND.get(code, ("server_error" if code >= 500 else "invalid_request_error", None))
    if code in (422, 504):       # the job FAILED, or goes on: a retry would run (and bill) it again
        headers["x-should-retry"] = "false"
    if extra.get("request_id"):
        headers.setdefault("x-request-id", str(extra["request_id"]))
    match = _PARAM.match(message)
    param = extra.get("param") or (match.group(1) if match else None)
    body = {"message": message, "type": kind, "param": param, "code": extra.get("openai_code") or err_code}
    return JSONResponse({"error": body}, status_code=code, headers=headers)


def _respond(request: Request, code: int, message: str, headers: dict[str, str] | None = None, /,
             **extra: Any) -> JSONResponse:
    if is_openai_route(request):
        return openai_error(code, message, headers, **extra)
    extra.pop("openai_code", None)
    extra.pop("param", None)
    return error_response(code, message, headers, **extra)


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
        return _respond(request, e.code, e.message, e.headers, **e.extra)

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
        return _respond(request, e.status_code, message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        err = (e.errors() or [{}])[0]
        loc = ".".join(str(x) for x in err.get("loc", ())[1:]) or "request"
        return _respond(request, 400, f"parameter '{loc}': {err.get('msg', 'invalid')}")

    @app.exception_handler(StoreUnavailable)
    async def _store_down(request: Request, e: StoreUnavailable):
        log.error("store unavailable: %s", e)
        return _respond(request, 502, "service temporarily unavailable: the job store cannot be reached or "
                                      "written; retry later", {"Retry-After": "5"})

    app.add_exception_handler(ClientDisconnect, client_disconnect_handler)

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        log.exception("unhandled error")
        return _respond(request, 500, "internal server error",
                        request_id=getattr(request.state, "request_id", None))
