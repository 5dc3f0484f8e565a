"""Shared fixtures: a real server over HTTP on a free loopback port, and an engine double for queue semantics.

    with start_server(tmp_path, engine=FakeEngineForTests(delay=0.1), max_queue=5) as server:
        httpx.post(server.url + "/v2/chatterbox-tts", json={"text": "hi"})

`FakeEngineForTests` is a TEST DOUBLE: deterministic sine tones, never used by the product.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from chatterbox_serverless.engine.types import SynthesisRequest, SynthesisResult

TESTS_DIR = Path(__file__).resolve().parent


class FakeEngineForTests:
    """Engine double: a sine tone per request (frequency from the seed, length from the text), after `delay`
    seconds per batch. Texts containing `fail_marker` fail alone; `raise_marker` makes the whole batch raise."""

    def __init__(self, sample_rate: int = 24000, delay: float = 0.0, fail_marker: str = "FAIL-ME",
                 raise_marker: str = "CRASH-ME", seconds_per_char: float = 0.01, max_seconds: float = 2.0):
        self.sample_rate = sample_rate
        self.delay = delay
        self.fail_marker = fail_marker
        self.raise_marker = raise_marker
        self.seconds_per_char = seconds_per_char
        self.max_seconds = max_seconds
        self.batches: list[list[str]] = []       # request ids per call, for assertions
        self.lock = threading.Lock()

    def synthesize(self, requests: Sequence[SynthesisRequest]) -> list[SynthesisResult]:
        with self.lock:
            self.batches.append([r.request_id for r in requests])
        if any(self.raise_marker in r.text for r in requests):
            raise RuntimeError("fake engine crash")
        if self.delay:
            time.sleep(self.delay)
        out = []
        for r in requests:
            if self.fail_marker in r.text:
                out.append(SynthesisResult(error="fake engine: this text cannot be spoken"))
                continue
            seconds = min(self.max_seconds, 0.1 + self.seconds_per_char * len(r.text))
            t = np.arange(int(seconds * self.sample_rate), dtype=np.float32) / self.sample_rate
            freq = 200.0 + (r.params.seed % 50) * 10 + (50.0 if r.voice is not None else 0.0)
            audio = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
            out.append(SynthesisResult(audio=audio, metrics={"audio_seconds": seconds}))
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str                 # http://127.0.0.1:PORT
    store: Any
    app: Any
    engine: Any
    settings: Any
    extra: dict = field(default_factory=dict)


@contextlib.contextmanager
def start_server(tmp_path: Path, engine: Any = None, *, workers: int = 1, store: Any = None,
                 app_kwargs: dict | None = None, **settings: Any) -> Iterator[RunningServer]:
    """Run the real app under uvicorn in a thread on a free loopback port; stop it (gracefully) on exit.
    `settings` are `Settings` fields (data_dir defaults to tmp_path/"data")."""
    import uvicorn

    from chatterbox_serverless.api.app import create_app
    from chatterbox_serverless.jobs.sqlite_store import SQLiteJobStore
    from chatterbox_serverless.settings import Settings

    settings.setdefault("data_dir", tmp_path / "data")
    settings.setdefault("shutdown_grace", 5.0)
    cfg = Settings(**settings)
    own_store = store is None
    if own_store:
        store = SQLiteJobStore(cfg.data_dir / "jobs.sqlite3", retention_seconds=cfg.retention_seconds)
    app = create_app(cfg, store, engine, workers=workers, model_name="fake", **(app_kwargs or {}))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # no 40 ms delayed-ACK stalls on reused connections
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield RunningServer(url=f"http://127.0.0.1:{port}", store=store, app=app, engine=engine, settings=cfg)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        if own_store:
            store.close()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def serve_fake_main(argv: list[str] | None = None) -> None:
    """Entry point of a server SUBPROCESS running the real `serve` code path with FakeEngineForTests
    (crash-restart tests): python -c 'import conftest; conftest.serve_fake_main()' DATA_DIR PORT DELAY [LEASE]."""
    from chatterbox_serverless.api.logs import configure_logging
    from chatterbox_serverless.api.serve import serve_app
    from chatterbox_serverless.jobs.sqlite_store import SQLiteJobStore
    from chatterbox_serverless.settings import Settings

    argv = sys.argv[1:] if argv is None else argv
    data_dir, port, delay = Path(argv[0]), int(argv[1]), float(argv[2])
    lease = float(argv[3]) if len(argv) > 3 else 2.0
    configure_logging(json_lines=True, level=os.environ.get("LOG_LEVEL", "warning"))
    cfg = Settings(data_dir=data_dir, lease_seconds=lease, batch_size=4, max_queue=10_000, shutdown_grace=5)
    store = SQLiteJobStore(data_dir / "jobs.sqlite3")
    try:
        serve_app(cfg, store, FakeEngineForTests(delay=delay), workers=1, host="127.0.0.1", port=port)
    finally:
        store.close()
