"""Pure ASGI middlewares of the HTTP layer.

    app = FastAPI(...)
    app.add_middleware(BodyTimeout, body_timeout=30.0)                        # added first: inner
    app.add_middleware(RequestContext, requests=counter, latency=histogram)   # added last: outer
    app.add_exception_handler(ClientDisconnect, client_disconnect_handler)    # optional, see below

Order matters: Starlette makes the middleware added last the outermost. RequestContext must be outside
BodyTimeout so that it sees (logs, counts) the 408 that BodyTimeout sends. Both sit inside Starlette's
ServerErrorMiddleware (where FastAPI keeps an `Exception` handler), which is why RequestContext can stop a
ClientDisconnect before that catch-all turns it into a logged 500.

* `BodyTimeout`: a request body that stops arriving is answered 408 `{"error"}` with `Connection: close`.
* `RequestContext`: a request id per request, one log line and the Prometheus metrics per request; a client that
  closed the connection before the response started is counted and logged as 499, one info line, no traceback.
"""
from __future__ import annotations

import json
import logging
import re
import time
import uuid

import anyio
from prometheus_client import Counter, Histogram
from starlette.datastructures import MutableHeaders
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .logs import request_id_var

log = logging.getLogger("chatterbox_serverless.api")

SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")   # an acceptable client-supplied x-request-id
CLIENT_CLOSED = 499                                  # nginx's "client closed request"


class BodyTimeout:
    """Pure ASGI middleware: a request whose body does not arrive in time ends with 408.

    `body_timeout` (seconds, default 30): the longest wait for the next piece of the body each time the app asks
    for it. `total_timeout` (seconds, default None: no limit): the longest time from the app's first read of the
    body to its last piece (stops a client that trickles a byte every few seconds). Only waits inside `receive`
    are timed, while the body is incomplete: nothing is buffered or copied, a request whose body is complete (or
    that has none) is passed through untouched, and a response, streaming or not, is never timed.

    On a timeout, before the app started its response: 408 `{"error": ...}` with `Connection: close` (the server
    then closes the connection) and the app is cancelled. After it started: the app is cancelled and the response
    is left incomplete, so the server closes the connection. Anything the app sends afterwards is dropped and
    every later `receive` answers `http.disconnect`.
    """

    def __init__(self, app: ASGIApp, body_timeout: float = 30.0, total_timeout: float | None = None):
        if body_timeout <= 0 or (total_timeout is not None and total_timeout <= 0):
            raise ValueError("body_timeout and total_timeout must be positive seconds")
        self.app, self.body_timeout, self.total_timeout = app, body_timeout, total_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_done = False
        started = False           # the response started (by the app or by us)
        ended = False             # we ended the request: drop the app's messages from now on
        deadline: float | None = None
        cancel = anyio.CancelScope()

        async def timed_receive() -> Message:
            nonlocal body_done, deadline, ended, started
            if ended:
                return {"type": "http.disconnect"}
            if body_done:
                return await receive()
            wait = self.body_timeout
            if self.total_timeout is not None:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.total_timeout
                wait = max(0.0, min(wait, deadline - now))   # 0: still takes a piece that is already there
            message: Message | None = None
            with anyio.move_on_after(wait):
                message = await receive()
            if message is not None:
                if message["type"] != "http.request" or not message.get("more_body", False):
                    body_done = True
                return message
            # the body did not come in time
            ended = True
            if not started:
                started = True
                why = f"the whole body is due within {self.total_timeout:g} s" if wait < self.body_timeout \
                    else f"no data for {self.body_timeout:g} s"
                body = json.dumps({"error": f"request body not received in time ({why}): send the whole body "
                                            "promptly"}).encode()
                await send({"type": "http.response.start", "status": 408, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body, "more_body": False})
            cancel.cancel()
            await anyio.lowlevel.checkpoint()      # raises the cancellation into the app
            return {"type": "http.disconnect"}     # only if the app swallowed it

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if ended:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        with cancel:
            await self.app(scope, timed_receive, guarded_send)


class RequestContext:
    """Pure ASGI middleware: a request id per request (the client's `x-request-id` if sane, else a new one),
    echoed in the response unless the endpoint set its own (the job id), one structured log line and the
    metrics per request: `requests.labels(endpoint, method, status)` and `latency.labels(endpoint)`.

    A client that closed the connection before the response started (seen as `http.disconnect` from `receive`,
    as ClientDisconnect out of the app, or as OSError from `send` on servers that raise there) is status 499:
    counted so, logged as one info line without traceback, and the ClientDisconnect is not re-raised (so the
    app's catch-all error handler never sees it). Whatever the app tried to answer such a client (FastAPI turns
    a disconnect while it parses a body parameter into a 400) is still sent (servers drop it) but counted 499.
    A client that leaves after the response started keeps the started status (`client_gone` in the log line).
    """

    def __init__(self, app: ASGIApp, requests: Counter, latency: Histogram, logger: logging.Logger | None = None):
        self.app, self.requests, self.latency = app, requests, latency
        self.log = logger or log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"x-request-id"), "")
        rid = incoming if SAFE_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id_var.set(rid)
        start = time.perf_counter()
        status = 500
        started = complete = False
        gone = False              # the client went away before the response was complete
        closed_early = False      # ... before it started: status 499
        send_failed = False
        job_id = None

        async def watch_receive() -> Message:
            nonlocal gone, closed_early
            message = await receive()
            if message["type"] == "http.disconnect" and not complete:
                gone = True
                closed_early = closed_early or not started
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status, job_id, started, complete, gone, closed_early, send_failed
            if message["type"] == "http.response.start":
                if not closed_early:
                    status = message["status"]
                headers = MutableHeaders(scope=message)
                if "x-request-id" not in headers:
                    headers.append("x-request-id", rid)
                elif headers["x-request-id"] != rid:
                    job_id = headers["x-request-id"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            try:
                await send(message)
            except OSError:                      # ASGI 2.4 servers raise this once the client is gone
                gone = send_failed = True
                closed_early = closed_early or not started
                raise
            finally:
                started = started or message["type"] == "http.response.start"

        try:
            await self.app(scope, watch_receive, send_with_id)
        except (ClientDisconnect, OSError) as e:
            if not (send_failed or isinstance(e, ClientDisconnect)):
                raise
            gone = True                          # nothing to answer: the client is gone
            closed_early = closed_early or not started
        finally:
            if closed_early:
                status = CLIENT_CLOSED
            seconds = time.perf_counter() - start
            handler = scope.get("endpoint")      # a function, or an app mounted under a path (e.g. StaticFiles)
            endpoint = "unmatched" if handler is None else getattr(handler, "__name__", type(handler).__name__)
            self.requests.labels(endpoint, scope["method"], str(status)).inc()
            self.latency.labels(endpoint).observe(seconds)
            extra = {"status": status, "ms": round(seconds * 1000, 2), "endpoint": endpoint, "job_id": job_id}
            if gone:
                extra["client_gone"] = True
            if closed_early:
                self.log.info("%s %s %d (the client closed the connection)", scope["method"], scope["path"], status,
                              extra=extra)
            else:
                self.log.info("%s %s %d", scope["method"], scope["path"], status, extra=extra)
            request_id_var.reset(token)


async def client_disconnect_handler(request: Request, exc: ClientDisconnect) -> Response:
    """Optional exception handler for ClientDisconnect (`app.add_exception_handler(ClientDisconnect, ...)`):
    answers 499 with no body (nobody reads it: servers drop what is sent to a closed connection), logs nothing.
    Not needed when RequestContext is installed with add_middleware: it already stops ClientDisconnect before
    the catch-all handler; this one also covers apps where RequestContext is not inside ServerErrorMiddleware."""
    return Response(status_code=CLIENT_CLOSED)


__all__ = ["BodyTimeout", "RequestContext", "client_disconnect_handler", "SAFE_ID", "CLIENT_CLOSED"]
