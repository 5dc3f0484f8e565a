"""Durability: a server subprocess (the real serve code path, FakeEngineForTests) is SIGKILLed mid-way and
restarted on the same data dir: every accepted job still ends terminal, each completed exactly once. SIGTERM
stops gracefully: in-flight work finishes or goes back to the queue, nothing is left PROCESSING."""
from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from chatterbox_serverless import testing
from chatterbox_serverless.accounts import open_account_store
from chatterbox_serverless.accounts.service import Accounts

V2 = "/v2/chatterbox-tts"


def spawn(data_dir: Path, delay: float, lease: float = 1.5) -> tuple[subprocess.Popen, str]:
    """The real `serve` command in a subprocess (FakeEngineForTests as its engine), on `data_dir`."""
    return testing.spawn("serve", ["--data-dir", str(data_dir), "--no-auth", "--lease-seconds", str(lease),
                                   "--batch-size", "4", "--max-queue", "10000", "--shutdown-grace", "5",
                                   "--log-level", "warning"], fake_delay=delay)


def states(data_dir: Path) -> dict[str, str]:
    with sqlite3.connect(data_dir / "jobs.sqlite3") as db:
        return dict(db.execute("SELECT id, state FROM jobs"))


def finish_all(url: str, ids: list[str], timeout: float = 60) -> dict[str, dict]:
    done: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url) as c:
        while len(done) < len(ids) and time.monotonic() < deadline:
            for rid in ids:
                if rid not in done:
                    body = c.get(f"/v2/requests/{rid}/status").json()
                    if body["status"] in ("COMPLETED", "FAILED"):
                        done[rid] = body
            time.sleep(0.1)
    return done


def test_sigkill_mid_way_then_restart_finishes_every_job_once(tmp_path):
    data = tmp_path / "data"
    proc, url = spawn(data, delay=0.15)
    try:
        with httpx.Client(base_url=url) as c:
            ids = [c.post(V2, json={"text": f"job number {i}", "seed": i}).json()["request_id"] for i in range(40)]
        # kill it once some, but not all, jobs are done
        deadline = time.monotonic() + 30
        while sum(s == "COMPLETED" for s in states(data).values()) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed_at = time.time()
    finally:
        if proc.poll() is None:
            proc.kill()
    before = states(data)
    assert len(before) == 40 and "COMPLETED" in before.values()
    assert any(s in ("QUEUED", "PROCESSING") for s in before.values())

    proc, url = spawn(data, delay=0.0)
    try:
        done = finish_all(url, ids)
        assert len(done) == 40, f"{40 - len(done)} jobs never finished"
        assert all(b["status"] == "COMPLETED" for b in done.values()), \
            [b for b in done.values() if b["status"] != "COMPLETED"][:3]
        with httpx.Client(base_url=url) as c:
            for rid in ids[:5]:
                out = c.get(f"/v2/requests/{rid}").json()["output"]
                assert c.get(out).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    # completed exactly once: one stored audio file per job; any other file is a write the SIGKILL interrupted
    # before its commit (an orphan the store sweeps later), never a second completion after the restart
    with sqlite3.connect(data / "jobs.sqlite3") as db:
        assert db.execute("SELECT MAX(attempts) FROM jobs").fetchone()[0] <= 2
        referenced = dict(db.execute("SELECT audio_file, id FROM jobs"))
    assert sorted(referenced.values()) == sorted(ids)
    files = [p for p in (data / "audio").iterdir()]
    assert set(referenced) <= {p.name for p in files}
    orphans = [p for p in files if p.name not in referenced]
    assert len(orphans) <= 4 and all(p.stat().st_mtime <= killed_at for p in orphans)


def test_sigterm_finishes_or_requeues_in_flight_jobs(tmp_path):
    data = tmp_path / "data"
    proc, url = spawn(data, delay=0.5)
    try:
        with httpx.Client(base_url=url) as c:
            ids = [c.post(V2, json={"text": f"graceful {i}"}).json()["request_id"] for i in range(12)]
        deadline = time.monotonic() + 10
        while "PROCESSING" not in states(data).values() and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal: the exit status is -SIGTERM by design
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    after = states(data)
    assert "PROCESSING" not in after.values()
    assert "COMPLETED" in after.values()        # the batch in hand was finished
    if "QUEUED" in after.values():
        proc, url = spawn(data, delay=0.0)
        try:
            done = finish_all(url, ids)
            assert len(done) == 12 and all(b["status"] == "COMPLETED" for b in done.values())
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


@pytest.mark.parametrize("n", [3])
def test_attempts_are_bounded_when_a_job_keeps_killing_its_worker(tmp_path, n):
    """A job whose worker dies every time ends FAILED with a reason after max_attempts (3), not forever."""
    from chatterbox_serverless.jobs.sqlite_store import SQLiteJobStore
    from chatterbox_serverless.jobs.store import Job, JobState

    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    store.submit(Job(id="poison", owner="", params={"text": "x"}), 10)
    for _ in range(n):
        assert [j.id for j in store.claim("doomed-worker", 1, 0.01)] == ["poison"]
        time.sleep(0.02)
        store.recover_expired(max_attempts=n)
    job = store.get("poison")
    assert job.state == JobState.FAILED and "interrupted 3 times" in job.error
    store.close()


# --- a real crash: SIGKILL the server process while jobs are held, restart it ------------------------------------
def spawn_server(data_dir: Path, delay: float):
    """The real `serve` command (keys on) in a subprocess, with SilentEngineForTests' behaviour."""
    return testing.spawn("serve", ["--data-dir", str(data_dir), "--lease-seconds", "1", "--batch-size", "4",
                           "--batch-wait", "0", "--shutdown-grace", "2", "--log-level", "warning"],
                 fake={"delay": delay, "sample_rate": 16000, "fail_marker": "fail", "seconds_per_char": 1 / 20,
                       "base_seconds": 0.0, "max_seconds": 1e9, "amplitude": 0.0})


def test_sigkill_while_jobs_are_held_then_restart(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    store = open_account_store(data)
    key, acc = Accounts(store).create_key(credits=10_000, rate_per_min=0)
    h = {"x-api-key": key}
    proc, url = spawn_server(data, delay=0.15)
    ids = []
    try:
        for i in range(24):
            text = ("fail " if i % 5 == 0 else "") + "y" * (20 + 10 * i)
            r = httpx.post(url + "/v2/chatterbox-tts", json={"text": text, "output_format": "wav"}, headers=h)
            assert r.status_code == 200, r.text
            ids.append(r.json()["request_id"])
        deadline = time.time() + 10
        while not store.usage(acc.id).completed and time.time() < deadline:
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    assert store.holds(), "the kill should leave jobs held"
    proc, url = spawn_server(data, delay=0.0)
    try:
        deadline = time.time() + 30
        while (store.holds() or any(httpx.get(f"{url}/v2/requests/{j}/status", headers=h).json()["status"]
                                    not in ("COMPLETED", "FAILED") for j in ids)) and time.time() < deadline:
            time.sleep(0.1)
        jobs = [httpx.get(f"{url}/v2/requests/{j}", headers=h).json() for j in ids]
    finally:
        proc.terminate()
        proc.wait(20)
    assert not store.holds() and all(j["status"] in ("COMPLETED", "FAILED") for j in jobs)
    expected = sum(max(1, -(-round(j["metrics"]["audio_seconds"] * 1000) // 1000)) for j in jobs
                   if j["status"] == "COMPLETED")
    a = store.get(acc.id)
    assert (a.balance, a.held) == (10_000 - expected, 0)
    entries = store.ledger(acc.id, limit=0)
    for j in ids:       # one hold, then exactly one settle or release, per job
        kinds = [e.kind for e in entries if e.job_id == j]
        assert kinds in (["hold", "settle"], ["hold", "release"]), (j, kinds)
    assert sum(e.delta for e in entries) == a.balance
    store.close()
