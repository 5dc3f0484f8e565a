"""api/middleware.py RequestContext: request ids, one log line and metrics per request; a client that closes the
connection mid-upload is status 499, one info line without traceback, never a 500 (real uvicorn, raw sockets)."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import anyio
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from chatterbox_serverless.api.logs import request_id_var
from chatterbox_serverless.api.middleware import BodyTimeout, RequestContext, client_disconnect_handler

from chatterbox_serverless.testing.http import live_server, open_request

log = logging.getLogger("chatterbox_serverless.api")


class Params(BaseModel):
    text: str


def make_app(with_handler: bool = False) -> tuple[FastAPI, CollectorRegistry]:
    """Like api/app.py: a catch-all Exception handler that logs a traceback and answers 500."""
    app = FastAPI()
    registry = CollectorRegistry()

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse({"error": "internal server error"}, status_code=500)

    if with_handler:
        app.add_exception_handler(ClientDisconnect, client_disconnect_handler)

    @app.post("/upload")
    async def upload(request: Request):
        return {"size": len(await request.body())}

    @app.post("/stream")
    async def stream(request: Request):
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        return {"size": size}

    @app.post("/model")
    async def model(params: Params):                  # FastAPI reads the body: a disconnect becomes its 400
        return {"text": params.text}

    @app.get("/job")
    async def job():
        return JSONResponse({"id": "j"}, headers={"x-request-id": "job-123"})

    @app.get("/boom")
    async def boom():
        raise RuntimeError("boom")

    @app.get("/rid")
    async def rid(request: Request):
        return {"state": request.state.request_id, "var": request_id_var.get()}

    app.add_middleware(BodyTimeout, body_timeout=5)
    app.add_middleware(RequestContext,
                       requests=Counter("t_requests", "r", ["endpoint", "method", "status"], registry=registry),
                       latency=Histogram("t_latency", "l", ["endpoint"], registry=registry))
    return app, registry


def samples(registry) -> dict[tuple[str, str, str], float]:
    out = {}
    for metric in registry.collect():
        for s in metric.samples:
            if s.name == "t_requests_total":
                out[(s.labels["endpoint"], s.labels["method"], s.labels["status"])] = s.value
    return out


def wait_for(registry, endpoint, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {k: v for k, v in samples(registry).items() if k[0] == endpoint}
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"no request counted for {endpoint}")


@pytest.mark.parametrize("with_handler", [False, True], ids=["middleware-only", "with-handler"])
@pytest.mark.parametrize("endpoint", ["upload", "stream", "model"])
def test_client_closing_mid_upload_is_499_without_traceback(caplog, endpoint, with_handler):
    caplog.set_level(logging.INFO)
    app, registry = make_app(with_handler)
    with live_server(app) as port:
        s = open_request(port, "POST", f"/{endpoint}", {"Content-Type": "application/json", "Content-Length": "1000"},
                         b'{"text": "' + b"a" * 490)
        time.sleep(0.2)                                 # the endpoint is reading the body
        s.close()
        assert wait_for(registry, endpoint) == {(endpoint, "POST", "499"): 1.0}
        time.sleep(0.2)                                 # anything logged after the count
    assert not any(k[2] == "500" for k in samples(registry))
    lines = [r for r in caplog.records if r.name == "chatterbox_serverless.api"]
    assert [r.getMessage() for r in lines] == [f"POST /{endpoint} 499 (the client closed the connection)"]
    assert lines[0].levelno == logging.INFO and lines[0].status == 499 and lines[0].client_gone is True
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING], \
        [(r.name, r.getMessage()) for r in caplog.records]
    assert "Traceback" not in caplog.text


def test_a_complete_request_after_a_disconnect_is_normal(caplog):
    caplog.set_level(logging.INFO)
    app, registry = make_app()
    with live_server(app) as port:
        s = open_request(port, "POST", "/upload", {"Content-Length": "100"}, b"x" * 10)
        time.sleep(0.1)
        s.close()
        wait_for(registry, "upload")
        import httpx
        r = httpx.post(f"http://127.0.0.1:{port}/upload", content=b"y" * 100, timeout=5)
        assert r.status_code == 200 and r.json() == {"size": 100}
    assert samples(registry)[("upload", "POST", "200")] == 1
    assert samples(registry)[("upload", "POST", "499")] == 1


# --- request ids, log line, metrics (TestClient) --------------------------------------------------------------
def test_request_id_is_made_echoed_and_set_for_the_request(caplog):
    caplog.set_level(logging.INFO)
    app, registry = make_app()
    with TestClient(app) as c:
        r = c.get("/rid")
        rid = r.headers["x-request-id"]
        assert len(rid) == 32 and r.json() == {"state": rid, "var": rid}
        assert c.get("/rid", headers={"x-request-id": "client-id.1"}).headers["x-request-id"] == "client-id.1"
        bad = c.get("/rid", headers={"x-request-id": "no spaces/allowed"}).headers["x-request-id"]
        assert bad != "no spaces/allowed" and len(bad) == 32
        r = c.get("/job")
        assert r.headers["x-request-id"] == "job-123"
    record = [r for r in caplog.records if r.getMessage() == "GET /job 200"][0]
    assert record.job_id == "job-123" and record.endpoint == "job" and record.status == 200
    assert not hasattr(record, "client_gone")
    assert samples(registry)[("rid", "GET", "200")] == 3
    assert registry.get_sample_value("t_latency_count", {"endpoint": "rid"}) == 3


def test_unmatched_and_crashing_requests_are_counted(caplog):
    caplog.set_level(logging.INFO)
    app, registry = make_app()
    app.mount("/static", StaticFiles(directory=Path(__file__).parent))
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/nope").status_code == 404
        assert c.get("/boom").status_code == 500
        assert c.get(f"/static/{Path(__file__).name}").status_code == 200
    assert samples(registry)[("unmatched", "GET", "404")] == 1
    assert samples(registry)[("StaticFiles", "GET", "200")] == 1
    assert samples(registry)[("boom", "GET", "500")] == 1
    assert any(r.exc_info for r in caplog.records if r.getMessage() == "unhandled error")   # real errors keep theirs


# --- ASGI level: the cases a real server does not produce here ------------------------------------------------
def run(app, *, send_raises: bool = False, messages=({"type": "http.request", "body": b"", "more_body": False},)):
    registry = CollectorRegistry()
    mw = RequestContext(app, Counter("u_requests", "r", ["endpoint", "method", "status"], registry=registry),
                        Histogram("u_latency", "l", ["endpoint"], registry=registry))
    sent = []

    async def main():
        queue = list(messages)

        async def receive():
            return queue.pop(0) if queue else {"type": "http.disconnect"}

        async def send(message):
            if send_raises:
                raise OSError("client gone")
            sent.append(message)

        await mw({"type": "http", "method": "GET", "path": "/x", "headers": []}, receive, send)

    anyio.run(main)
    statuses = {s.labels["status"] for m in registry.collect() for s in m.samples if s.name == "u_requests_total"}
    return statuses, sent


async def answer(scope, receive, send, status=200):
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_send_raising_oserror_when_the_client_is_gone_is_499():     # ASGI 2.4 servers
    statuses, _ = run(answer, send_raises=True)
    assert statuses == {"499"}


def test_an_oserror_of_the_app_itself_is_not_swallowed():
    async def app(scope, receive, send):
        raise OSError("disk full")

    with pytest.raises(OSError):
        run(app)


def test_disconnect_seen_before_the_answer_is_499_whatever_the_app_sends():
    async def app(scope, receive, send):
        await receive()
        assert (await receive())["type"] == "http.disconnect"
        await answer(scope, receive, send, 400)

    statuses, sent = run(app, messages=({"type": "http.request", "body": b"a", "more_body": True},))
    assert statuses == {"499"} and sent[0]["status"] == 400


def test_a_client_leaving_after_the_answer_started_keeps_its_status():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        assert (await receive())["type"] == "http.request"
        assert (await receive())["type"] == "http.disconnect"

    statuses, _ = run(app)
    assert statuses == {"200"}


def test_disconnect_after_the_response_is_complete_is_not_499():
    async def app(scope, receive, send):
        await answer(scope, receive, send)
        await receive()
        await receive()           # a streaming response's listener sees http.disconnect after the end

    statuses, _ = run(app)
    assert statuses == {"200"}
