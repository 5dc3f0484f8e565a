"""Accounts over HTTP, against the real app on a real socket (uvicorn in a thread) with an engine double:
401/403/406/429, x-remaining-credits, isolation, the admin API, settle/release by the worker, the race for the
last credits, and the repair of a crash between hold and settle."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from chatterbox_serverless.accounts import open_account_store
from chatterbox_serverless.accounts.service import Accounts
from chatterbox_serverless.service import announce_auth, is_loopback
from chatterbox_serverless.jobs.sqlite_store import SQLiteJobStore
from chatterbox_serverless.jobs.store import Job
from chatterbox_serverless.settings import Settings
from chatterbox_serverless.testing import ServerWithKeys, SilentEngineForTests

RATE = 16000
TEXT = "x" * 40            # hold: 40/10 + 2 = 6 s -> 6 credits; audio: 40/20 = 2 s -> 2 credits


@pytest.fixture
def server(tmp_path):
    with ServerWithKeys(tmp_path / "data") as s:
        yield s


def assert_error(r: httpx.Response, status: int, contains: str = "") -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    assert contains.lower() in body["error"].lower(), body


def test_401_missing_or_unknown_key(server):
    for headers in ({}, {"x-api-key": "cbx_not-a-key"}, {"authorization": "Bearer nope"}, {"authorization": "Basic x"}):
        assert_error(server.http.post("/v2/chatterbox-tts", json={"text": "hi"}, headers=headers), 401)
        assert_error(server.http.get("/v2/requests/0b0e9d6c-0000-4000-8000-000000000000/status", headers=headers), 401)
        assert_error(server.http.get("/v1/account", headers=headers), 401)
    r = server.http.post("/v1/chatterbox-tts", json={"text": "hi"})
    assert_error(r, 401, "x-api-key")
    assert r.headers.get("www-authenticate") == "Bearer"
    key = server.key()
    assert server.http.get("/v1/account", headers={"authorization": f"Bearer {key}"}).status_code == 200
    assert server.submit(None, authorization=f"Bearer {key}").status_code == 200
    # public endpoints stay public
    assert server.http.get("/health").status_code == 200


def test_403_revoked_and_non_admin(server):
    key, admin = server.key(), server.key(admin=True)
    assert_error(server.http.get("/v1/admin/keys", headers={"x-api-key": key}), 403, "admin")
    assert_error(server.http.post("/v1/admin/keys", json={}, headers={"x-api-key": key}), 403, "admin")
    acc_id = server.account(key)["id"]
    r = server.http.post(f"/v1/admin/keys/{acc_id}/revoke", headers={"x-api-key": admin})
    assert r.status_code == 200 and r.json()["revoked"] is True
    assert_error(server.submit(key), 403, "revoked")
    assert_error(server.http.get("/v1/account", headers={"x-api-key": key}), 403, "revoked")


def test_406_insufficient_credits_queues_nothing(server):
    key = server.key(credits=5)                            # TEXT holds 6
    r = server.submit(key)
    assert_error(r, 406, "insufficient credits")
    assert r.headers["x-remaining-credits"] == "5"
    assert sum(server.store.stats().by_state.values()) == 0, "nothing may be queued that cannot be paid"
    r = server.http.post("/v1/chatterbox-tts", json={"text": TEXT}, headers={"x-api-key": key})
    assert_error(r, 406)
    assert sum(server.store.stats().by_state.values()) == 0
    ok = server.submit(key, "short")                       # holds 3
    assert ok.status_code == 200 and ok.headers["x-remaining-credits"] == "2"


def test_429_rate_limit_but_polls_are_not_limited(server):
    key = server.key(rate=2)
    first = server.submit(key)
    assert first.status_code == 200 and server.submit(key).status_code == 200
    r = server.submit(key)
    assert_error(r, 429, "rate limit")
    assert 1 <= int(r.headers["retry-after"]) <= 30
    rid = first.json()["request_id"]
    for _ in range(30):                                    # far above 1 poll/s: never limited
        assert server.http.get(f"/v2/requests/{rid}/status", headers={"x-api-key": key}).status_code in (200, 422)
        assert server.http.get(f"/v2/requests/{rid}", headers={"x-api-key": key}).status_code in (200, 422)
    assert server.account(key)["rate_per_min"] == 2


def test_settle_on_completion_release_on_failure(server):
    key = server.key(credits=100)
    r = server.submit(key)
    assert r.status_code == 200 and r.headers["x-remaining-credits"] == "94"       # 6 held
    done = server.wait(key, r.json()["request_id"])
    assert done.json()["status"] == "COMPLETED" and done.json()["metrics"]["audio_seconds"] == pytest.approx(2.0)
    assert server.settled(key)["balance"] == 98                                 # charged 2 s
    done = server.http.get(f"/v2/requests/{r.json()['request_id']}", headers={"x-api-key": key})
    assert done.headers["x-remaining-credits"] == "98"
    failed = server.wait(key, server.submit(key, "please fail " + TEXT).json()["request_id"])
    assert failed.status_code == 422 and failed.json()["error"] == "fake engine: this text cannot be spoken"
    acc = server.settled(key)
    assert (acc["balance"], acc["held"], acc["available"]) == (98, 0, 98), "failed jobs are not billed"
    assert acc["usage"]["completed"] == 1 and acc["usage"]["failed"] == 1
    assert acc["usage"]["audio_seconds"] == pytest.approx(2.0) and acc["usage"]["credits_spent"] == 2
    kinds = [(e["kind"], e["delta"]) for e in acc["ledger"]]
    assert kinds == [("grant", 100), ("hold", 0), ("settle", -2), ("hold", 0), ("release", 0)]
    # v1 (sync) pays the same way
    r = server.http.post("/v1/chatterbox-tts", json={"text": TEXT, "output_format": "wav"}, headers={"x-api-key": key})
    assert r.status_code == 200 and r.headers["content-type"].startswith("audio/")
    assert server.settled(key)["balance"] == 96


def test_isolation_between_keys(server):
    a, b = server.key(), server.key()
    rid = server.submit(a).json()["request_id"]
    assert server.wait(a, rid).json()["status"] == "COMPLETED"
    for path in (f"/v2/requests/{rid}/status", f"/v2/requests/{rid}"):
        assert_error(server.http.get(path, headers={"x-api-key": b}), 404)       # 404, not 403
        assert server.http.get(path, headers={"x-api-key": a}).status_code == 200
    output = server.http.get(f"/v2/requests/{rid}", headers={"x-api-key": a}).json()["output"]
    assert "signature=" in output and len(rid) == 36
    assert_error(server.http.get(output.split("?")[0]), 403)                       # no signature, no audio


def test_admin_api(server):
    admin = server.key(admin=True)
    h = {"x-api-key": admin}
    r = server.http.post("/v1/admin/keys", json={"name": "app", "credits": 10, "rate_per_min": 5}, headers=h)
    assert r.status_code == 201, r.text
    new_key, acc = r.json()["key"], r.json()["account"]
    assert (acc["name"], acc["balance"], acc["rate_per_min"], acc["admin"]) == ("app", 10, 5, False)
    assert "key_hash" not in acc and server.account(new_key)["id"] == acc["id"]
    r = server.http.post(f"/v1/admin/keys/{acc['id']}/credits", json={"amount": 15, "note": "top-up"}, headers=h)
    assert r.status_code == 200 and r.json()["balance"] == 25
    assert_error(server.http.post(f"/v1/admin/keys/{acc['id']}/credits", json={"amount": -26}, headers=h), 406)
    assert_error(server.http.post(f"/v1/admin/keys/{acc['id']}/credits", json={"amount": "5"}, headers=h), 400,
                 "amount")
    assert_error(server.http.post("/v1/admin/keys", content=b"{oops", headers={**h, "content-type": "application/json"}),
                 400)
    assert_error(server.http.post("/v1/admin/keys", content=b"{}", headers=h), 415, "application/json")
    assert_error(server.http.post("/v1/admin/keys/acc_missing/revoke", headers=h), 404)
    server.wait(new_key, server.submit(new_key).json()["request_id"])
    server.settled(new_key)
    rows = server.http.get("/v1/admin/keys", headers=h).json()
    row = next(x for x in rows if x["id"] == acc["id"])
    assert row["usage"]["completed"] == 1 and row["balance"] == 23
    one = server.http.get(f"/v1/admin/keys/{acc['id']}", headers=h).json()
    assert [e["note"] for e in one["ledger"] if e["kind"] == "grant"] == ["initial credits", "top-up"]
    assert new_key not in r.text and new_key not in str(rows)
    later = server.http.get("/v1/admin/keys", params={"since": time.time() + 60}, headers=h).json()
    assert next(x for x in later if x["id"] == acc["id"])["usage"]["completed"] == 0
    assert_error(server.http.get("/v1/account", params={"ledger": "many"}, headers=h), 400, "ledger")


def test_openapi_documents_the_key(server):
    spec = server.http.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {**schemes["ApiKey"], "type": "apiKey", "in": "header", "name": "x-api-key"}
    for path, method in (("/v2/chatterbox-tts", "post"), ("/v2/requests/{request_id}/status", "get"),
                         ("/v1/account", "get"), ("/v1/admin/keys", "post")):
        assert {"ApiKey": []} in spec["paths"][path][method]["security"], path


def test_concurrent_submissions_race_for_the_last_credits(tmp_path):
    """20 submissions at once for credits that pay 3 holds: exactly 3 are queued, the rest get 406; the balance
    never goes negative and each job is charged once."""
    with ServerWithKeys(tmp_path / "data", engine=SilentEngineForTests(delay=0.05)) as s:
        key = s.key(credits=18)                            # 3 x 6
        barrier = threading.Barrier(20)

        def go(_):
            with httpx.Client(base_url=s.url, timeout=20) as c:
                barrier.wait()
                return c.post("/v2/chatterbox-tts", json={"text": TEXT, "output_format": "wav"},
                              headers={"x-api-key": key})
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(go, range(20)))
        codes = sorted(r.status_code for r in answers)
        assert codes == [200] * 3 + [406] * 17, codes
        assert all(int(r.headers["x-remaining-credits"]) >= 0 for r in answers)
        for r in answers:
            if r.status_code == 200:
                assert s.wait(key, r.json()["request_id"]).json()["status"] == "COMPLETED"
        acc = s.settled(key)
        assert (acc["balance"], acc["held"]) == (18 - 3 * 2, 0)
        assert acc["usage"]["completed"] == 3 and acc["usage"]["credits_spent"] == 6
        assert sum(s.store.stats().by_state.values()) == 3


def test_crash_between_hold_and_settle_is_repaired_on_restart(tmp_path):
    data = tmp_path / "data"
    # 1) an API without a worker accepts two jobs (held); a third hold never got its job stored
    with ServerWithKeys(data, workers=0) as s:
        key = s.key(credits=100)
        ok, bad = (s.submit(key).json()["request_id"], s.submit(key, "fail " + TEXT).json()["request_id"])
        acc_id = s.account(key)["id"]
        s.accounts.store.hold(acc_id, "lost-before-submit", 6, now=time.time() - 3600)
        assert s.account(key)["held"] == 6 + 7 + 6
    # 2) a worker that dies between finishing a job and billing it: the jobs end, the holds stay open
    store = SQLiteJobStore(data / "jobs.sqlite3")
    jobs = {j.id: j for j in store.claim("crashing-worker", 10, 30.0)}
    assert set(jobs) == {ok, bad}
    store.complete(ok, "crashing-worker", b"RIFF", "audio/wav", {"audio_seconds": 2.0})
    store.fail(bad, "crashing-worker", "fake engine: this text cannot be spoken")
    store.close()
    # 3) restart: the start-up reconcile settles the completed job and releases the failed and the lost one
    with ServerWithKeys(data) as s:
        acc = s.settled(key)
        assert (acc["balance"], acc["held"]) == (98, 0)
        notes = [e["note"] for e in acc["ledger"] if e["kind"] == "release"]
        assert len(notes) == 2 and any("missing" in n for n in notes)
        assert sum(e["delta"] for e in acc["ledger"]) == acc["balance"]


def test_no_auth_mode(tmp_path, caplog):
    with ServerWithKeys(tmp_path / "data", auth=False) as s:
        r = s.submit(None)
        assert r.status_code == 200 and "x-remaining-credits" not in r.headers
        assert s.wait("", r.json()["request_id"]).json()["status"] == "COMPLETED"
        assert_error(s.http.get("/v1/admin/keys"), 404, "--no-auth")
        assert_error(s.http.get("/v1/account"), 404, "--no-auth")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.com")
    with caplog.at_level("WARNING"):
        announce_auth(starting(None, tmp_path, "0.0.0.0"))
    assert "OFF" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        announce_auth(starting(None, tmp_path, "127.0.0.1"))
    assert "OFF" not in caplog.text


def starting(accounts, data_dir, host: str = "127.0.0.1"):
    """What announce_auth reads of a service about to serve."""
    from types import SimpleNamespace
    return SimpleNamespace(accounts=accounts, settings=Settings(data_dir=data_dir, host=host))


def test_first_start_makes_one_admin_key(tmp_path, capsys):
    store = open_account_store(tmp_path)
    accounts = Accounts(store)
    try:
        admin_key = announce_auth(starting(accounts, tmp_path))
        err = capsys.readouterr().err
        assert admin_key and admin_key in err and f"keys create --data-dir {tmp_path}" in err
        assert accounts.authenticate(admin_key, admin=True).admin
        assert announce_auth(starting(accounts, tmp_path)) is None
        assert admin_key not in capsys.readouterr().err
    finally:
        store.close()


def test_job_owner_is_the_account(server):
    key = server.key()
    rid = server.submit(key).json()["request_id"]
    job: Job = server.store.get(rid)
    assert job.owner == server.account(key)["id"]


def test_serve_opens_accounts_beside_the_job_store(tmp_path):
    from chatterbox_serverless.service import ServiceError, open_accounts

    settings = Settings(data_dir=tmp_path, price_per_second=2.0, min_price=3)
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    try:
        accounts = open_accounts(settings, store)
        assert accounts is not None and accounts.pricing.cost(1.0) == 3 and accounts.store.count() == 0
        accounts.store.close()
        assert open_accounts(Settings(data_dir=tmp_path, no_auth=True), store) is None
    finally:
        store.close()
    with pytest.raises(ValueError, match="--price-per-second"):
        Settings(data_dir=tmp_path, price_per_second=-1.0)

    class JobStoreWithoutAccountsForTests:      # a job store with no account store beside it: refuse to start
        pass
    with pytest.raises(ServiceError, match="--no-auth"):
        open_accounts(settings, JobStoreWithoutAccountsForTests())
