"""Cancelling a PROCESSING job over HTTP while the engine runs its batch (issue 18), on SQLite and on Redis: the
worker learns of it while the batch runs and calls the engine's `abort`; the engine (the double, whose batch is
steps of `step_seconds`) stops working on it within one step of the abort, the rest of the batch completes, the
hold is released and the job is FAILED, cancelled. Asserted on the double's record of steps, not on wall-clock."""
from __future__ import annotations

import httpx
import pytest

from chatterbox_serverless.testing import FakeEngineForTests, start_server, wait_until

BACKENDS = ["sqlite", pytest.param("redis", marks=pytest.mark.redis)]


@pytest.fixture(params=BACKENDS)
def where(request) -> dict:
    if request.param == "sqlite":
        return {}
    return {"store": request.getfixturevalue("redis_url"), "redis_prefix": request.getfixturevalue("redis_prefix")}


def test_a_job_cancelled_while_the_engine_runs_its_batch_is_aborted_there(tmp_path, where):
    engine = FakeEngineForTests(delay=4.0, step_seconds=0.01)            # 400 steps per batch
    with start_server(tmp_path, engine, accounts=True, batch_wait=0.5, sync_timeout=10.0, **where) as s:
        key, _ = s.accounts.create_key("t", 100, 0, False)
        with httpx.Client(base_url=s.url, headers={"x-api-key": key}, timeout=30) as c:
            ids = []
            for i in range(3):
                r = c.post("/v2/chatterbox-tts", json={"text": f"request {i} " + "x" * 30, "output_format": "wav"})
                assert r.status_code == 200, r.text
                ids.append(r.json()["request_id"])
            wait_until(lambda: engine.batches and engine.steps >= 20, timeout=15)
            assert engine.batches == [ids]                                # one batch of three
            kept, gone = [ids[0], ids[2]], ids[1]
            assert c.get("/v1/account").json()["held"] > 0
            r = c.post(f"/v2/requests/{gone}/cancel")
            assert r.status_code == 200 and r.json()["cancelled"] is True
            cancelled_at = engine.steps
            wait_until(lambda: gone in engine.stopped_at, timeout=10)
            # the engine stopped working on it within one step of the abort, well before the batch's end
            assert engine.stopped_at[gone] - engine.abort_calls[gone] <= 1
            assert engine.abort_calls[gone] >= cancelled_at and engine.stopped_at[gone] < 400
            assert engine.worked[gone] == engine.stopped_at[gone]
            for rid in kept:
                st = wait_until(lambda: (b := c.get(f"/v2/requests/{rid}/status").json())["status"] == "COMPLETED"
                                and b, timeout=20)
                assert st["status"] == "COMPLETED"
                assert engine.worked[rid] == 400                          # the rest of the batch ran to its end
            st = c.get(f"/v2/requests/{gone}/status").json()
            assert st["status"] == "FAILED" and st["cancelled"] is True
            assert s.store.get_audio(gone) is None
            acc = wait_until(lambda: (a := c.get("/v1/account").json())["held"] == 0 and a, timeout=10)
            assert acc["held"] == 0
