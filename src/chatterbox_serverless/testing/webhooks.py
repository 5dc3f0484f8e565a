"""A webhook receiver for tests: a tiny HTTP server on 127.0.0.1 that records every POST and answers statuses
from a script.

    with WebhookReceiver(answers=[500, 200]) as hook:         # first attempt 500, then 200 (the last repeats)
        ... submit with webhook_url=hook.url ...
        [first, second] = hook.wait_for(2)
        assert verify(secret, first.headers, first.body)
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Sequence


@dataclass
class Received:
    path: str
    headers: dict[str, str]          # lower-case names
    body: bytes
    at: float = field(default_factory=time.time)
    status: int = 0                  # what the receiver answered

    def json(self):
        import json
        return json.loads(self.body)


class WebhookReceiver:
    def __init__(self, answers: Sequence[int] = (200,), delay: float = 0.0):
        self.answers = list(answers) or [200]
        self.delay = delay
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:   # noqa: N802 - http.server's naming
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                if receiver.delay:
                    time.sleep(receiver.delay)
                with receiver._lock:
                    n = len(receiver.received)
                    status = receiver.answers[min(n, len(receiver.answers) - 1)]
                    receiver.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                                                      body, status=status))
                    receiver._arrived.notify_all()
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="webhook-receiver")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    @property
    def allow(self) -> str:
        """The --allow-fetch-hosts entry that lets the server call this receiver."""
        return f"127.0.0.1:{self.port}"

    def wait_for(self, n: int, timeout: float = 15.0) -> list[Received]:
        """The first `n` requests, once they arrived (AssertionError after `timeout`)."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self.received) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self.received)} webhook request(s) arrived, expected {n}")
                self._arrived.wait(left)
            return list(self.received[:n])

    def __enter__(self) -> "WebhookReceiver":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
