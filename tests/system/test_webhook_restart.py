"""Webhook deliveries are durable: the real `serve` command in a subprocess (FakeEngineForTests as its engine)
answers a job's first delivery attempt with a 500 from the receiver, and is SIGKILLed before the retry is due;
the retry falls due while nothing runs, and the restarted server (same data dir, or same Redis) makes it, signed
with the same secret. On SQLite and on Redis."""
from __future__ import annotations

import time

import httpx
import pytest

from chatterbox_serverless import testing
from chatterbox_serverless.jobs.webhooks import verify
from chatterbox_serverless.testing.webhooks import WebhookReceiver

V2 = "/v2/chatterbox-tts"
BACKOFF = 2.0


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_a_delivery_due_while_the_server_is_down_is_made_after_it_restarts(tmp_path, backend, request):
    store = [] if backend == "sqlite" else ["--store", request.getfixturevalue("redis_url"),
                                            "--redis-prefix", request.getfixturevalue("redis_prefix")]
    with WebhookReceiver(answers=[500, 200]) as hook:
        argv = ["--data-dir", str(tmp_path / "data"), "--no-auth", "--port", str(testing.free_port()),
                "--allow-fetch-hosts", hook.allow, "--webhook-backoff", str(BACKOFF), "--log-level", "warning",
                *store]
        proc, url = testing.spawn("serve", argv)
        try:
            secret = httpx.get(url + "/v1/account/webhook-secret").json()["secret"]
            rid = httpx.post(url + V2, json={"text": "hello there", "webhook_url": hook.url}).json()["request_id"]
            [first] = hook.wait_for(1)
            assert first.status == 500
            testing.wait_until(lambda: httpx.get(f"{url}/v2/requests/{rid}/status").json()["webhook"]
                               == {"state": "pending", "attempts": 1, "last_status": 500, "last_error": None})
            proc.kill()                                   # the retry is due in BACKOFF s: nothing will be running
            proc.wait(10)
            time.sleep(BACKOFF + 1.0)
            assert len(hook.received) == 1
            restarted = time.time()
            proc, url = testing.spawn("serve", argv)
            second = hook.wait_for(2, timeout=20)[1]
            assert second.at >= restarted and second.status == 200
            assert second.headers["webhook-id"] == rid and verify(secret, second.headers, second.body)
            sent = second.json()
            assert sent["status"] == "COMPLETED" and sent["webhook"]["attempts"] == 2
            audio = httpx.get(sent["output"])             # the output URL of the body works on the restarted server
            assert audio.status_code == 200 and audio.headers["content-type"].startswith("audio/")
            final = testing.wait_until(lambda: (b := httpx.get(f"{url}/v2/requests/{rid}/status").json())
                                       ["webhook"]["state"] == "delivered" and b)
            assert final["webhook"] == {"state": "delivered", "attempts": 2, "last_status": 200, "last_error": None}
            time.sleep(1.0)
            assert len(hook.received) == 2                # delivered once after the restart, not again
        finally:
            proc.kill()
            proc.wait(10)
