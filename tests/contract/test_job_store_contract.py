"""THE contract of `jobs/store.py`, run against every implementation: SQLite (embedded) and Redis (scale-out).

Each test gets `store` and `reopen()`, a second, independent instance on the same data (another process's view:
an API replica beside a worker), so the suite also checks that nothing lives only in one instance's memory.
"""
from __future__ import annotations

import threading
import time
import uuid

import pytest

from chatterbox_serverless.accounts import account_store_for
from chatterbox_serverless.accounts.service import Accounts, Pricing
from chatterbox_serverless.jobs.store import Job, JobState, QueueFull, StoreStats
from chatterbox_serverless.jobs.worker import STORAGE_REASON, scrub_paths
from test_account_store_contract import assert_explainable

from chatterbox_serverless.testing.redis import delete_prefix, new_prefix

LEASE = 30.0


BACKENDS = ["sqlite", pytest.param("redis", marks=pytest.mark.redis)]


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


@pytest.fixture
def billed():
    """`billed(store)`: attach billing to `store` the way the service assembly does, with the account store of the
    same backend (same database file / same Redis server and prefix); returns that account store."""
    opened = []

    def attach(store):
        accounts = account_store_for(store)
        store.attach_billing(accounts)
        opened.append(accounts)
        return accounts
    yield attach
    for a in opened:
        a.close()


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


# --- billing: holds closed with the terminal transition ---------------------------------------------------------
SUBMITTER = Pricing(credits_per_second=2.0, minimum=3)      # "hello world": hold 7; 4.2 s of audio: 9


def held_job(store, accounts: Accounts, acc, text: str = "hello world") -> Job:
    """What the API does: hold the estimate (recording its price), then submit."""
    job = Job(id=str(uuid.uuid4()), owner=acc.id, params={"text": text})
    accounts.hold_for(acc, job.id, text)
    store.submit(job, 1000)
    return job


def test_complete_settles_the_hold_with_the_transition(store, reopen, billed):
    acct = billed(store)
    accounts = Accounts(acct, SUBMITTER)
    _, acc = accounts.create_key(credits=100)
    job = held_job(store, accounts, acc)
    assert acct.get(acc.id).held == 7
    store.claim("w1", 1, LEASE)
    assert acct.get(acc.id).held == 7                         # claiming is not billing
    assert store.complete(job.id, "w1", b"audio", "audio/wav", {"audio_seconds": 4.2, "inference_time": 1})
    a = acct.get(acc.id)                                      # nothing else ran: the store settled it
    assert (a.balance, a.held) == (100 - 9, 0) and acct.get_hold(job.id) is None
    other = account_store_for(reopen())                       # another process's view
    try:
        u = other.usage(acc.id)
        assert (u.completed, u.failed, u.credits_spent, u.open_holds) == (1, 0, 9, 0)
        assert u.audio_seconds == pytest.approx(4.2)
        [settle] = [e for e in other.ledger(acc.id) if e.kind == "settle"]
        assert (settle.job_id, settle.delta, settle.hold_delta) == (job.id, -9, -7)
    finally:
        other.close()
    assert_explainable(acct, acc.id)


def test_a_reader_that_sees_completed_sees_the_settled_balance(store, reopen, billed):
    """Another instance polls the jobs; the first time it reads COMPLETED, the account is already settled."""
    acct = billed(store)
    accounts = Accounts(acct, SUBMITTER)
    _, acc = accounts.create_key(credits=1000)
    jobs = [held_job(store, accounts, acc) for _ in range(40)]
    assert len(store.claim("w1", 40, LEASE)) == 40
    reader_store = reopen()
    reader_acct = account_store_for(reader_store)
    problems: list[str] = []
    seen: list[str] = []
    live = threading.Event()

    def reader() -> None:
        pending = [j.id for j in jobs]
        deadline = time.monotonic() + 30
        while pending and time.monotonic() < deadline:
            live.set()
            for job_id in list(pending):
                if reader_store.get(job_id).state is JobState.COMPLETED:
                    a = reader_acct.get(acc.id)
                    seen.append(job_id)
                    if reader_acct.get_hold(job_id) is not None:
                        problems.append(f"{job_id}: COMPLETED but its hold is open")
                    if a.balance > 1000 - 9 * len(seen):
                        problems.append(f"{len(seen)} COMPLETED seen, balance {a.balance}")
                    pending.remove(job_id)

    t = threading.Thread(target=reader)
    t.start()
    try:
        assert live.wait(10)
        for j in jobs:
            assert store.complete(j.id, "w1", b"a", "audio/wav", {"audio_seconds": 4.2})
    finally:
        t.join(40)
        reader_acct.close()
    assert not problems, problems[:5]
    assert sorted(seen) == sorted(j.id for j in jobs)
    a = acct.get(acc.id)
    assert (a.balance, a.held) == (1000 - 40 * 9, 0)
    assert_explainable(acct, acc.id)


def test_failing_releases_the_hold(store, billed):
    acct = billed(store)
    accounts = Accounts(acct, SUBMITTER)
    _, acc = accounts.create_key(credits=100)
    held, queued, interrupted, released, deferred = (held_job(store, accounts, acc) for _ in range(5))
    store.claim("w1", 1, LEASE)                              # held
    assert store.fail(held.id, "w1", "engine said no")
    assert store.fail(queued.id, None, "content policy")     # a QUEUED job, failed by anyone
    assert acct.get_hold(held.id) is None and acct.get_hold(queued.id) is None
    assert acct.get(acc.id).held == 3 * 7
    # recover_expired: re-queueing keeps the hold; giving up at max attempts releases it
    for attempt in (1, 2):
        claimed = store.claim("w1", 1, 0.05)
        assert [j.id for j in claimed] == [interrupted.id]
        time.sleep(0.15)
        assert store.recover_expired(2) == 1
        assert (acct.get_hold(interrupted.id) is None) == (attempt == 2)
    assert store.get(interrupted.id).state is JobState.FAILED
    # handing a job back (graceful stop, storage trouble) is not the end of it: the hold stays
    store.claim("w1", 2, LEASE)                              # released, deferred
    assert store.release(released.id, "w1") and store.retry_later(deferred.id, "w1", STORAGE_REASON, 30)
    assert acct.get_hold(released.id) is not None and acct.get_hold(deferred.id) is not None
    a = acct.get(acc.id)
    assert (a.balance, a.held) == (100, 2 * 7)
    u = acct.usage(acc.id)
    assert (u.failed, u.completed, u.open_holds) == (3, 0, 2)
    notes = {e.job_id: e.note for e in acct.ledger(acc.id) if e.kind == "release"}
    assert notes[held.id] == "engine said no" and notes[queued.id] == "content policy"
    assert notes[interrupted.id] == store.get(interrupted.id).error
    assert_explainable(acct, acc.id)


def test_the_price_is_the_submitters_wherever_the_job_completes(store, reopen, billed):
    """A store instance in a process whose Accounts price differently completes the job: the submitter's
    recorded price is charged, by the store's billing and by another process's repair alike."""
    acct = billed(store)
    submitter = Accounts(acct, SUBMITTER)
    _, acc = submitter.create_key(credits=1000)
    j1, j2 = held_job(store, submitter, acc), held_job(store, submitter, acc)
    elsewhere = reopen()
    completer = Accounts(billed(elsewhere), Pricing(credits_per_second=10.0, minimum=50))
    assert [j.id for j in elsewhere.claim("w9", 1, LEASE)] == [j1.id]
    assert elsewhere.complete(j1.id, "w9", b"a", "audio/wav", {"audio_seconds": 4.2})
    assert acct.get(acc.id).balance == 1000 - 9                 # not 50 (the completer's 42, at least 50)
    unbilled = reopen()                                         # a store with no billing attached
    unbilled.claim("w8", 1, LEASE)
    assert unbilled.complete(j2.id, "w8", b"a", "audio/wav", {"audio_seconds": 4.2})
    assert acct.get_hold(j2.id) is not None                     # nothing closed it...
    assert completer.reconcile(elsewhere.get)["settled"] == 1   # ...until the repair, at the submitter's price
    assert acct.get(acc.id).balance == 1000 - 18
    assert_explainable(acct, acc.id)


def test_settling_twice_charges_once(store, reopen, billed):
    acct = billed(store)
    accounts = Accounts(acct, SUBMITTER)
    _, acc = accounts.create_key(credits=100)
    job = held_job(store, accounts, acc)
    store.claim("w1", 1, LEASE)
    assert store.complete(job.id, "w1", b"a", "audio/wav", {"audio_seconds": 4.2})
    assert store.complete(job.id, "w1", b"a", "audio/wav", {"audio_seconds": 4.2}) is False
    assert reopen().complete(job.id, "w1", b"a", "audio/wav", {"audio_seconds": 4.2}) is False
    assert store.fail(job.id, None, "late") is False
    assert accounts.settle(job.id, 4.2) is None and accounts.release(job.id) is None
    assert accounts.reconcile(store.get) == {"settled": 0, "released": 0, "open": 0}
    a = acct.get(acc.id)
    assert (a.balance, a.held) == (100 - 9, 0)
    assert [e.kind for e in acct.ledger(acc.id)] == ["grant", "hold", "settle"]
    assert_explainable(acct, acc.id)


def test_unknown_audio_length_is_charged_the_hold(store, billed):
    acct = billed(store)
    accounts = Accounts(acct, SUBMITTER)
    _, acc = accounts.create_key(credits=100)
    job = held_job(store, accounts, acc)
    store.claim("w1", 1, LEASE)
    assert store.complete(job.id, "w1", b"a", "audio/wav", {"audio_seconds": "4.2", "inference_time": 1})
    assert acct.get(acc.id).balance == 100 - 7
    assert "length unknown" in acct.ledger(acc.id, 1)[0].note
    assert_explainable(acct, acc.id)


def test_jobs_without_a_hold_transition_as_before(store, billed):
    acct = billed(store)
    a, b, c = submit(store, owner=""), submit(store, owner=""), submit(store, owner="")
    store.claim("w1", 2, LEASE)
    assert store.complete(a.id, "w1", b"x", "audio/wav", {"audio_seconds": 1.0})
    assert store.fail(b.id, "w1", "x")
    store.claim("w1", 1, 0.05)
    time.sleep(0.15)
    assert store.recover_expired(1) == 1
    assert [store.get(j.id).state for j in (a, b, c)] == [JobState.COMPLETED, JobState.FAILED, JobState.FAILED]
    assert acct.holds() == [] and acct.count() == 0


def test_attach_billing_wants_the_account_store_of_the_same_backend(store, reopen, billed, tmp_path, request):
    if request.node.callspec.params["backend"] == "sqlite":
        from chatterbox_serverless.accounts.sqlite_store import SQLiteAccountStore
        elsewhere = SQLiteAccountStore(tmp_path / "other" / "jobs.sqlite3")
    else:
        from chatterbox_serverless.accounts.redis_store import RedisAccountStore
        elsewhere = RedisAccountStore(prefix=store.prefix + "other:", client=store.r)
    try:
        with pytest.raises(ValueError):
            store.attach_billing(elsewhere)
        with pytest.raises(ValueError):
            store.attach_billing(object())
    finally:
        elsewhere.close()
    acct = billed(store)
    accounts = Accounts(acct, SUBMITTER)
    _, acc = accounts.create_key(credits=100)
    job = held_job(store, accounts, acc)
    store.attach_billing(None)                                  # detached: transitions bill nothing
    store.claim("w1", 1, LEASE)
    assert store.complete(job.id, "w1", b"x", "audio/wav", {"audio_seconds": 1.0})
    assert acct.get_hold(job.id) is not None


# --- storage trouble: retry_later, writable ---------------------------------------------------------------------

def test_retry_later_hands_the_job_back_after_its_delay(store, reopen):
    job = submit(store)
    store.claim("w1", 1, LEASE)
    assert store.retry_later(job.id, "w2", STORAGE_REASON, 0.3) is False       # not the holder
    assert store.retry_later(job.id, "w1", STORAGE_REASON, 0.3) is True
    got = reopen().get(job.id)
    assert got.state is JobState.PROCESSING and got.worker_id is None and got.attempts == 1 and got.error is None
    assert store.retry_later(job.id, "w1", STORAGE_REASON, 0.3) is False       # given up already
    assert store.complete(job.id, "w1", b"late", "audio/wav", {}) is False     # the old holder gave it up
    store.heartbeat("w1", [job.id], 30.0)                                       # and cannot keep it
    assert store.recover_expired(3) == 0 and store.claim("w2", 1, LEASE) == []  # not before its delay
    time.sleep(0.45)
    assert store.recover_expired(3) == 1
    got = store.get(job.id)
    assert got.state is JobState.QUEUED and got.error is None
    again = store.claim("w2", 1, LEASE)
    assert [j.attempts for j in again] == [2]
    assert store.complete(job.id, "w2", b"fresh", "audio/wav", {})
    assert store.get_audio(job.id) == (b"fresh", "audio/wav")


def test_retry_later_at_the_last_attempt_fails_with_its_reason(store, billed):
    acct = billed(store)
    accounts = Accounts(acct, SUBMITTER)
    _, acc = accounts.create_key(credits=100)
    job = held_job(store, accounts, acc)
    for attempt in (1, 2):
        assert [j.attempts for j in store.claim("w1", 1, LEASE)] == [attempt]
        assert store.retry_later(job.id, "w1", STORAGE_REASON, 0.05)
        time.sleep(0.15)
        assert store.recover_expired(2) == 1
    got = store.get(job.id)
    assert got.state is JobState.FAILED and got.error == STORAGE_REASON
    assert acct.get(acc.id).held == 0 and acct.usage(acc.id).failed == 1


def test_a_later_attempt_that_dies_fails_as_interrupted(store):
    """The reason given to retry_later belongs to its attempt: the next claim clears it."""
    job = submit(store)
    store.claim("w1", 1, LEASE)
    assert store.retry_later(job.id, "w1", STORAGE_REASON, 0.05)
    time.sleep(0.15)
    assert store.recover_expired(2) == 1
    store.claim("w2", 1, 0.05)                                   # attempt 2: its worker dies
    time.sleep(0.15)
    assert store.recover_expired(2) == 1
    got = store.get(job.id)
    assert got.state is JobState.FAILED and got.error != STORAGE_REASON and "2 times" in got.error


def test_error_texts_name_no_path(store):
    """What recover_expired writes is shown to clients: no server path in it."""
    job = submit(store)
    store.claim("w1", 1, 0.05)
    time.sleep(0.15)
    store.recover_expired(1)
    error = store.get(job.id).error
    assert error and scrub_paths(error) == error and "/" not in error


def test_writable_probes_a_write(store):
    assert store.writable() is None
    assert store.writable() is None                              # repeatable, leaves nothing behind
    job = submit(store)                                          # and the store works as before
    store.claim("w1", 1, LEASE)
    assert store.complete(job.id, "w1", b"x", "audio/wav", {})


# --- queue conventions: cancel -----------------------------------------------------------------------------------
from chatterbox_serverless.jobs.store import CANCELLED_REASON, LOST_ATTEMPT  # noqa: E402


def test_cancel_a_queued_job_never_runs_and_releases_its_hold(store, reopen, billed):
    acct = billed(store)
    accounts = Accounts(acct, SUBMITTER)
    _, acc = accounts.create_key(credits=100)
    job, other = held_job(store, accounts, acc), held_job(store, accounts, acc)
    got = store.cancel(job.id)
    assert got.state is JobState.FAILED and got.cancelled and got.error == CANCELLED_REASON
    assert got.finished_at is not None and acct.get_hold(job.id) is None
    assert acct.get(acc.id).held == 7                                   # only `other` still holds
    assert [j.id for j in store.claim("w1", 5, LEASE)] == [other.id]    # the cancelled one never runs
    again = reopen().cancel(job.id)                                      # idempotent, from any instance
    assert again.state is JobState.FAILED and again.cancelled and again.finished_at == pytest.approx(got.finished_at)
    assert [e.kind for e in acct.ledger(acc.id) if e.job_id == job.id] == ["hold", "release"]
    assert_explainable(acct, acc.id)


def test_cancel_a_processing_job_takes_it_from_its_worker(store, reopen, billed):
    acct = billed(store)
    accounts = Accounts(acct, SUBMITTER)
    _, acc = accounts.create_key(credits=100)
    job = held_job(store, accounts, acc)
    store.claim("w1", 1, LEASE)
    api = reopen()                                      # another process (an API replica), billing attached
    billed(api)
    got = api.cancel(job.id)
    assert got.state is JobState.FAILED and got.cancelled and got.worker_id is None
    assert acct.get_hold(job.id) is None and acct.get(acc.id).held == 0
    assert store.progress("w1", {job.id: {"stage": "encoding"}}) == set()      # the worker learns it lost it
    assert store.complete(job.id, "w1", b"late", "audio/wav", {"audio_seconds": 4.2}) is False
    assert store.fail(job.id, "w1", "late") is False
    store.heartbeat("w1", [job.id], LEASE)
    assert store.recover_expired(1) == 0
    final = store.get(job.id)
    assert final.state is JobState.FAILED and final.cancelled and store.get_audio(job.id) is None
    assert acct.get(acc.id).balance == 100                               # nothing charged
    assert_explainable(acct, acc.id)


def test_cancel_a_job_handed_back_for_later(store):
    job = submit(store)
    store.claim("w1", 1, LEASE)
    assert store.retry_later(job.id, "w1", STORAGE_REASON, 0.05)
    assert store.cancel(job.id).cancelled
    time.sleep(0.1)
    assert store.recover_expired(3) == 0 and store.claim("w2", 1, LEASE) == []
    assert store.get(job.id).state is JobState.FAILED


def test_cancel_leaves_finished_jobs_as_they_are(store):
    done, failed = submit(store), submit(store)
    store.claim("w1", 2, LEASE)
    assert store.complete(done.id, "w1", b"a", "audio/wav", {})
    assert store.fail(failed.id, "w1", "engine said no")
    got = store.cancel(done.id)
    assert got.state is JobState.COMPLETED and not got.cancelled and store.get_audio(done.id) == (b"a", "audio/wav")
    got = store.cancel(failed.id)
    assert got.state is JobState.FAILED and not got.cancelled and got.error == "engine said no"
    assert store.cancel(str(uuid.uuid4())) is None


def test_cancel_and_complete_racing_end_one_way(store, reopen):
    """Whichever transition comes first wins; the job is never both completed and cancelled."""
    for _ in range(10):
        job = submit(store)
        store.claim("w1", 1, LEASE)
        other = reopen()
        results: dict[str, object] = {}
        t = threading.Thread(target=lambda: results.update(cancel=other.cancel(job.id)))
        t.start()
        results["complete"] = store.complete(job.id, "w1", b"a", "audio/wav", {})
        t.join(10)
        final = store.get(job.id)
        if results["complete"]:
            assert final.state is JobState.COMPLETED and not final.cancelled
        else:
            assert final.state is JobState.FAILED and final.cancelled and store.get_audio(job.id) is None
        other.close()


# --- queue conventions: events -----------------------------------------------------------------------------------

def states_of(events) -> list:
    return [(e.type, e.data.get("status") or e.data.get("stage")) for e in events]


def test_events_number_every_state_change_and_progress(store, reopen):
    job = submit(store)
    store.claim("w1", 1, LEASE)
    assert store.progress("w1", {job.id: {"stage": "synthesizing", "chunks_done": 0, "chunks_total": 2}}) == {job.id}
    assert store.progress("w2", {job.id: {"stage": "bogus"}}) == set()          # not the holder: nothing recorded
    assert store.progress("w1", {job.id: {}}) == {job.id}                       # a check only
    assert store.release(job.id, "w1")
    store.claim("w2", 1, LEASE)
    assert store.complete(job.id, "w2", b"a", "audio/wav", {})
    expected = [("state", "QUEUED"), ("state", "PROCESSING"), ("progress", "synthesizing"), ("state", "QUEUED"),
                ("state", "PROCESSING"), ("state", "COMPLETED")]
    for s in (store, reopen()):
        events = s.job_events(job.id)
        assert [e.seq for e in events] == list(range(1, 7)) and states_of(events) == expected
        assert events[1].data["attempt"] == 1 and events[2].data["chunks_total"] == 2
        assert all(isinstance(e.data["at"], float) and e.data["at"] >= job.created_at - 1 for e in events)
        assert [e.seq for e in s.job_events(job.id, after=4)] == [5, 6]
        assert [e.seq for e in s.job_events(job.id, after=2, limit=2)] == [3, 4]
        assert s.job_events(job.id, after=6) == [] and s.job_events(str(uuid.uuid4())) == []


def test_events_of_recovery_failure_and_cancel(store):
    lost, cancelled, failed = submit(store), submit(store), submit(store)
    store.claim("w1", 1, 0.05)
    time.sleep(0.1)
    assert store.recover_expired(3) == 1
    assert states_of(store.job_events(lost.id)) == [("state", "QUEUED"), ("state", "PROCESSING"), ("state", "QUEUED")]
    store.cancel(cancelled.id)
    ev = store.job_events(cancelled.id)
    assert states_of(ev) == [("state", "QUEUED"), ("state", "FAILED")] and ev[-1].data["cancelled"] is True
    store.fail(failed.id, None, "policy")
    ev = store.job_events(failed.id)
    assert states_of(ev) == [("state", "QUEUED"), ("state", "FAILED")] and "cancelled" not in ev[-1].data


def test_events_go_with_the_job(store, reopen):
    job = submit(store)
    store.fail(job.id, None, "x")
    assert len(store.job_events(job.id)) == 2
    time.sleep(0.05)
    assert store.purge_expired(0.01) == 1
    assert store.job_events(job.id) == [] and reopen().job_events(job.id) == []


# --- queue conventions: queue position ---------------------------------------------------------------------------

def positions(store, jobs) -> dict[str, int]:
    return {j.id: store.queue_position(j.id) for j in jobs}


@pytest.mark.parametrize("claim_size", [1, 3, 100])
def test_queue_position_is_the_order_claims_take(store, reopen, claim_size):
    # some history first, so that owners have different turns (b and a served, c's job left waiting)
    history = [submit(store, owner=o) for o in ("b", "a", "c")]
    for j in store.claim("w0", 2, LEASE):
        store.complete(j.id, "w0", b"a", "audio/wav", {})
    queued = [history[2]] + [submit(store, owner=o) for o in ("a", "a", "a", "b", "c", "c", "d", "a", "b", "d", "e")]
    pos = positions(reopen(), queued)
    assert sorted(pos.values()) == list(range(len(queued)))            # a permutation: 0 is next
    order: list[str] = []
    while batch := store.claim("w1", claim_size, LEASE):
        order += [j.id for j in batch]
    assert order == sorted(pos, key=pos.get)
    # round robin: no owner twice in a row while others wait
    owners = [store.get(i).owner for i in order]
    assert len(set(owners[:5])) == 5 and len(set(owners[5:9])) == 4 and set(owners[9:11]) == {"a", "c"} \
        and owners[11:] == ["a"]


def test_queue_position_moves_up_and_ends(store):
    a1, a2, b1 = submit(store, owner="a"), submit(store, owner="a"), submit(store, owner="b")
    assert positions(store, [a1, a2, b1]) == {a1.id: 0, b1.id: 1, a2.id: 2}
    store.claim("w1", 1, LEASE)                                    # a1
    assert positions(store, [a1, a2, b1]) == {a1.id: None, b1.id: 0, a2.id: 1}
    store.cancel(b1.id)
    assert positions(store, [a2, b1]) == {a2.id: 0, b1.id: None}
    assert store.queue_position(str(uuid.uuid4())) is None


# --- queue conventions: idempotency keys -------------------------------------------------------------------------

def test_idempotency_key_is_reserved_once_per_owner(store, reopen):
    assert store.claim_idempotency_key("a", "key-1", "fp1", "job-1", 60) is None
    rec = reopen().claim_idempotency_key("a", "key-1", "fp2", "job-2", 60)
    assert (rec.job_id, rec.fingerprint) == ("job-1", "fp1") and rec.created_at <= time.time()
    assert store.claim_idempotency_key("b", "key-1", "fp1", "job-3", 60) is None        # another owner's own
    store.release_idempotency_key("a", "key-1", "job-2")                                # not its reservation
    assert store.claim_idempotency_key("a", "key-1", "fp1", "job-4", 60).job_id == "job-1"
    store.release_idempotency_key("a", "key-1", "job-1")                                # the submission failed
    assert store.claim_idempotency_key("a", "key-1", "fp1", "job-5", 60) is None


def test_idempotency_key_expires_and_a_dead_reservation_is_taken_over(store):
    assert store.claim_idempotency_key("a", "short", "fp", "job-1", 0.05) is None
    time.sleep(0.1)
    assert store.claim_idempotency_key("a", "short", "fp", "job-2", 60) is None          # expired
    # job-2 was never submitted (its submitter died): taken over once older than stale_after
    assert store.claim_idempotency_key("a", "short", "fp", "job-3", 60, stale_after=30).job_id == "job-2"
    time.sleep(0.02)
    assert store.claim_idempotency_key("a", "short", "fp", "job-3", 60, stale_after=0.01) is None
    job = Job(id="job-3", owner="a", params={"text": "x"})
    store.submit(job, 10)
    time.sleep(0.02)
    assert store.claim_idempotency_key("a", "short", "fp", "job-4", 60, stale_after=0.01).job_id == "job-3"


def test_concurrent_reservations_of_one_key_have_one_winner(store, reopen):
    instances = [store, reopen(), reopen()]
    winners: list[str] = []
    seen: list[str] = []
    barrier = threading.Barrier(9)

    def attempt(n: int) -> None:
        barrier.wait()
        rec = instances[n % 3].claim_idempotency_key("a", "same", "fp", f"job-{n}", 60)
        (winners if rec is None else seen).append(f"job-{n}" if rec is None else rec.job_id)

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(winners) == 1 and set(seen) == set(winners) and len(seen) == 8


# --- queue conventions: webhook deliveries -----------------------------------------------------------------------

def hooked(store, url: str = "https://example.com/hook", **kw) -> Job:
    job = Job(id=str(uuid.uuid4()), owner="acct-a", params={"text": "hello"}, webhook_url=url,
              base_url="https://api.example.com", **kw)
    store.submit(job, 1000)
    return job


def test_a_delivery_is_queued_with_the_terminal_transition(store, reopen):
    job, plain = hooked(store), submit(store)
    got = store.get(job.id)
    assert got.webhook_url == "https://example.com/hook" and got.base_url == "https://api.example.com"
    assert got.webhook == {"state": "pending", "attempts": 0, "last_status": None, "last_error": None}
    assert store.get(plain.id).webhook is None and store.get(plain.id).webhook_url is None
    store.claim("w1", 2, LEASE)
    assert store.claim_webhooks("d1", 10, 30, 8) == []                     # not terminal yet
    assert store.complete(job.id, "w1", b"a", "audio/wav", {}) and store.complete(plain.id, "w1", b"a", "audio/wav", {})
    [d] = reopen().claim_webhooks("d1", 10, 30, 8)
    assert (d.job_id, d.attempt) == (job.id, 1)
    assert store.claim_webhooks("d2", 10, 30, 8) == []                     # leased to d1
    assert store.finish_webhook(job.id, "d2", 1, "delivered", 200) is False
    assert store.finish_webhook(job.id, "d1", 1, "retry", 500, retry_in=0.2)
    assert store.get(job.id).webhook == {"state": "pending", "attempts": 1, "last_status": 500, "last_error": None}
    assert store.finish_webhook(job.id, "d1", 1, "delivered", 200) is False   # reported once
    assert store.claim_webhooks("d2", 10, 30, 8) == []                     # not due yet
    time.sleep(0.3)
    [d] = store.claim_webhooks("d2", 10, 30, 8)
    assert (d.job_id, d.attempt) == (job.id, 2)
    assert store.finish_webhook(job.id, "d2", 2, "delivered", 204)
    assert reopen().get(job.id).webhook == {"state": "delivered", "attempts": 2, "last_status": 204,
                                            "last_error": None}
    time.sleep(0.05)
    assert store.claim_webhooks("d1", 10, 30, 8) == []


def test_every_way_to_an_end_queues_a_delivery(store):
    failed, cancelled_q, cancelled_p, lost = hooked(store), hooked(store), hooked(store), hooked(store)
    store.claim("w1", 1, LEASE)                                            # failed
    store.fail(failed.id, "w1", "no")
    store.cancel(cancelled_q.id)
    store.claim("w1", 2, 0.05)                                             # cancelled_p, lost
    store.cancel(cancelled_p.id)
    time.sleep(0.1)
    assert store.recover_expired(1) == 1                                   # lost: out of attempts
    claimed = store.claim_webhooks("d1", 10, 30, 8)
    assert {d.job_id for d in claimed} == {failed.id, cancelled_q.id, cancelled_p.id, lost.id}


def test_a_delivery_whose_sender_died_is_retried_then_given_up(store, reopen):
    job = hooked(store)
    store.fail(job.id, None, "x")
    [d] = store.claim_webhooks("d1", 10, 0.05, 2)
    time.sleep(0.1)                                                        # d1 died: its lease runs out
    [d2] = reopen().claim_webhooks("d2", 10, 0.05, 2)
    assert (d2.job_id, d2.attempt) == (job.id, 2)
    assert store.finish_webhook(job.id, "d1", 1, "delivered", 200) is False
    time.sleep(0.1)                                                        # d2 died too: out of attempts
    assert store.claim_webhooks("d3", 10, 30, 2) == []
    assert store.get(job.id).webhook == {"state": "failed", "attempts": 2, "last_status": None,
                                         "last_error": LOST_ATTEMPT}


def test_a_delivery_can_fail_for_good(store):
    job = hooked(store)
    store.cancel(job.id)
    [d] = store.claim_webhooks("d1", 10, 30, 8)
    assert store.finish_webhook(job.id, "d1", 1, "failed", None, "could not connect")
    assert store.get(job.id).webhook == {"state": "failed", "attempts": 1, "last_status": None,
                                         "last_error": "could not connect"}
    time.sleep(0.02)
    assert store.claim_webhooks("d1", 10, 30, 8) == []


def test_concurrent_dispatchers_never_make_one_attempt_twice(store, reopen):
    jobs = [hooked(store) for _ in range(30)]
    for j in jobs:
        store.fail(j.id, None, "x")
    instances = [store, reopen(), reopen()]
    got: list[tuple[str, int]] = []
    lock = threading.Lock()

    def dispatcher(n: int) -> None:
        s = instances[n % 3]
        while True:
            batch = s.claim_webhooks(f"d{n}", 4, 30, 8)
            if not batch:
                return
            for d in batch:
                assert s.finish_webhook(d.job_id, f"d{n}", d.attempt, "delivered", 200)
            with lock:
                got.extend((d.job_id, d.attempt) for d in batch)

    threads = [threading.Thread(target=dispatcher, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(got) == sorted((j.id, 1) for j in jobs)


# --- the chunk channel (streamed audio) --------------------------------------------------------------------------

def chunks_of(read) -> list[tuple[int, bytes]]:
    return [(c.seq, c.data) for c in read.chunks]


def test_chunks_are_appended_by_the_holder_and_read_in_order_by_any_instance(store, reopen):
    job = submit(store, stream=True)
    first = store.read_chunks(job.id)
    assert (first.state, first.attempt, first.chunks, first.restarted, first.end) == (JobState.QUEUED, 0, [], False, False)
    store.claim("w1", 1, LEASE)
    other = reopen()
    payloads = [bytes([i]) * (1000 + i) + b"\x00\xff" for i in range(3)]
    for seq, data in enumerate(payloads):
        assert store.append_chunk(job.id, "w1", seq, data) is True
        read = other.read_chunks(job.id, after=seq - 1)
        assert read.state is JobState.PROCESSING and read.attempt == 1 and not read.end and not read.restarted
        assert chunks_of(read) == [(seq, data)]
    assert chunks_of(other.read_chunks(job.id)) == list(enumerate(payloads))
    assert chunks_of(other.read_chunks(job.id, after=0, attempt=1, limit=1)) == [(1, payloads[1])]
    assert store.complete(job.id, "w1", b"whole", "audio/wav", {})
    done = other.read_chunks(job.id, after=-1, attempt=1)
    assert done.state is JobState.COMPLETED and done.end and chunks_of(done) == list(enumerate(payloads))
    page = other.read_chunks(job.id, after=-1, attempt=1, limit=2)     # more follow: not the end yet
    assert len(page.chunks) == 2 and not page.end
    assert other.read_chunks(job.id, after=1, attempt=1, limit=2).end
    assert store.read_chunks(str(uuid.uuid4())) is None


def test_only_the_lease_holder_appends(store):
    job = submit(store)
    assert store.append_chunk(job.id, "w1", 0, b"queued") is False        # nobody holds it
    store.claim("w1", 1, LEASE)
    assert store.append_chunk(job.id, "w2", 0, b"not mine") is False
    assert store.append_chunk(job.id, "w1", 0, b"mine") is True
    store.cancel(job.id)
    assert store.append_chunk(job.id, "w1", 1, b"after cancel") is False
    read = store.read_chunks(job.id, attempt=1)
    assert read.state is JobState.FAILED and read.end and chunks_of(read) == [(0, b"mine")]


def test_chunks_are_numbered_without_gaps_and_a_retried_write_is_harmless(store):
    job = submit(store)
    store.claim("w1", 1, LEASE)
    with pytest.raises(ValueError):
        store.append_chunk(job.id, "w1", 1, b"gap")                        # 0 first
    assert store.append_chunk(job.id, "w1", 0, b"zero")
    assert store.append_chunk(job.id, "w1", 0, b"zero") is True            # the same write again: no-op
    with pytest.raises(ValueError):
        store.append_chunk(job.id, "w1", 0, b"another zero")
    with pytest.raises(ValueError):
        store.append_chunk(job.id, "w1", 2, b"gap")
    assert chunks_of(store.read_chunks(job.id)) == [(0, b"zero")]


def test_a_retried_job_restarts_its_stream_and_a_reader_of_the_old_attempt_is_told(store, reopen):
    job = submit(store)
    store.claim("w1", 1, 0.05)
    assert store.append_chunk(job.id, "w1", 0, b"first attempt, piece 0")
    assert store.append_chunk(job.id, "w1", 1, b"first attempt, piece 1")
    reader = reopen()
    seen = reader.read_chunks(job.id, after=-1, attempt=None)
    assert seen.attempt == 1 and len(seen.chunks) == 2
    time.sleep(0.15)
    assert store.recover_expired(3) == 1                   # the worker died: back in the queue
    restarted = reader.read_chunks(job.id, after=1, attempt=1)
    assert restarted.restarted and restarted.chunks == [] and restarted.state is JobState.QUEUED
    assert reader.read_chunks(job.id).chunks == []          # a new reader never starts on an attempt that is over
    store.claim("w2", 1, LEASE)                             # the new attempt's stream starts empty
    assert store.append_chunk(job.id, "w1", 2, b"late piece of the dead worker") is False
    again = reader.read_chunks(job.id, after=1, attempt=1)
    assert again.restarted and again.attempt == 2 and again.chunks == []
    assert chunks_of(reader.read_chunks(job.id, attempt=2)) == []
    assert store.append_chunk(job.id, "w2", 0, b"second attempt, piece 0")
    assert chunks_of(reader.read_chunks(job.id, after=-1, attempt=2)) == [(0, b"second attempt, piece 0")]
    assert chunks_of(reader.read_chunks(job.id)) == [(0, b"second attempt, piece 0")]
    assert store.complete(job.id, "w2", b"whole", "audio/wav", {})
    assert reader.read_chunks(job.id, after=0, attempt=1).restarted       # still the old attempt: told, not spliced


def test_a_released_job_and_one_handed_back_for_later_start_new_attempts(store):
    job = submit(store)
    store.claim("w1", 1, LEASE)
    assert store.append_chunk(job.id, "w1", 0, b"a")
    assert store.release(job.id, "w1")                       # the attempt does not count, but its stream is over
    assert store.read_chunks(job.id, after=0, attempt=1).restarted
    (claimed,) = store.claim("w2", 1, LEASE)
    assert claimed.attempts == 1                             # as before release
    fresh = store.read_chunks(job.id)
    assert fresh.attempt == 2 and fresh.chunks == []          # ... but a new stream attempt, never attempt 1 again
    assert store.append_chunk(job.id, "w2", 0, b"b")
    assert store.retry_later(job.id, "w2", STORAGE_REASON, 30.0)
    later = store.read_chunks(job.id, after=0, attempt=2)
    assert later.restarted and later.state is JobState.PROCESSING


def test_chunks_go_with_the_job(store, reopen):
    job = submit(store)
    store.claim("w1", 1, LEASE)
    assert store.append_chunk(job.id, "w1", 0, b"x" * 4096)
    assert store.complete(job.id, "w1", b"whole", "audio/wav", {})
    time.sleep(0.05)
    assert store.purge_expired(0.01) == 1
    for s in (store, reopen()):
        assert s.read_chunks(job.id) is None


# --- models: a queue per API model ---------------------------------------------------------------------------

TURBO, ORIGINAL = "chatterbox-turbo", "chatterbox-tts"


def submit_for(store, model: str, owner: str = "acct-a", max_queued: int = 1000) -> Job:
    job = new_job(owner)
    store.submit(job, max_queued, model=model)
    return job


def test_a_job_carries_its_model_and_defaults_to_the_original(store, reopen):
    turbo, plain = submit_for(store, TURBO), submit(store)
    assert turbo.model == TURBO and plain.model == ORIGINAL
    other = reopen()
    assert other.get(turbo.id).model == TURBO and other.get(plain.id).model == ORIGINAL
    job = Job(id=str(uuid.uuid4()), owner="a", params={"text": "x"}, model="chatterbox-multilingual")
    store.submit(job, 1000)                                      # a Job's own model, without model=
    assert other.get(job.id).model == "chatterbox-multilingual"


def test_a_claim_for_one_model_never_takes_another_models_job(store, reopen):
    turbo = [submit_for(store, TURBO, owner=o) for o in ("a", "b", "a")]
    original = [submit_for(store, ORIGINAL, owner=o) for o in ("a", "c")]
    assert store.claim("w-mtl", 10, LEASE, models=["chatterbox-multilingual"]) == []
    assert store.claim("w-none", 10, LEASE, models=[]) == []
    got = reopen().claim("w-orig", 10, LEASE, models=[ORIGINAL])
    assert {j.id for j in got} == {j.id for j in original} and all(j.model == ORIGINAL for j in got)
    assert store.claim("w-orig", 10, LEASE, models=[ORIGINAL]) == []           # Turbo's jobs wait for a Turbo worker
    assert {store.get(j.id).state for j in turbo} == {JobState.QUEUED}
    got = store.claim("w-turbo", 10, LEASE, models=[TURBO, ORIGINAL])
    assert [j.id for j in got] == [turbo[0].id, turbo[1].id, turbo[2].id]     # round robin by owner: a, b, a
    assert all(j.model == TURBO and j.state is JobState.PROCESSING for j in got)


def test_a_claim_for_any_model_takes_every_model(store):
    jobs = [submit_for(store, m, owner=o) for m, o in ((TURBO, "a"), (ORIGINAL, "a"), ("chatterbox-vc", "b"))]
    got = store.claim("w", 10, LEASE)                                          # models=None
    assert {j.id for j in got} == {j.id for j in jobs}
    assert {j.id: j.model for j in got} == {j.id: j.model for j in jobs}


def test_the_model_survives_release_recovery_and_retry(store, reopen):
    job = submit_for(store, TURBO)
    (j,) = store.claim("w1", 1, LEASE, models=[TURBO])
    assert store.release(j.id, "w1")                                           # graceful stop: back to Turbo's queue
    assert store.claim("w2", 1, LEASE, models=[ORIGINAL]) == []
    (j,) = store.claim("w2", 1, 0.05, models=[TURBO])
    time.sleep(0.1)
    assert store.recover_expired(max_attempts=5) == 1                          # its worker died: requeued
    other = reopen()
    assert other.get(job.id).model == TURBO and other.get(job.id).state is JobState.QUEUED
    assert other.claim("w3", 1, LEASE, models=[ORIGINAL]) == []
    (j,) = other.claim("w3", 1, LEASE, models=[TURBO])
    assert store.retry_later(j.id, "w3", STORAGE_REASON, 0.05)                 # its result could not be stored
    time.sleep(0.1)
    assert store.recover_expired(max_attempts=5) == 1
    assert store.claim("w4", 1, LEASE, models=[ORIGINAL]) == []
    (j,) = store.claim("w4", 1, LEASE, models=[TURBO])
    assert j.id == job.id and j.model == TURBO and j.attempts == 3


def test_fairness_and_queue_position_are_per_model(store, reopen):
    # owner a's turn in Turbo's queue does not move it in the original's
    o = [submit_for(store, ORIGINAL, owner=x) for x in ("a", "a", "b")]
    t = [submit_for(store, TURBO, owner=x) for x in ("a", "b", "b")]
    assert positions(reopen(), o) == {o[0].id: 0, o[2].id: 1, o[1].id: 2}
    assert positions(store, t) == {t[0].id: 0, t[1].id: 1, t[2].id: 2}     # only Turbo's jobs come before
    (first,) = store.claim("w-t", 1, LEASE, models=[TURBO])
    assert first.id == t[0].id
    assert positions(store, o) == {o[0].id: 0, o[2].id: 1, o[1].id: 2}     # unchanged by the Turbo claim
    assert [j.id for j in store.claim("w-o", 3, LEASE, models=[ORIGINAL])] == [o[0].id, o[2].id, o[1].id]


def test_the_queue_bound_is_per_model(store):
    for _ in range(2):
        submit_for(store, TURBO, max_queued=2)
    with pytest.raises(QueueFull):
        submit_for(store, TURBO, max_queued=2)
    original = submit_for(store, ORIGINAL, max_queued=2)                     # Turbo's full queue blocks only Turbo
    assert store.get(original.id).state is JobState.QUEUED
    assert store.stats().queued_by_model == {TURBO: 2, ORIGINAL: 1}
    store.claim("w", 10, LEASE, models=[TURBO])
    assert store.stats().queued_by_model == {ORIGINAL: 1}
    submit_for(store, TURBO, max_queued=2)


def test_an_old_sqlite_database_is_migrated(tmp_path):
    """A database of the store before models (no `model` column, turns per owner) opens: its jobs are the
    original model's, keep their place, and are claimed by the original's workers."""
    import sqlite3

    from chatterbox_serverless.jobs.sqlite_store import SQLiteJobStore
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE jobs (id TEXT PRIMARY KEY, owner TEXT NOT NULL, params TEXT NOT NULL, state TEXT NOT NULL,
            created_at REAL NOT NULL, started_at REAL, finished_at REAL, attempts INTEGER NOT NULL DEFAULT 0,
            error TEXT, metrics TEXT NOT NULL DEFAULT '{}', media_type TEXT, audio_file TEXT, worker_id TEXT,
            lease_until REAL, retry_reason TEXT, webhook_url TEXT, base_url TEXT,
            cancelled INTEGER NOT NULL DEFAULT 0, claims INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE owner_turns (owner TEXT PRIMARY KEY, turn INTEGER NOT NULL);
        INSERT INTO owner_turns VALUES ('a', 7), ('b', 3);
    """)
    now = time.time()
    for i, owner in enumerate(("a", "b", "a")):
        conn.execute("INSERT INTO jobs (id, owner, params, state, created_at) VALUES (?, ?, '{\"text\": \"x\"}', "
                     "'QUEUED', ?)", (f"old-{i}", owner, now + i))
    conn.commit()
    conn.close()
    store = SQLiteJobStore(path)
    try:
        assert store.get("old-0").model == ORIGINAL
        assert store.queue_position("old-1") == 0 and store.queue_position("old-0") == 1   # b was served before a
        assert store.claim("w", 10, LEASE, models=[TURBO]) == []
        assert [j.id for j in store.claim("w", 10, LEASE, models=[ORIGINAL])] == ["old-1", "old-0", "old-2"]
        new = submit_for(store, TURBO)
        assert [j.id for j in store.claim("w", 10, LEASE)] == [new.id]
    finally:
        store.close()
    reopened = SQLiteJobStore(path)                                                     # a second open: no-op
    reopened.close()


@pytest.mark.redis
def test_redis_jobs_queued_before_models_are_the_originals(redis_url):
    """Jobs queued by the store before models (hashes without `model`, in the queue keys the original model
    keeps) are claimed by the original's workers and by claims of any model."""
    import redis as redis_py

    from chatterbox_serverless.jobs.redis_store import RedisJobStore
    prefix = new_prefix()
    store = RedisJobStore(redis_url, prefix=prefix)
    raw = redis_py.Redis.from_url(redis_url)
    try:
        old = [submit(store, owner=o) for o in ("a", "b")]
        for j in old:
            raw.hdel(f"{prefix}job:{j.id}", "model")
        raw.delete(f"{prefix}models")
        assert store.get(old[0].id).model == ORIGINAL
        assert store.stats().queued_by_model == {ORIGINAL: 2}
        assert store.claim("w", 10, LEASE, models=[TURBO]) == []
        (first,) = store.claim("w", 1, LEASE, models=[ORIGINAL])
        (second,) = store.claim("w", 1, LEASE)
        assert {first.id, second.id} == {j.id for j in old}
        assert store.release(second.id, "w")                    # back into the original's queue
        assert store.claim("w", 1, LEASE, models=[ORIGINAL])[0].id == second.id
    finally:
        raw.close()
        store.close()
        delete_prefix(redis_url, prefix)
