"""THE contract of `jobs/store.py`, run against every implementation: SQLite (embedded) and Redis (scale-out).

Each test gets `store` and `reopen()`, a second, independent instance on the same data (another process's view:
an API replica beside a worker), so the suite also checks that nothing lives only in one instance's memory.
"""
from __future__ import annotations

import importlib.util
import threading
import time
import uuid

import pytest

from chatterbox_serverless.jobs.store import Job, JobState, QueueFull, StoreStats

from redis_server import delete_prefix, new_prefix, redis_url  # noqa: F401  (fixture)

LEASE = 30.0


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


BACKENDS = [
    pytest.param("sqlite", marks=pytest.mark.skipif(not _has("chatterbox_serverless.jobs.sqlite_store"),
                                                    reason="jobs/sqlite_store.py not written yet")),
    "redis",
]


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    opened = []
    if request.param == "sqlite":
        from chatterbox_serverless.jobs.sqlite_store import SQLiteJobStore
        path = tmp_path / "jobs.db"

        def open_store():
            opened.append(SQLiteJobStore(path))
            return opened[-1]
    else:
        from chatterbox_serverless.jobs.redis_store import RedisJobStore
        url = request.getfixturevalue("redis_url")
        prefix = new_prefix()

        def open_store():
            opened.append(RedisJobStore(url, prefix=prefix))
            return opened[-1]
    yield open_store
    for s in opened:
        s.close()
    if request.param == "redis":
        delete_prefix(url, prefix)


@pytest.fixture
def store(backend):
    return backend()


@pytest.fixture
def reopen(backend):
    return backend


def new_job(owner: str = "acct-a", **params) -> Job:
    return Job(id=str(uuid.uuid4()), owner=owner, params={"text": "hello", **params})


def submit(store, owner: str = "acct-a", max_queued: int = 1000, **params) -> Job:
    job = new_job(owner, **params)
    store.submit(job, max_queued)
    return job


# --- API side --------------------------------------------------------------------------------------------------

def test_submit_then_get_round_trips_every_field(store, reopen):
    params = {"text": "Grüße, 世界 — \"quoted\"", "seed": 7, "top_p": 0.9, "nested": {"a": [1, 2.5, None]}}
    job = Job(id=str(uuid.uuid4()), owner="acct-ü", params=params)
    store.submit(job, 10)
    for s in (store, reopen()):
        got = s.get(job.id)
        assert got is not None
        assert (got.id, got.owner, got.params, got.state) == (job.id, "acct-ü", params, JobState.QUEUED)
        assert got.created_at == pytest.approx(job.created_at, abs=1e-3)
        assert got.attempts == 0 and got.started_at is None and got.finished_at is None
        assert got.error is None and got.media_type is None and got.worker_id is None


def test_unknown_ids_are_none_or_false(store):
    missing = str(uuid.uuid4())
    assert store.get(missing) is None
    assert store.get_audio(missing) is None
    assert store.wait(missing, 0.1) is None
    assert store.complete(missing, "w", b"x", "audio/wav", {}) is False
    assert store.fail(missing, None, "nope") is False
    assert store.fail(missing, "w", "nope") is False
    assert store.release(missing, "w") is False
    store.heartbeat("w", [missing], LEASE)  # ignored, no error


def test_no_audio_before_completion(store):
    job = submit(store)
    assert store.get_audio(job.id) is None
    store.claim("w1", 1, LEASE)
    assert store.get_audio(job.id) is None


def test_queue_is_bounded(store):
    for _ in range(3):
        submit(store, max_queued=3)
    with pytest.raises(QueueFull):
        submit(store, max_queued=3)
    assert store.stats().by_state["QUEUED"] == 3
    store.claim("w1", 1, LEASE)          # one leaves the queue: room for one more
    submit(store, max_queued=3)
    with pytest.raises(QueueFull):
        submit(store, max_queued=3)


def test_stats_counts_states_and_queue_age(store):
    empty = store.stats()
    assert isinstance(empty, StoreStats)
    assert empty.oldest_queued_age == 0
    assert sum(empty.by_state.values()) == 0
    jobs = [submit(store) for _ in range(4)]
    time.sleep(0.05)
    claimed = store.claim("w1", 2, LEASE)
    assert store.complete(claimed[0].id, "w1", b"a", "audio/wav", {})
    assert store.fail(claimed[1].id, "w1", "bad")
    st = store.stats()
    assert {k: st.by_state.get(k, 0) for k in ("QUEUED", "PROCESSING", "COMPLETED", "FAILED")} == {
        "QUEUED": 2, "PROCESSING": 0, "COMPLETED": 1, "FAILED": 1}
    assert st.oldest_queued_age >= 0.04
    store.claim("w2", 5, LEASE)
    st = store.stats()
    assert st.by_state["PROCESSING"] == 2 and st.by_state.get("QUEUED", 0) == 0 and st.oldest_queued_age == 0
    assert len(jobs) == 4


# --- claiming ----------------------------------------------------------------------------------------------------

def test_claim_leases_jobs_and_counts_attempts(store, reopen):
    job = submit(store)
    assert store.claim("w1", 8, LEASE)[0].id == job.id
    other = reopen()
    got = other.get(job.id)
    assert got.state is JobState.PROCESSING and got.worker_id == "w1" and got.attempts == 1
    assert got.started_at is not None and got.started_at >= job.created_at - 1
    assert got.lease_until is not None and got.lease_until > time.time() + LEASE - 5
    assert store.claim("w2", 8, LEASE) == [] and other.claim("w2", 8, LEASE) == []


def test_claim_returns_processing_jobs_up_to_limit(store):
    jobs = [submit(store) for _ in range(5)]
    assert store.claim("w1", 0, LEASE) == []
    first = store.claim("w1", 3, LEASE)
    assert len(first) == 3
    assert all(j.state is JobState.PROCESSING and j.worker_id == "w1" and j.attempts == 1 for j in first)
    assert [j.id for j in first] == [j.id for j in jobs[:3]]     # one owner: oldest first
    rest = store.claim("w1", 3, LEASE)
    assert [j.id for j in rest] == [j.id for j in jobs[3:]]


def test_concurrent_claims_never_share_a_job(store, reopen):
    ids = {submit(store, owner=f"acct-{i % 3}").id for i in range(60)}
    instances = [store, reopen(), reopen()]
    got: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        s = instances[n % len(instances)]
        while True:
            batch = s.claim(f"w{n}", 4, LEASE)
            if not batch:
                return
            with lock:
                got.extend(j.id for j in batch)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(got) == len(set(got)) == 60 and set(got) == ids


def test_fair_across_owners_within_one_claim(store):
    burst = [submit(store, owner="acct-big") for _ in range(6)]
    small = submit(store, owner="acct-small")
    tiny = submit(store, owner="acct-tiny")
    batch = store.claim("w1", 3, LEASE)
    assert {j.owner for j in batch} == {"acct-big", "acct-small", "acct-tiny"}
    assert {small.id, tiny.id, burst[0].id} == {j.id for j in batch}


def test_fair_across_owners_over_successive_claims(store):
    """One key's burst does not starve the others, also when a worker takes one job at a time."""
    burst = [submit(store, owner="acct-big") for _ in range(5)]
    late = submit(store, owner="acct-late")
    order = [store.claim("w1", 1, LEASE)[0] for _ in range(2)]
    assert late.id in {j.id for j in order}
    order += [store.claim("w1", 1, LEASE)[0] for _ in range(4)]
    assert [j.id for j in order if j.owner == "acct-big"] == [j.id for j in burst]   # oldest first within one
    assert store.claim("w1", 1, LEASE) == []


def test_round_robin_keeps_rotating(store):
    for _ in range(4):
        submit(store, owner="a")
    for _ in range(4):
        submit(store, owner="b")
    owners = [store.claim("w", 1, LEASE)[0].owner for _ in range(8)]
    assert all(owners[i] != owners[i + 1] for i in range(7)), owners


# --- finishing ---------------------------------------------------------------------------------------------------

def test_complete_stores_audio_once(store, reopen):
    job = submit(store)
    store.claim("w1", 1, LEASE)
    audio = bytes(range(256)) * 100
    assert store.complete(job.id, "w2", b"other", "audio/wav", {}) is False      # not the holder
    assert store.complete(job.id, "w1", audio, "audio/mpeg", {"inference_time": 0.5}) is True
    assert store.complete(job.id, "w1", b"again", "audio/wav", {}) is False      # never twice
    assert store.fail(job.id, None, "late") is False
    assert store.release(job.id, "w1") is False
    for s in (store, reopen()):
        got = s.get(job.id)
        assert got.state is JobState.COMPLETED and got.media_type == "audio/mpeg"
        assert got.metrics["inference_time"] == 0.5 and got.finished_at is not None and got.error is None
        assert s.get_audio(job.id) == (audio, "audio/mpeg")


def test_empty_audio_is_stored_too(store):
    job = submit(store)
    store.claim("w1", 1, LEASE)
    assert store.complete(job.id, "w1", b"", "audio/wav", {})
    assert store.get_audio(job.id) == (b"", "audio/wav")


def test_fail_by_holder_and_by_anyone(store):
    a, b, c = submit(store), submit(store), submit(store)
    store.claim("w1", 1, LEASE)                       # a
    assert store.fail(a.id, "w2", "not yours") is False
    assert store.fail(a.id, "w1", "engine said no", {"inference_time": 0.1}) is True
    got = store.get(a.id)
    assert got.state is JobState.FAILED and got.error == "engine said no" and got.metrics["inference_time"] == 0.1
    assert store.fail(a.id, "w1", "twice") is False and store.get(a.id).error == "engine said no"
    assert store.fail(b.id, "w1", "queued, not held") is False                  # holder-only form
    assert store.fail(b.id, None, "content policy") is True                     # any non-terminal job
    assert store.get(b.id).state is JobState.FAILED
    assert store.get_audio(b.id) is None
    assert [j.id for j in store.claim("w1", 5, LEASE)] == [c.id]                # b left the queue
    assert store.stats().by_state.get("QUEUED", 0) == 0


def test_fail_frees_queue_room(store):
    jobs = [submit(store, max_queued=2) for _ in range(2)]
    assert store.fail(jobs[0].id, None, "x")
    submit(store, max_queued=2)


def test_release_requeues_without_counting(store):
    job = submit(store)
    store.claim("w1", 1, LEASE)
    assert store.release(job.id, "w2") is False
    assert store.release(job.id, "w1") is True
    got = store.get(job.id)
    assert got.state is JobState.QUEUED and got.attempts == 0 and got.worker_id is None
    again = store.claim("w2", 1, LEASE)
    assert [j.id for j in again] == [job.id] and again[0].attempts == 1
    assert store.complete(job.id, "w1", b"x", "audio/wav", {}) is False
    assert store.complete(job.id, "w2", b"x", "audio/wav", {}) is True


def test_released_job_keeps_its_place(store):
    old = submit(store)
    store.claim("w1", 1, LEASE)
    newer = submit(store)
    store.release(old.id, "w1")
    assert [j.id for j in store.claim("w2", 2, LEASE)] == [old.id, newer.id]


# --- leases ------------------------------------------------------------------------------------------------------

def test_heartbeat_extends_the_lease(store):
    job = submit(store)
    store.claim("w1", 1, 0.3)
    store.heartbeat("w1", [job.id], 30.0, {"batch_size": 4})
    time.sleep(0.5)
    assert store.recover_expired(3) == 0
    got = store.get(job.id)
    assert got.state is JobState.PROCESSING and got.lease_until > time.time() + 20
    store.heartbeat("w2", [job.id], 0.01)        # not the holder: no effect
    time.sleep(0.05)
    assert store.recover_expired(3) == 0


def test_expired_lease_goes_back_to_the_queue_and_the_old_holder_loses(store, reopen):
    job = submit(store)
    store.claim("w1", 1, 0.05)
    time.sleep(0.15)
    assert reopen().recover_expired(3) == 1
    got = store.get(job.id)
    assert got.state is JobState.QUEUED and got.attempts == 1 and got.worker_id is None
    again = store.claim("w2", 1, LEASE)
    assert [j.id for j in again] == [job.id] and again[0].attempts == 2
    assert store.complete(job.id, "w1", b"stale", "audio/wav", {}) is False     # never completed twice
    assert store.complete(job.id, "w2", b"fresh", "audio/wav", {}) is True
    assert store.get_audio(job.id) == (b"fresh", "audio/wav")


def test_recovered_job_keeps_its_place(store):
    old = submit(store)
    store.claim("w1", 1, 0.05)
    newer = submit(store)
    time.sleep(0.15)
    assert store.recover_expired(3) == 1
    assert [j.id for j in store.claim("w2", 2, LEASE)] == [old.id, newer.id]


def test_attempts_are_bounded(store):
    job = submit(store)
    for attempt in (1, 2):
        claimed = store.claim("w1", 1, 0.05)
        assert [j.attempts for j in claimed] == [attempt]
        time.sleep(0.15)
        assert store.recover_expired(2) == 1
    got = store.get(job.id)
    assert got.state is JobState.FAILED and got.error and got.finished_at is not None
    assert store.claim("w1", 1, LEASE) == []
    assert store.wait(job.id, 5).state is JobState.FAILED


def test_recover_leaves_live_leases_alone(store):
    submit(store)
    store.claim("w1", 1, LEASE)
    assert store.recover_expired(1) == 0
    assert store.stats().by_state["PROCESSING"] == 1


def test_workers_are_advertised(store, reopen):
    store.heartbeat("gpu-1", [], LEASE, {"batch_size": 8, "model": "tiny-random"})
    store.heartbeat("gpu-2", [], LEASE, {"batch_size": 4})
    workers = reopen().stats().workers
    assert workers["gpu-1"]["batch_size"] == 8 and workers["gpu-1"]["model"] == "tiny-random"
    assert set(workers) == {"gpu-1", "gpu-2"}
    store.heartbeat("gpu-1", [], LEASE, {"batch_size": 8, "batches": 3})
    assert store.stats().workers["gpu-1"]["batches"] == 3


# --- waiting -----------------------------------------------------------------------------------------------------

def test_wait_times_out_with_the_current_state(store):
    job = submit(store)
    t0 = time.monotonic()
    got = store.wait(job.id, 0.3)
    assert got.state is JobState.QUEUED and 0.25 <= time.monotonic() - t0 < 2


def test_wait_returns_when_another_instance_finishes_the_job(store, reopen):
    job = submit(store)
    other = reopen()
    other.claim("w1", 1, LEASE)

    def finish():
        time.sleep(0.3)
        other.complete(job.id, "w1", b"x", "audio/wav", {})

    t = threading.Thread(target=finish)
    t0 = time.monotonic()
    t.start()
    got = store.wait(job.id, 10)
    took = time.monotonic() - t0
    t.join()
    assert got.state is JobState.COMPLETED and took < 1.5


def test_wait_on_terminal_job_returns_at_once(store):
    job = submit(store)
    store.fail(job.id, None, "x")
    t0 = time.monotonic()
    assert store.wait(job.id, 10).state is JobState.FAILED and time.monotonic() - t0 < 0.5


# --- retention ---------------------------------------------------------------------------------------------------

def test_purge_deletes_only_old_terminal_jobs_and_their_audio(store, reopen):
    done, failed, processing, waiting = submit(store), submit(store), submit(store), submit(store)
    store.claim("w1", 2, LEASE)                 # done, failed
    assert store.complete(done.id, "w1", b"audio", "audio/wav", {})
    assert store.fail(failed.id, "w1", "x")
    store.claim("w1", 1, LEASE)                 # processing
    assert store.purge_expired(3600) == 0
    assert store.get(done.id) is not None and store.get_audio(done.id) is not None
    time.sleep(0.05)
    assert store.purge_expired(0.01) == 2
    for s in (store, reopen()):
        assert s.get(done.id) is None and s.get_audio(done.id) is None and s.get(failed.id) is None
        assert s.get(processing.id).state is JobState.PROCESSING and s.get(waiting.id).state is JobState.QUEUED
    st = store.stats()
    assert st.by_state.get("COMPLETED", 0) == 0 and st.by_state.get("FAILED", 0) == 0
    assert store.purge_expired(0) == 0


def test_many_jobs_many_owners_all_finish_exactly_once(store, reopen):
    ids = {submit(store, owner=f"acct-{i % 5}").id for i in range(50)}
    instances = [store, reopen()]
    completed: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        s = instances[n % 2]
        while True:
            batch = s.claim(f"w{n}", 3, LEASE)
            if not batch:
                return
            for j in batch:
                ok = s.complete(j.id, f"w{n}", j.id.encode(), "audio/wav", {})
                ok2 = s.complete(j.id, f"w{n}", b"dup", "audio/wav", {})
                with lock:
                    if ok:
                        completed.append(j.id)
                    assert not ok2

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(completed) == sorted(ids)
    for job_id in list(ids)[:5]:
        assert store.get_audio(job_id) == (job_id.encode(), "audio/wav")
