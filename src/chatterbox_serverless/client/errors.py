# ruff: noqa: N818  InferenceFailed / InferenceTimeout keep the hosted SDK's names
"""Errors raised by the client. Names and attributes mirror the hosted `segmind` SDK so that `except` clauses
written for it keep working: every error has `status` (HTTP code or None) and `detail` (the server's `error`)."""
from __future__ import annotations

from typing import Any

import httpx


class ChatterboxError(Exception):
    """Base class of every client error. `status`: HTTP status code, or None when no response was involved.
    `detail`: the server's `error` message (or the client's own reason)."""

    def __init__(self, status: int | None = None, detail: str | None = None) -> None:
        super().__init__(status, detail)
        self.status = status
        self.detail = detail

    @classmethod
    def from_response(cls, response: httpx.Response) -> ChatterboxError:
        detail = _error_message(response)
        return cls(status=response.status_code, detail=detail)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "detail": self.detail}

    def __str__(self) -> str:
        if self.status is None:
            return self.detail or self.__class__.__name__
        return f"HTTP {self.status}: {self.detail or 'no error message'}"

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(status={self.status!r}, detail={self.detail!r})"


class APIConnectionError(ChatterboxError):
    """The server could not be reached, or the connection broke or timed out. `request_sent`: False when
    nothing reached the server (then a submission can safely be sent again)."""

    def __init__(self, detail: str, request_sent: bool) -> None:
        super().__init__(status=None, detail=detail)
        self.request_sent = request_sent

    @classmethod
    def from_httpx(cls, exc: httpx.TransportError, url: str) -> APIConnectionError:
        sent = not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol))
        what = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
        reason = str(exc) or type(exc).__name__
        hint = " (is the server running? set --server or CHATTERBOX_API_URL)" if not sent else ""
        return cls(f"request to {url} {what}: {reason}{hint}", request_sent=sent)


class ParameterError(ChatterboxError, ValueError):
    """A parameter is missing, of the wrong type or out of range; raised before anything is sent."""

    def __init__(self, detail: str) -> None:
        super().__init__(status=None, detail=detail)


class InferenceFailed(ChatterboxError):
    """The request reached FAILED. `detail`: the server's reason; `status_body`: the status body as received."""

    def __init__(self, detail: str | None, status_body: dict[str, Any], status: int | None = None) -> None:
        super().__init__(status=status, detail=detail)
        self.status_body = status_body

    @property
    def request_id(self) -> str | None:
        return self.status_body.get("request_id")

    def __str__(self) -> str:
        rid = f" (request {self.request_id})" if self.request_id else ""
        return f"inference failed{rid}: {self.detail or 'no reason given'}"


class InferenceTimeout(ChatterboxError):
    """`wait()` (or a v1 call, HTTP 504) ran out of time before the request finished. The job may still be
    running on the server: `client.job(e.request_id).wait()` picks it up again."""

    def __init__(self, request_id: str, elapsed_s: float, status: int | None = None) -> None:
        super().__init__(status=status,
                         detail=f"request {request_id!r} did not complete within {elapsed_s:.1f}s")
        self.request_id = request_id
        self.elapsed_s = elapsed_s

    def __str__(self) -> str:
        return self.detail or "inference timed out"


# The hosted SDK's name for the base class, so that `except SegmindError` keeps working.
SegmindError = ChatterboxError


def _error_message(response: httpx.Response) -> str:
    """The `error` of a JSON error body; else a short excerpt of the body; else the reason phrase."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("error"):
        error = body["error"]        # OpenAI's shape on /v1/audio/*: {"error": {"message": ...}}
        return str(error.get("message") or error) if isinstance(error, dict) else str(error)
    text = response.text.strip() if response.content else ""
    if text:
        return text[:200]
    return response.reason_phrase or "no error message"
