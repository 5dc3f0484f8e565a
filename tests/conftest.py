"""Shared fixtures. The doubles and harnesses live in `chatterbox_serverless.testing` (bench/ uses them too):

    with start_server(tmp_path, engine=FakeEngineForTests(delay=0.1), max_queue=5) as server:
        httpx.post(server.url + "/v2/chatterbox-tts", json={"text": "hi"})
"""
from __future__ import annotations

import sys
from pathlib import Path

from chatterbox_serverless.testing import (FakeEngineForTests, RunningServer, free_port, spawn, start_server,  # noqa: F401
                                           wait_until)

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:       # tests/support/ (redis_server) for tests in sub-folders
    sys.path.insert(0, str(TESTS_DIR))
