"""Shared fixtures. The doubles and harnesses live in `chatterbox_serverless.testing` (bench/ uses them too):

    with start_server(tmp_path, engine=FakeEngineForTests(delay=0.1), max_queue=5) as server:
        httpx.post(server.url + "/v2/chatterbox-tts", json={"text": "hi"})
"""
from __future__ import annotations

from pathlib import Path

from chatterbox_serverless.testing import (FakeEngineForTests, RunningServer, free_port, spawn, start_server,  # noqa: F401
                                           wait_until)

TESTS_DIR = Path(__file__).resolve().parent


# --- Redis (tests marked `redis`) ----------------------------------------------------------------------------------
import pytest  # noqa: E402

from chatterbox_serverless.testing.redis import delete_prefix, new_prefix, shared_url, stop_own_server  # noqa: E402


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A Redis for ordinary tests: the local one (DB 9), else one started once for the session."""
    url = shared_url(tmp_path_factory.mktemp("redis"))
    yield url
    stop_own_server()


@pytest.fixture
def redis_prefix(redis_url):
    """A fresh key prefix, deleted after the test."""
    prefix = new_prefix()
    yield prefix
    delete_prefix(redis_url, prefix)


def pytest_collection_modifyitems(config, items):
    """Every test that uses a Redis (the `redis_url` fixture) is marked `redis`: `-m "not redis"` leaves them out."""
    for item in items:
        if "redis_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.redis)
