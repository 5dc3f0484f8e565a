"""jobs/webhooks.py without HTTP: the signature (Standard Webhooks' reference vector), the receiver's check, the
URL rules at submit, the server-wide secret of --no-auth, and the dispatcher's outcomes against a real store."""
from __future__ import annotations

import os
import stat
import threading
import time
import uuid

import pytest

from chatterbox_serverless.jobs.sqlite_store import SQLiteJobStore
from chatterbox_serverless.jobs.store import Job
from chatterbox_serverless.jobs.webhooks import (EXPIRED, SECRET_ENV, ServerSecret, WebhookDispatcher,
                                                 WebhookUrlError, check_webhook_url, retry_delay, sign, verify)
from chatterbox_serverless.media import FetchError
from chatterbox_serverless.media.fetch import AllowList


def test_signature_is_the_standard_webhooks_one():
    # the reference example of the Standard Webhooks specification
    assert sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
                b'{"test": 2432232314}') == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_verify_checks_signature_id_body_and_age():
    secret, body, now = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", b'{"a": 1}', int(time.time())
    headers = {"webhook-id": "r1", "webhook-timestamp": str(now), "webhook-signature": sign(secret, "r1", now, body)}
    assert verify(secret, headers, body)
    assert not verify(secret, headers, body + b" ")
    assert not verify(secret, {**headers, "webhook-id": "r2"}, body)
    assert not verify("whsec_" + "A" * 44, headers, body)
    assert not verify(secret, headers, body, now=now + 301)                       # too old
    assert verify(secret, {**headers, "webhook-signature": "v1,bm9wZQ== " + headers["webhook-signature"]}, body)
    assert not verify(secret, {"webhook-id": "r1"}, body)


def test_webhook_urls_follow_the_reference_audio_rules():
    allow = AllowList(["127.0.0.1:8080"])
    assert check_webhook_url(" https://example.com/hooks?x=1 ", allow) == "https://example.com/hooks?x=1"
    assert check_webhook_url("http://127.0.0.1:8080/hook", allow) == "http://127.0.0.1:8080/hook"
    for bad in ("http://127.0.0.1:8081/hook", "http://0x7f.1/", "http://[::ffff:10.0.0.1]/", "gopher://x/",
                "https://user:pw@example.com/", "http:///nohost", None, 7):
        with pytest.raises(WebhookUrlError, match=r"^webhook_url: "):
            check_webhook_url(bad, allow)
    assert check_webhook_url("http://127.0.0.1:8080/x", ["127.0.0.1:8080"])      # a plain list works too


def test_server_secret_is_made_once_kept_private_and_rotated(tmp_path, monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    secret = ServerSecret(tmp_path)
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(ServerSecret(tmp_path).get())) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1 and got[0].startswith("whsec_") and secret.get() == got[0]
    assert stat.S_IMODE(os.stat(tmp_path / "webhook-secret").st_mode) == 0o600
    new = secret.rotate()
    assert new != got[0] and ServerSecret(tmp_path).get() == new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["webhook-secret"]       # no temporary file left
    monkeypatch.setenv(SECRET_ENV, "from-the-environment")
    assert secret.get().startswith("whsec_") and secret.get() == ServerSecret(tmp_path / "other").get()
    with pytest.raises(ValueError, match=SECRET_ENV):
        secret.rotate()


def test_retry_delays_double():
    assert [retry_delay(n, 25) for n in range(1, 8)] == [25, 50, 100, 200, 400, 800, 1600]
    assert sum(retry_delay(n, 25) for n in range(1, 8)) / 60 == pytest.approx(52.9, abs=0.1)


@pytest.fixture
def store(tmp_path):
    s = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    yield s
    s.close()


def ended(store, url: str = "https://example.com/hook") -> Job:
    job = Job(id=str(uuid.uuid4()), owner="acc_1", params={"text": "x"}, webhook_url=url,
              base_url="https://api.example.com")
    store.submit(job, 100)
    store.fail(job.id, None, "no")
    return job


def dispatcher(store, post, **kw) -> WebhookDispatcher:
    kw.setdefault("secret_for", lambda owner: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    return WebhookDispatcher(store, render=lambda job: b'{"request_id": "%s"}' % job.id.encode(), post=post,
                             **{"attempts": 3, "backoff": 0.05, **kw})


def run_once(d: WebhookDispatcher) -> list[str]:
    [delivery] = d.store.claim_webhooks(d.claimer_id, 1, d.lease_seconds, d.attempts)
    return [d.attempt(delivery)]


def test_outcomes_are_recorded(store):
    job = ended(store)
    answers = iter([500, 302])
    sent: list[dict] = []
    d = dispatcher(store, lambda url, body, headers: sent.append(headers) or next(answers))
    assert run_once(d) == ["retry"]
    assert store.get(job.id).webhook == {"state": "pending", "attempts": 1, "last_status": 500, "last_error": None}
    time.sleep(0.06)
    assert run_once(d) == ["retry"]                              # a redirect is not followed: tried again
    time.sleep(0.11)

    def refused(url, body, headers):
        raise FetchError("refused: host 'x' resolves to a private address")
    d.post = refused
    assert run_once(d) == ["failed"]                             # out of attempts
    assert store.get(job.id).webhook == {"state": "failed", "attempts": 3, "last_status": None,
                                         "last_error": "refused: host 'x' resolves to a private address"}
    assert [h["webhook-id"] for h in sent] == [job.id, job.id]
    assert all(verify(d.secret_for(""), h, b'{"request_id": "%s"}' % job.id.encode()) for h in sent)


def test_no_retry_past_the_results_expiry_and_none_for_an_expired_job(store):
    job = ended(store)
    d = dispatcher(store, lambda *a: 503, backoff=10.0, retention_seconds=5.0)
    assert run_once(d) == ["failed"]                             # the next attempt would come after the expiry
    gone = ended(store)
    d = dispatcher(store, lambda *a: 200)
    [delivery] = store.claim_webhooks(d.claimer_id, 1, 30, 3)
    store.retention_seconds = 0.0                                # the result has expired meanwhile
    time.sleep(0.01)
    assert d.attempt(delivery) == "failed"
    store.retention_seconds = 3600.0
    assert store.get(gone.id).webhook["last_error"] == EXPIRED
    assert store.get(job.id).webhook["last_status"] == 503


def test_the_servers_own_errors_are_not_shown(store):
    job = ended(store)

    def broken_secret(owner):
        raise RuntimeError("redis at 10.0.0.5:6379 is down")
    d = dispatcher(store, lambda *a: 200, secret_for=broken_secret)
    run_once(d)
    assert store.get(job.id).webhook["last_error"] == "the server could not prepare this attempt"
    time.sleep(0.06)

    def crash(*a):
        raise OSError("/srv/data/secret: permission denied")
    d = dispatcher(store, crash)
    run_once(d)
    assert store.get(job.id).webhook["last_error"] == "the request could not be made"


def test_a_running_dispatcher_delivers_what_is_due(store):
    jobs = [ended(store) for _ in range(5)]
    seen: list[str] = []
    d = dispatcher(store, lambda url, body, headers: seen.append(headers["webhook-id"]) or 204, poll_interval=0.05)
    d.start()
    try:
        deadline = time.monotonic() + 10
        while not all(store.get(j.id).webhook["state"] == "delivered" for j in jobs) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        d.stop()
    assert sorted(seen) == sorted(j.id for j in jobs)
    assert all(store.get(j.id).webhook == {"state": "delivered", "attempts": 1, "last_status": 204,
                                           "last_error": None} for j in jobs)
