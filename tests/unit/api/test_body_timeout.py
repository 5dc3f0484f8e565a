"""api/middleware.py BodyTimeout: a body that stops arriving is answered 408 {"error"} with Connection: close,
against a real uvicorn server and raw sockets; streaming requests and responses are untouched."""
from __future__ import annotations

import json
import logging
import time

import anyio
import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram

from chatterbox_serverless.api.middleware import BodyTimeout, RequestContext

from chatterbox_serverless.testing.http import live_server, open_request, parse_response, read_until_closed

TIMEOUT = 0.5


def make_app(**timeouts) -> tuple[FastAPI, CollectorRegistry]:
    app = FastAPI()
    registry = CollectorRegistry()

    @app.post("/echo")
    async def echo(request: Request):
        body = b""
        async for chunk in request.stream():
            body += chunk
        return JSONResponse({"size": len(body)})

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/slow-stream")
    async def slow_stream():
        async def gen():
            for i in range(5):
                await anyio.sleep(0.25)
                yield f"part {i}\n".encode()
        return StreamingResponse(gen(), media_type="text/plain")

    @app.post("/chunks")
    async def chunks(request: Request):
        return {"sizes": [len(c) async for c in request.stream() if c]}

    @app.post("/answer-first")
    async def answer_first():
        """Starts a streaming answer without reading the body (Starlette's disconnect listener reads it)."""
        async def gen():
            yield b"started\n"
            await anyio.sleep(30)
            yield b"never\n"
        return StreamingResponse(gen(), media_type="text/plain")

    app.add_middleware(BodyTimeout, **({"body_timeout": TIMEOUT} | timeouts))
    app.add_middleware(
        RequestContext, requests=Counter("t_requests", "r", ["endpoint", "method", "status"], registry=registry),
        latency=Histogram("t_latency", "l", ["endpoint"], registry=registry))
    return app, registry


def count(registry, endpoint, status):
    return registry.get_sample_value("t_requests_total", {"endpoint": endpoint, "method": "POST", "status": status})


def test_partial_body_gets_408_and_the_server_keeps_serving(caplog):
    caplog.set_level(logging.INFO)
    app, registry = make_app()
    with live_server(app) as port:
        t0 = time.monotonic()
        s = open_request(port, "POST", "/echo", {"Content-Type": "application/json", "Content-Length": "100"},
                         b'{"text"')
        # while that connection hangs, others are served
        r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
        assert r.status_code == 200
        raw, closed = read_until_closed(s, 5)
        elapsed = time.monotonic() - t0
        s.close()
        status, headers, body = parse_response(raw)
        assert status == 408
        assert TIMEOUT * 0.8 <= elapsed < TIMEOUT + 2.0
        assert headers["connection"] == "close" and headers["content-type"] == "application/json"
        assert "request body not received in time" in json.loads(body)["error"]
        assert closed, "the server closes the connection after the 408"
        assert "x-request-id" in headers
        # and afterwards
        r = httpx.post(f"http://127.0.0.1:{port}/echo", content=b"x" * 1000, timeout=5)
        assert r.status_code == 200 and r.json() == {"size": 1000}
    assert count(registry, "echo", "408") == 1
    assert any(rec.getMessage() == "POST /echo 408" for rec in caplog.records)
    assert not [rec for rec in caplog.records if rec.exc_info or rec.levelno >= logging.ERROR]


def test_many_stalled_uploads_do_not_block_others():
    app, _ = make_app()
    with live_server(app) as port:
        stalled = [open_request(port, "POST", "/echo", {"Content-Length": "100"}, b"1234567") for _ in range(20)]
        t0 = time.monotonic()
        r = httpx.post(f"http://127.0.0.1:{port}/echo", content=b"abc", timeout=5)
        assert r.status_code == 200 and time.monotonic() - t0 < TIMEOUT
        for s in stalled:
            raw, _ = read_until_closed(s, 5)
            assert parse_response(raw)[0] == 408
            s.close()


def test_a_slow_but_steady_body_is_not_cut():
    """The timeout is per wait for the next piece: a body that takes longer than it in total, but never stalls
    that long, is read."""
    app, _ = make_app()
    with live_server(app) as port:
        s = open_request(port, "POST", "/echo", {"Content-Length": "60", "Connection": "close"}, b"")
        for _ in range(6):
            time.sleep(TIMEOUT * 0.4)
            s.sendall(b"x" * 10)
        raw, _ = read_until_closed(s, 3)
        s.close()
        status, _, body = parse_response(raw)
        assert status == 200 and json.loads(body) == {"size": 60}


def test_total_timeout_stops_a_trickle():
    app, _ = make_app(body_timeout=TIMEOUT, total_timeout=0.8)
    with live_server(app) as port:
        t0 = time.monotonic()
        s = open_request(port, "POST", "/echo", {"Content-Length": "1000"}, b"x")
        status = None
        while time.monotonic() - t0 < 5:
            time.sleep(0.15)
            try:
                s.sendall(b"x")
            except OSError:
                break
            s.settimeout(0.01)
            try:
                raw = s.recv(65536)
            except OSError:
                continue
            status, _, body = parse_response(raw)
            break
        elapsed = time.monotonic() - t0
        s.close()
        assert status == 408
        assert not body or "the whole body is due within 0.8 s" in json.loads(body)["error"]
        assert 0.7 <= elapsed < 2.5


def test_a_streaming_response_is_not_timed():
    app, _ = make_app()
    with live_server(app) as port:
        r = httpx.get(f"http://127.0.0.1:{port}/slow-stream", timeout=10)
        assert r.status_code == 200 and r.text == "".join(f"part {i}\n" for i in range(5))


def test_a_streamed_request_body_is_passed_through_as_it_comes():
    app, _ = make_app()
    with live_server(app) as port:
        def body():
            for _ in range(3):
                yield b"y" * 5000
                time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/chunks", content=body(), timeout=10)
        assert r.status_code == 200
        sizes = r.json()["sizes"]
        assert sum(sizes) == 15000 and len(sizes) >= 3      # piece by piece, as they came


def test_after_the_response_started_a_stalled_body_just_ends_the_connection():
    app, _ = make_app()
    with live_server(app) as port:
        t0 = time.monotonic()
        s = open_request(port, "POST", "/answer-first", {"Content-Length": "100"}, b"1234567")
        raw, closed = read_until_closed(s, 5)
        elapsed = time.monotonic() - t0
        s.close()
        assert raw.startswith(b"HTTP/1.1 200") and b"started" in raw
        assert b"408" not in raw.split(b"\r\n", 1)[1] and b"never" not in raw
        assert not raw.endswith(b"0\r\n\r\n"), "the chunked response must not look complete"
        assert closed and TIMEOUT * 0.8 <= elapsed < TIMEOUT + 2.0


# --- ASGI level ------------------------------------------------------------------------------------------------
def run_asgi(app, messages, *, timeout=TIMEOUT, total=None):
    """Run BodyTimeout(app) with receive yielding `messages` then stalling; returns what was sent."""
    sent = []

    async def main():
        queue = list(messages)

        async def receive():
            if queue:
                return queue.pop(0)
            await anyio.sleep_forever()

        async def send(message):
            sent.append(message)

        with anyio.fail_after(5):
            await BodyTimeout(app, body_timeout=timeout, total_timeout=total)(
                {"type": "http", "method": "POST", "headers": []}, receive, send)

    anyio.run(main)
    return sent


def test_messages_pass_through_unchanged_and_unbuffered():
    chunks = [{"type": "http.request", "body": b"a" * 10, "more_body": True},
              {"type": "http.request", "body": b"b" * 10, "more_body": True},
              {"type": "http.request", "body": b"", "more_body": False}]
    seen = []

    async def app(scope, receive, send):
        for _ in chunks:
            seen.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent = run_asgi(app, list(chunks))
    assert seen == chunks and all(a is b for a, b in zip(seen, chunks))
    assert [m.get("status") for m in sent] == [200, None]


def test_timeout_cancels_the_app_and_drops_what_it_sends_later():
    after = []

    async def app(scope, receive, send):
        await receive()
        try:
            await receive()             # stalls
            after.append("read on")
        finally:
            try:
                await send({"type": "http.response.start", "status": 500, "headers": []})
            except BaseException:
                pass

    sent = run_asgi(app, [{"type": "http.request", "body": b"x", "more_body": True}])
    assert after == []
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]


def test_a_piece_already_there_is_taken_even_past_the_total_deadline():
    got = []

    async def app(scope, receive, send):
        got.append(await receive())
        await anyio.sleep(0.3)              # busy past the total deadline; the rest of the body is buffered
        got.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sent = run_asgi(app, [{"type": "http.request", "body": b"a", "more_body": True},
                          {"type": "http.request", "body": b"b", "more_body": False}], total=0.1)
    assert [m["body"] for m in got] == [b"a", b"b"] and sent[0]["status"] == 200


def test_no_timeout_once_the_body_is_complete():
    """After the last piece, receive waits for http.disconnect (e.g. a streaming response's listener): untimed."""
    async def app(scope, receive, send):
        await receive()
        with anyio.move_on_after(TIMEOUT * 2):
            await receive()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sent = run_asgi(app, [{"type": "http.request", "body": b"", "more_body": False}])
    assert sent[0]["status"] == 204


def test_other_scopes_pass_through_and_bad_arguments_fail():
    calls = []

    async def app(scope, receive, send):
        calls.append(scope["type"])

    anyio.run(BodyTimeout(app), {"type": "lifespan"}, None, None)
    assert calls == ["lifespan"]
    with pytest.raises(ValueError):
        BodyTimeout(app, body_timeout=0)
    with pytest.raises(ValueError):
        BodyTimeout(app, total_timeout=-1)
