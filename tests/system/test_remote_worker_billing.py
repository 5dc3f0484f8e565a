"""Billing is the store's, not the API's: a separate `worker` process (the real command, FakeEngineForTests as its
engine) completes a job, and the key's balance is already settled in the same instant the job reads COMPLETED,
on SQLite (a shared database file) and on Redis (a shared server). No API janitor is involved."""
from __future__ import annotations

import signal

import httpx
import pytest

from chatterbox_serverless.testing import spawn, start_server, wait_until
from chatterbox_serverless.testing.redis import delete_prefix, new_prefix

V2 = "/v2/chatterbox-tts"
TEXT = "x" * 40          # hold: 40/10 + 2 = 6 s -> 6 credits


def _first_completed_read(server, key: str, rid: str) -> tuple[dict, dict]:
    """Poll the status; the first time it reads COMPLETED, read the account (over HTTP too)."""
    h = {"x-api-key": key}
    def done():
        status = httpx.get(f"{server.url}/v2/requests/{rid}/status", headers=h).json()
        if status["status"] in ("COMPLETED", "FAILED"):
            return status, httpx.get(server.url + "/v1/account", headers=h).json()
        return None
    return wait_until(done, 30, 0.005)


def _check(server, worker_args: list[str], env: dict | None = None) -> None:
    key, _ = server.accounts.create_key("remote", credits=100, rate_per_min=0)
    proc, _ = spawn("worker", worker_args + ["--batch-wait", "0", "--log-level", "warning"],
                    fake={"seconds_per_char": 0.05, "base_seconds": 0.0, "max_seconds": 100.0}, env=env)
    try:
        rid = httpx.post(server.url + V2, json={"text": TEXT, "output_format": "wav"},
                         headers={"x-api-key": key}).json()["request_id"]
        status, account = _first_completed_read(server, key, rid)
        assert status["status"] == "COMPLETED", status
        assert status["metrics"]["audio_seconds"] == pytest.approx(2.0)
        assert (account["held"], account["balance"]) == (0, 98), account        # 2 s at 1 credit/s, settled
        assert account["usage"]["completed"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def test_a_worker_process_on_sqlite_settles_before_completed_is_seen(tmp_path):
    data = tmp_path / "data"
    with start_server(tmp_path, accounts=True, workers=0, data_dir=data) as server:
        _check(server, ["--data-dir", str(data)])


@pytest.mark.redis
def test_a_worker_process_on_redis_settles_before_completed_is_seen(tmp_path, redis_url):
    prefix = new_prefix()
    try:
        with start_server(tmp_path, accounts=True, workers=0, store=redis_url, redis_prefix=prefix) as server:
            _check(server, ["--store", redis_url, "--redis-prefix", prefix, "--data-dir", str(tmp_path / "w")])
    finally:
        delete_prefix(redis_url, prefix)
