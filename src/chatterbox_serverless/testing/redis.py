"""A real Redis for tests and benchmarks: the one at 127.0.0.1:6379 when it answers, else a `redis-server` started
here. (The pytest fixtures `redis_url` and `redis_prefix` over these live in tests/conftest.py.)

Tests never clobber other data: each test gets its own key prefix in a dedicated DB number
(`CBX_TEST_REDIS_DB`, default 9) and deletes exactly the keys under that prefix afterwards.
Tests that must restart or kill Redis start their own server (`RedisProcess`) in a temporary directory.
(If `redis-server` is missing: `apt-get install redis-server`.)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import redis

from . import free_port

TEST_DB = int(os.environ.get("CBX_TEST_REDIS_DB", "9"))
SHARED = os.environ.get("CBX_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{TEST_DB}")


def reachable(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1).ping())
    except redis.RedisError:
        return False


class RedisProcess:
    """A redis-server owned by a test, with AOF persistence (fsync on every write) in `directory`."""

    def __init__(self, directory: Path, port: int | None = None, persistent: bool = True) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            import pytest       # only tests start a Redis of their own: skip them where none can be started
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.persistent = persistent
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisProcess":
        persistence = (["--appendonly", "yes", "--appendfsync", "always", "--save", ""] if self.persistent
                       else ["--appendonly", "no", "--save", ""])
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--daemonize", "no", "--logfile", str(self.directory / "redis.log"), *persistence],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.directory / 'redis.log').read_text()[-2000:]}")
            if reachable(self.url):
                return self
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start in 10 s")

    def kill(self) -> None:
        """SIGKILL: no chance to save; only what the AOF holds survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


_own_server: RedisProcess | None = None


def shared_url(tmp_root: Path) -> str:
    """The URL of a Redis for ordinary tests (the local one, else one started once per test session)."""
    global _own_server
    if reachable(SHARED):
        return SHARED
    if _own_server is None:
        _own_server = RedisProcess(tmp_root / "redis-shared", persistent=False).start()
    return _own_server.url


def stop_own_server() -> None:
    global _own_server
    if _own_server is not None:
        _own_server.stop()
        _own_server = None


def new_prefix() -> str:
    return f"cbxtest:{uuid.uuid4().hex[:12]}:"


def delete_prefix(url: str, prefix: str) -> None:
    r = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5)
    try:
        keys = list(r.scan_iter(match=prefix.replace("[", "\\[").replace("*", "\\*") + "*", count=1000))
        for i in range(0, len(keys), 500):
            r.delete(*keys[i:i + 500])
    except redis.RedisError:
        pass
    finally:
        r.close()
