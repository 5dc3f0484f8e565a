"""The queue conventions over HTTP (issue 18), on SQLite and on Redis, against the real app on a real socket with
an engine double: cancel in each state with the hold released, webhooks (a receiver on loopback checking
signatures, retries after a 500, a slow receiver beside a fast one), queue_position, Server-Sent Events
disconnected and resumed with Last-Event-ID (also from a second API replica on Redis), idempotent submissions
(sequential and concurrent: one job, one charge)."""
from __future__ import annotations

import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import pytest

from chatterbox_serverless.api.routers import hosted
from chatterbox_serverless.jobs.webhooks import verify
from chatterbox_serverless.testing import FakeEngineForTests, start_server, wait_until
from chatterbox_serverless.testing.webhooks import WebhookReceiver

V1, V2 = "/v1/chatterbox-tts", "/v2/chatterbox-tts"
TEXT = "x" * 40                 # hold 6 credits (40/10 + 2 s); the double's audio is 0.5 s: charged 1
BACKENDS = ["sqlite", pytest.param("redis", marks=pytest.mark.redis)]


@dataclass
class GatedEngine(FakeEngineForTests):
    """Each batch waits for `gate` (set: run freely); `entered` lists the request ids that reached the engine."""
    gate: threading.Event = field(default_factory=threading.Event)
    entered: list = field(default_factory=list)

    def synthesize(self, requests):
        self.entered.extend(r.request_id for r in requests)
        assert self.gate.wait(30), "the test never opened the gate"
        return super().synthesize(requests)


@pytest.fixture(params=BACKENDS)
def where(request) -> dict:
    """The store settings of one backend: SQLite in the data dir, or a fresh prefix on the test Redis."""
    if request.param == "sqlite":
        return {}
    return {"store": request.getfixturevalue("redis_url"), "redis_prefix": request.getfixturevalue("redis_prefix")}


@contextlib.contextmanager
def server(tmp_path, where, engine=None, **settings):
    settings = {"batch_wait": 0.0, "sync_timeout": 10.0, **where, **settings}
    with start_server(tmp_path, engine if engine is not None else FakeEngineForTests(), accounts=True,
                      **settings) as s:
        yield s


def client(s, credits: int = 100) -> httpx.Client:
    key, _ = s.accounts.create_key("t", credits, 0, False)
    return httpx.Client(base_url=s.url, headers={"x-api-key": key}, timeout=30)


def status(c: httpx.Client, rid: str) -> dict:
    return c.get(f"/v2/requests/{rid}/status").json()


def wait_status(c: httpx.Client, rid: str, want: str, timeout: float = 15.0) -> dict:
    return wait_until(lambda: (b := status(c, rid))["status"] == want and b, timeout)


def account(c: httpx.Client) -> dict:
    return c.get("/v1/account", params={"ledger": 100}).json()


def submit(c: httpx.Client, text: str = TEXT, **body) -> str:
    r = c.post(V2, json={"text": text, "output_format": "wav", **body})
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


# --- cancel ------------------------------------------------------------------------------------------------------

def test_cancel_in_each_state(tmp_path, where):
    engine = GatedEngine()
    with server(tmp_path, where, engine, batch_size=1) as s, client(s) as c, client(s) as other:
        running = submit(c)
        wait_status(c, running, "PROCESSING")
        queued = submit(c)
        assert status(c, queued)["status"] == "QUEUED"
        assert account(c)["held"] == 12

        # QUEUED: never runs; its hold is released with the transition
        r = c.post(f"/v2/requests/{queued}/cancel")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "FAILED" and body["cancelled"] is True and body["error"] == "cancelled by the client"
        assert account(c)["held"] == 6
        again = c.post(f"/v2/requests/{queued}/cancel")                   # idempotent
        assert again.status_code == 200 and again.json() == body
        st = c.get(f"/v2/requests/{queued}/status")
        assert st.status_code == 422 and st.json()["cancelled"] is True and st.json()["error"] == body["error"]
        res = c.get(f"/v2/requests/{queued}")
        assert res.status_code == 422 and res.json()["cancelled"] is True and res.json()["output"] is None

        # another key's job is not found
        assert other.post(f"/v2/requests/{running}/cancel").status_code == 404
        assert c.post("/v2/requests/00000000-0000-4000-8000-000000000000/cancel").status_code == 404

        # PROCESSING: FAILED at once, hold released at once; the engine's late result is dropped
        r = c.post(f"/v2/requests/{running}/cancel")
        assert r.status_code == 200 and r.json()["cancelled"] is True
        acc = account(c)
        assert (acc["held"], acc["balance"]) == (0, 100)
        engine.gate.set()
        time.sleep(0.5)
        st = status(c, running)
        assert st["status"] == "FAILED" and st["cancelled"] is True
        assert s.store.get_audio(running) is None
        assert queued not in engine.entered and running in engine.entered

        # COMPLETED: 409, nothing changes
        done = submit(c)
        wait_status(c, done, "COMPLETED")
        r = c.post(f"/v2/requests/{done}/cancel")
        assert r.status_code == 409 and "already finished" in r.json()["error"]
        assert status(c, done)["status"] == "COMPLETED" and "cancelled" not in status(c, done)
        acc = wait_until(lambda: (a := account(c))["held"] == 0 and a)
        assert acc["balance"] == 99                                           # only `done` was charged
        kinds = [(e["job_id"], e["kind"]) for e in acc["ledger"]]
        assert kinds.count((queued, "release")) == 1 and kinds.count((running, "release")) == 1
        assert (queued, "settle") not in kinds and (running, "settle") not in kinds


# --- webhooks ----------------------------------------------------------------------------------------------------

def test_webhook_is_signed_retried_after_a_500_and_delivered(tmp_path, where):
    with WebhookReceiver(answers=[500, 200]) as hook, \
            server(tmp_path, where, allow_fetch_hosts=(hook.allow,), webhook_backoff=0.3) as s, client(s) as c:
        secret = c.get("/v1/account/webhook-secret").json()["secret"]
        rid = submit(c, webhook_url=hook.url)
        assert status(c, rid)["webhook"]["state"] == "pending"
        first, second = hook.wait_for(2)
        assert second.at - first.at >= 0.25                                   # the backoff
        for attempt in (first, second):
            assert attempt.path == "/hook" and attempt.headers["content-type"] == "application/json"
            assert attempt.headers["webhook-id"] == rid
            assert verify(secret, attempt.headers, attempt.body)
            assert not verify(secret, {**attempt.headers, "webhook-id": "other"}, attempt.body)
        sent = second.json()
        result = c.get(f"/v2/requests/{rid}").json()
        assert {k: v for k, v in sent.items() if k != "webhook"} == {k: v for k, v in result.items() if k != "webhook"}
        assert sent["status"] == "COMPLETED" and httpx.get(sent["output"]).status_code == 200
        assert sent["webhook"]["attempts"] == 2
        hooked = wait_until(lambda: (b := status(c, rid))["webhook"]["state"] == "delivered" and b)
        assert hooked["webhook"] == {"state": "delivered", "attempts": 2, "last_status": 200, "last_error": None}
        time.sleep(0.5)
        assert len(hook.received) == 2                                        # nothing after the 200

        # rotation: later deliveries are signed with the new secret only
        new = c.post("/v1/account/webhook-secret/rotate").json()["secret"]
        assert new != secret and c.get("/v1/account/webhook-secret").json()["secret"] == new
        submit(c, webhook_url=hook.url)
        third = hook.wait_for(3)[2]
        assert verify(new, third.headers, third.body) and not verify(secret, third.headers, third.body)


def test_each_key_signs_with_its_own_secret_and_cancel_is_delivered(tmp_path, where):
    engine = GatedEngine()
    with WebhookReceiver() as hook, server(tmp_path, where, engine, allow_fetch_hosts=(hook.allow,)) as s, \
            client(s) as a, client(s) as b:
        secret_a, secret_b = (x.get("/v1/account/webhook-secret").json()["secret"] for x in (a, b))
        assert secret_a != secret_b
        rid = submit(b, webhook_url=hook.url)
        wait_status(b, rid, "PROCESSING")
        assert b.post(f"/v2/requests/{rid}/cancel").status_code == 200
        [got] = hook.wait_for(1)
        engine.gate.set()
        assert verify(secret_b, got.headers, got.body) and not verify(secret_a, got.headers, got.body)
        assert got.json()["status"] == "FAILED" and got.json()["cancelled"] is True


def test_a_slow_receiver_delays_no_other_job_and_a_dead_one_is_given_up(tmp_path, where):
    with WebhookReceiver(delay=4.0) as slow, WebhookReceiver() as fast, WebhookReceiver(answers=[503]) as dead, \
            server(tmp_path, where, allow_fetch_hosts=(slow.allow, fast.allow, dead.allow), webhook_timeout=1.5,
                   webhook_backoff=0.2, webhook_attempts=3) as s, client(s) as c:
        stuck = submit(c, webhook_url=slow.url)
        slow.wait_for(1)                                   # its first attempt now hangs in the receiver
        t0 = time.monotonic()
        quick = submit(c, webhook_url=fast.url)
        fast.wait_for(1, timeout=5)
        assert time.monotonic() - t0 < 3.0
        assert wait_status(c, quick, "COMPLETED")["webhook"]["state"] in ("pending", "delivered")
        st = status(c, stuck)
        assert st["status"] == "COMPLETED" and st["webhook"]["state"] == "pending"
        wait_until(lambda: status(c, stuck)["webhook"]["attempts"] >= 2, timeout=10)
        assert "timed out" in (status(c, stuck)["webhook"]["last_error"] or "")

        gone = submit(c, webhook_url=dead.url)
        hooked = wait_until(lambda: (b := status(c, gone))["webhook"]["state"] == "failed" and b, timeout=15)
        assert hooked["webhook"] == {"state": "failed", "attempts": 3, "last_status": 503, "last_error": None}
        assert len(dead.received) == 3


def test_webhook_url_is_checked_at_submit(tmp_path, where):
    with WebhookReceiver() as hook, server(tmp_path, where, allow_fetch_hosts=(hook.allow,)) as s, client(s) as c:
        for bad, why in [("ftp://example.com/x", "http(s)"), ("http://127.0.0.1:9/x", "loopback"),
                         ("http://10.1.2.3/x", "private"), ("http://[::1]/x", "loopback"),
                         ("http://169.254.169.254/latest", "metadata"), ("http://localhost/x", "loopback"),
                         ("http://2130706433/x", "loopback"), (f"http://127.0.0.1:{hook.port + 1}/x", "loopback"),
                         ("http://user:pw@example.com/x", "credentials"), ("not a url", "http(s)"), ("", "http(s)")]:
            r = c.post(V2, json={"text": TEXT, "webhook_url": bad})
            assert r.status_code == 400, (bad, r.text)
            assert r.json()["error"].startswith("webhook_url:") and why in r.json()["error"], (bad, r.json())
        assert account(c)["held"] == 0
        assert c.post(V2, json={"text": TEXT, "webhook_url": 5}).status_code == 400
        # v1 does not take it (an unknown parameter there, ignored as the hosted API does)
        r = c.post(V1, json={"text": TEXT, "webhook_url": "http://127.0.0.1:9/x"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("audio/")


# --- queue position -------------------------------------------------------------------------------------------------

def test_queue_position_in_status_and_result(tmp_path, where):
    with server(tmp_path, where, workers=0) as s, client(s) as a, client(s) as b:
        a1, a2, a3 = submit(a), submit(a), submit(a)
        b1 = submit(b)
        pos = {rid: status(x, rid)["queue_position"] for x, rid in ((a, a1), (a, a2), (a, a3), (b, b1))}
        assert sorted(pos.values()) == [0, 1, 2, 3]
        assert pos[a1] < pos[a2] < pos[a3] and pos[b1] in (0, 1)             # round robin: b1 in the first round
        assert a.get(f"/v2/requests/{a2}").json()["queue_position"] == pos[a2]
        order = [j.id for _ in range(4) for j in s.store.claim("w", 1, 30)]
        assert order == sorted(pos, key=pos.get)                             # exactly the order claims take
        assert "queue_position" not in status(a, a1)                         # PROCESSING now
        a4, a5 = submit(a), submit(a)
        assert (status(a, a4)["queue_position"], status(a, a5)["queue_position"]) == (0, 1)
        assert a.post(f"/v2/requests/{a4}/cancel").status_code == 200
        assert status(a, a5)["queue_position"] == 0 and "queue_position" not in status(a, a4)


# --- events --------------------------------------------------------------------------------------------------------

def read_events(c: httpx.Client, rid: str, last_id: int | None = None, stop_after: str | None = None,
                comments: list | None = None) -> list[dict]:
    """Parse the event stream; return at its end, or once an event of type `stop_after` arrived (disconnecting)."""
    headers = {} if last_id is None else {"last-event-id": str(last_id)}
    events, current = [], {}
    with c.stream("GET", f"/v2/requests/{rid}/events", headers=headers, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith(":"):
                if comments is not None:
                    comments.append(line)
            elif line == "":
                if "data" in current:
                    current["data"] = json.loads(current["data"])
                    events.append(current)
                    if current.get("event") == stop_after:
                        return events
                current = {}
            else:
                name, _, value = line.partition(":")
                current[name] = value.removeprefix(" ")
    return events


def test_events_stream_resumes_after_a_disconnect(tmp_path, where, monkeypatch):
    monkeypatch.setattr(hosted, "KEEPALIVE_S", 0.3)
    engine = GatedEngine()
    with server(tmp_path, where, engine) as s, client(s) as c:
        rid = submit(c, text="First sentence here. " * 20)                # 420 characters: 2 chunks
        comments: list[str] = []
        head = read_events(c, rid, stop_after="progress", comments=[])     # disconnect mid-way
        assert [(e["id"], e["event"], e["data"].get("status") or e["data"].get("stage")) for e in head] == [
            ("1", "state", "QUEUED"), ("2", "state", "PROCESSING"), ("3", "progress", "synthesizing")]
        assert head[2]["data"] == {"request_id": rid, "stage": "synthesizing", "chunks_done": 0, "chunks_total": 2,
                                   "at": head[2]["data"]["at"]}
        waiting = threading.Thread(target=lambda: read_events(c, rid, last_id=3, comments=comments))
        waiting.start()                                     # a stream idle while the engine runs: keep-alives
        time.sleep(1.0)
        engine.gate.set()
        tail = read_events(c, rid, last_id=3)
        waiting.join(20)
        assert comments and all(x.startswith(": keep-alive") for x in comments)
        assert [(e["id"], e["event"]) for e in tail] == [("4", "progress"), ("5", "state")]
        assert tail[0]["data"]["stage"] == "encoding" and tail[0]["data"]["chunks_done"] == 2
        final = tail[1]["data"]
        result = c.get(f"/v2/requests/{rid}").json()
        assert final["status"] == "COMPLETED" and final["output"] == result["output"]
        assert {k: final[k] for k in result} == result
        whole = read_events(c, rid)                        # from the start, after the end: all, once, then closed
        assert [e["id"] for e in whole] == ["1", "2", "3", "4", "5"]
        assert [e["data"] for e in whole][:3] == [e["data"] for e in head] and whole[3:] == tail
        assert read_events(c, rid, last_id=5) == []        # resumed after the terminal event: ends at once
        assert c.get(f"/v2/requests/{rid}/events", headers={"last-event-id": "x"}).status_code == 400
        with client(s) as other:
            assert other.get(f"/v2/requests/{rid}/events").status_code == 404


def test_events_are_served_by_any_replica(tmp_path, redis_url, redis_prefix):
    """Redis: the worker's replica runs the job, a second API replica (no worker) streams its events."""
    where = {"store": redis_url, "redis_prefix": redis_prefix}
    engine = GatedEngine()
    with server(tmp_path / "one", where, engine) as s, server(tmp_path / "two", where, workers=0) as api, \
            client(s) as c:
        elsewhere = httpx.Client(base_url=api.url, headers=dict(c.headers), timeout=30)
        rid = submit(c)
        head = read_events(elsewhere, rid, stop_after="progress")
        engine.gate.set()
        tail = read_events(elsewhere, rid, last_id=int(head[-1]["id"]))
        ids = [int(e["id"]) for e in head + tail]
        assert ids == list(range(1, len(ids) + 1)) and tail[-1]["data"]["status"] == "COMPLETED"
        elsewhere.close()


# --- idempotency ---------------------------------------------------------------------------------------------------

def test_idempotent_submit_makes_one_job_and_one_charge(tmp_path, where):
    engine = FakeEngineForTests()
    with server(tmp_path, where, engine) as s, client(s) as c, client(s) as other:
        first = c.post(V2, json={"text": TEXT, "output_format": "wav"}, headers={"idempotency-key": "order-17"})
        assert first.status_code == 200 and "idempotent-replayed" not in first.headers
        rid = first.json()["request_id"]
        again = c.post(V2, json={"output_format": "wav", "text": TEXT, "seed": 42},   # same request (42: default)
                       headers={"idempotency-key": "order-17"})
        assert again.status_code == 200 and again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true" and again.headers["x-request-id"] == rid
        wait_status(c, rid, "COMPLETED")
        late = c.post(V2, json={"text": TEXT, "output_format": "wav"}, headers={"idempotency-key": "order-17"})
        assert late.json()["request_id"] == rid                               # also once it finished
        conflict = c.post(V2, json={"text": TEXT + "!", "output_format": "wav"},
                          headers={"idempotency-key": "order-17"})
        assert conflict.status_code == 409 and "different request body" in conflict.json()["error"]
        mine = other.post(V2, json={"text": TEXT, "output_format": "wav"}, headers={"idempotency-key": "order-17"})
        assert mine.status_code == 200 and mine.json()["request_id"] != rid  # keys are per API key
        acc = wait_until(lambda: (a := account(c))["held"] == 0 and a)
        assert [e["kind"] for e in acc["ledger"]] == ["grant", "hold", "settle"] and acc["balance"] == 99
        assert sum(rid in batch for batch in engine.batches) == 1


def test_concurrent_duplicates_create_one_job(tmp_path, where):
    engine = FakeEngineForTests()
    with server(tmp_path, where, engine) as s, client(s) as c:
        barrier = threading.Barrier(8)

        def post(_):
            barrier.wait()
            return c.post(V2, json={"text": TEXT}, headers={"idempotency-key": "same-for-all"})

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, range(8)))
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
        ids = {r.json()["request_id"] for r in answers}
        assert len(ids) == 1
        assert sum(r.headers.get("idempotent-replayed") == "true" for r in answers) == 7
        wait_status(c, ids.pop(), "COMPLETED")
        acc = wait_until(lambda: (a := account(c))["held"] == 0 and a)
        assert [e["kind"] for e in acc["ledger"]] == ["grant", "hold", "settle"]
        assert len(engine.batches) == 1


def test_idempotent_v1_and_bad_keys(tmp_path, where):
    engine = FakeEngineForTests()
    with server(tmp_path, where, engine) as s, client(s) as c:
        one = c.post(V1, json={"text": TEXT, "output_format": "wav"}, headers={"idempotency-key": "sync-1"})
        two = c.post(V1, json={"text": TEXT, "output_format": "wav"}, headers={"idempotency-key": "sync-1"})
        assert one.status_code == two.status_code == 200 and one.content == two.content
        assert one.headers["x-request-id"] == two.headers["x-request-id"] and two.headers["idempotent-replayed"] == "true"
        assert len(engine.batches) == 1
        for bad in ("k" * 256, b"caf\xc3\xa9", ""):
            r = c.post(V2, json={"text": TEXT}, headers={"idempotency-key": bad})
            assert r.status_code == 400 and "Idempotency-Key" in r.json()["error"], (bad, r.text)
        assert c.post(V2, json={"text": TEXT}, headers={"idempotency-key": "k" * 255}).status_code == 200
        acc = wait_until(lambda: (a := account(c))["held"] == 0 and a)
        assert [e["kind"] for e in acc["ledger"]].count("hold") == 2


def test_a_refused_submission_frees_its_idempotency_key(tmp_path, where):
    with server(tmp_path, where) as s, client(s, credits=0) as c:
        r = c.post(V2, json={"text": TEXT}, headers={"idempotency-key": "retry-me"})
        assert r.status_code == 406                                   # nothing queued: the key is free again
        acc_id = account(c)["id"]
        s.accounts.store.adjust(acc_id, 10, "top-up")
        r = c.post(V2, json={"text": TEXT}, headers={"idempotency-key": "retry-me"})
        assert r.status_code == 200 and "idempotent-replayed" not in r.headers
        again = c.post(V2, json={"text": TEXT}, headers={"idempotency-key": "retry-me"})
        assert again.json()["request_id"] == r.json()["request_id"] and again.headers["idempotent-replayed"] == "true"
