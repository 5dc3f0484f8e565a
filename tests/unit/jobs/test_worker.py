"""The worker and its batch claimer without HTTP: batching, isolation, leases, graceful stop, a full disk."""
from __future__ import annotations

import errno
import threading
import time

import numpy as np
import pytest

from chatterbox_serverless.engine.contract import VoiceAudio
from chatterbox_serverless.jobs.policy import ContentPolicy
from chatterbox_serverless.jobs.batching import BatchClaimer
from chatterbox_serverless.jobs.sqlite_store import SQLiteJobStore
from chatterbox_serverless.jobs.store import Job, JobState
from chatterbox_serverless.jobs.worker import Worker
from chatterbox_serverless.media import encode_audio

from conftest import FakeEngineForTests, wait_until


@pytest.fixture
def store(tmp_path):
    s = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    yield s
    s.close()


def add(store, n: int, text: str = "hello", owner: str = "", **params) -> list[str]:
    ids = []
    for i in range(n):
        job = Job(id=f"{owner}{text}-{i}-{time.monotonic_ns()}", owner=owner,
                  params={"text": f"{text} {i}", "output_format": "wav", **params})
        store.submit(job, 1000)
        ids.append(job.id)
    return ids


def make_worker(store, engine, **kw) -> Worker:
    kw.setdefault("batch_wait", 0.0)
    kw.setdefault("poll_interval", 0.01)
    return Worker(store, engine, encode=encode_audio, **kw)


def test_claimer_fills_a_batch_within_the_wait(store):
    add(store, 2)
    sched = BatchClaimer(store, "w", batch_size=4, batch_wait=0.5)
    threading.Timer(0.1, lambda: (add(store, 3), sched.notify())).start()
    t0 = time.monotonic()
    batch = sched.next_batch()
    assert len(batch) == 4 and time.monotonic() - t0 < 0.45
    assert sched.next_batch() and not sched.next_batch()


def test_worker_batches_and_completes_everything(store):
    engine = FakeEngineForTests(delay=0.05)
    ids = add(store, 10)
    w = make_worker(store, engine, batch_size=4)
    w.start()
    try:
        wait_until(lambda: all(store.get(i).state == JobState.COMPLETED for i in ids))
    finally:
        w.stop()
    assert max(len(b) for b in engine.batches) == 4
    job = store.get(ids[0])
    assert job.metrics["batch_size"] >= 1 and job.metrics["audio_seconds"] > 0 and job.media_type == "audio/wav"
    assert store.stats().workers.get(w.worker_id) is not None


def test_policy_reference_and_engine_failures_are_isolated(store):
    def resolve(value: str) -> VoiceAudio:
        if value == "bad":
            raise ValueError("reference_audio: cannot decode")
        return VoiceAudio(np.zeros(16000, np.float32), 16000)

    ok = add(store, 2)
    blocked = add(store, 1, text="say the secret word")
    bad_ref = add(store, 1, reference_audio="bad")
    good_ref = add(store, 1, reference_audio="good")
    failing = add(store, 1, text="FAIL-ME")
    w = make_worker(store, FakeEngineForTests(), batch_size=8, resolve_reference=resolve,
                    policy=ContentPolicy(["secret word"]))
    w.process(store.claim(w.worker_id, 8, 30))
    assert [store.get(i).state for i in ok + good_ref] == [JobState.COMPLETED] * 3
    assert store.get(blocked[0]).error.startswith("content policy")
    assert store.get(bad_ref[0]).error == "reference_audio: cannot decode"
    assert store.get(failing[0]).error == "fake engine: this text cannot be spoken"


def test_heartbeat_keeps_a_long_batch_leased(store):
    ids = add(store, 1)
    w = make_worker(store, FakeEngineForTests(delay=1.2), lease_seconds=0.4)
    w.start()
    try:
        wait_until(lambda: store.get(ids[0]).state == JobState.PROCESSING)
        time.sleep(0.8)                          # longer than the lease: only heartbeats keep it
        assert store.recover_expired(3) == 0
        wait_until(lambda: store.get(ids[0]).state == JobState.COMPLETED, timeout=5)
    finally:
        w.stop()


def test_stop_releases_jobs_it_could_not_finish(store):
    ids = add(store, 3)
    w = make_worker(store, FakeEngineForTests(delay=2.0), batch_size=3)
    w.start()
    wait_until(lambda: store.get(ids[0]).state == JobState.PROCESSING)
    w.stop(grace=0.2)
    jobs = [store.get(i) for i in ids]
    assert all(j.state == JobState.QUEUED and j.attempts == 0 for j in jobs)
    time.sleep(2.2)                              # the abandoned engine call ends: its results are dropped
    assert all(store.get(i).state == JobState.QUEUED for i in ids)


def test_a_full_disk_hands_the_job_back_without_its_path(store, monkeypatch):
    """Storing the result fails: the jobs go back for a later attempt (after a backoff), nothing of the server
    (the OS error, its path) is written in them, no partial file is left, and the worker stops claiming until
    storage works again."""
    ids = add(store, 2)

    def no_space(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    import chatterbox_serverless.jobs.sqlite_store as sqlite_store
    monkeypatch.setattr(sqlite_store, "write_atomically", no_space)
    w = make_worker(store, FakeEngineForTests(), batch_size=2)
    w.process(store.claim(w.worker_id, 2, 30))
    for i in ids:
        job = store.get(i)
        assert job.state == JobState.PROCESSING and job.worker_id is None and job.error is None
        assert job.lease_until >= time.time() + 25              # its backoff: the lease length (30 s) at attempt 1
    assert not list(store.audio_dir.iterdir())
    assert w.storage_problem is not None and w.metrics.storage_errors._value.get() == 2
    assert w.retry_delay(1) == 30 and w.retry_delay(2) == 60 and w.retry_delay(30) == 600
    monkeypatch.undo()
    assert w._storage_ready() and w.storage_problem is None     # writable again: claims resume


def test_when_nothing_can_be_written_the_job_is_retried_later(store, monkeypatch):
    """Disk full for the database too: the job stays leased, the lease runs out, it is queued again."""
    ids = add(store, 1)
    w = make_worker(store, FakeEngineForTests(), lease_seconds=0.2)
    jobs = store.claim(w.worker_id, 1, 0.2)

    def broken(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(store, "complete", broken)
    monkeypatch.setattr(store, "retry_later", broken)
    monkeypatch.setattr(store, "fail", broken)
    w.process(jobs)
    monkeypatch.undo()
    assert store.get(ids[0]).state == JobState.PROCESSING
    time.sleep(0.3)
    assert store.recover_expired(3) == 1 and store.get(ids[0]).state == JobState.QUEUED


def test_worker_takes_no_accounts(store):
    """Billing is the store's (attach_billing): the worker has no accounts parameter, only a repair hook."""
    import inspect
    assert "accounts" not in inspect.signature(Worker).parameters
    w = make_worker(store, FakeEngineForTests())
    calls = []
    w.reconcile_with(type("Repair", (), {"maybe_reconcile": lambda self, lookup: calls.append(lookup)})())
    w.maintain(force=True)
    assert calls == [store.get]


def test_fair_turns_across_owners(store):
    add(store, 6, owner="a")
    add(store, 2, owner="b")
    add(store, 2, owner="c")
    order = [store.claim("w", 1, 30)[0].owner for _ in range(6)]
    assert order[:3] == ["a", "b", "c"] and order[3:6] == ["a", "b", "c"]
