"""What the Redis job store does beyond the shared contract: Redis TTLs as retention, audio in a shared
directory, worker liveness keys, the events stream, key isolation, and StoreUnavailable / recovery when Redis
goes away and comes back (a redis-server started here, with AOF persistence)."""
from __future__ import annotations

import time
import uuid

import pytest
import redis

from chatterbox_serverless.jobs.redis_store import RedisJobStore
from chatterbox_serverless.jobs.store import Job, JobState, StoreUnavailable

from chatterbox_serverless.testing.redis import RedisProcess, delete_prefix, free_port, new_prefix


@pytest.fixture
def make_store(redis_url):
    opened, prefixes = [], []

    def make(prefix: str | None = None, **kwargs) -> RedisJobStore:
        if prefix is None:
            prefix = new_prefix()
            prefixes.append(prefix)
        opened.append(RedisJobStore(redis_url, prefix=prefix, **kwargs))
        return opened[-1]

    yield make
    for s in opened:
        s.close()
    for p in prefixes:
        delete_prefix(redis_url, p)


def job(owner: str = "acct") -> Job:
    return Job(id=str(uuid.uuid4()), owner=owner, params={"text": "hi"})


def test_retention_is_a_redis_ttl(make_store):
    store = make_store(retention=0.3)
    done, kept = job(), job()
    store.submit(done, 10)
    store.submit(kept, 10)
    store.claim("w", 1, 30)
    assert store.complete(done.id, "w", b"audio", "audio/wav", {})
    ttl = store.r.pttl(store._k("job", done.id))
    assert 0 < ttl <= 300 and 0 < store.r.pttl(store._k("audio", done.id)) <= 300
    assert store.r.pttl(store._k("job", kept.id)) == -1          # live jobs never expire
    assert store.stats().by_state["COMPLETED"] == 1
    time.sleep(0.45)
    assert store.get(done.id) is None and store.get_audio(done.id) is None     # gone without any purge
    assert store.stats().by_state["COMPLETED"] == 0
    assert store.get(kept.id).state is JobState.QUEUED
    assert store.purge_expired(0.1) == 1                         # the index entry is tidied up
    assert store.r.zcard(store._k("done", "COMPLETED")) == 0


def test_large_audio_goes_to_the_shared_directory(make_store, tmp_path):
    shared = tmp_path / "shared-audio"
    api = make_store(audio_dir=str(shared), inline_max_bytes=100)
    worker = make_store(prefix=api.prefix, audio_dir=str(shared), inline_max_bytes=100)
    small, big, lost = job(), job(), job()
    for j in (small, big, lost):
        api.submit(j, 10)
    worker.claim("w1", 3, 30)
    assert worker.complete(small.id, "w1", b"s" * 100, "audio/wav", {})
    assert worker.complete(big.id, "w1", b"B" * 5000, "audio/mpeg", {})
    assert not worker.complete(lost.id, "someone-else", b"L" * 5000, "audio/mpeg", {})
    files = sorted(p.name for p in shared.iterdir())
    assert len(files) == 1 and files[0].startswith(big.id + ".")   # the losing write was removed at once
    assert api.get_audio(big.id) == (b"B" * 5000, "audio/mpeg")
    assert api.get_audio(small.id) == (b"s" * 100, "audio/wav")
    assert api.r.get(api._k("audio", big.id)) is None              # not duplicated in Redis
    time.sleep(0.02)
    assert api.purge_expired(0.01) == 2
    assert list(shared.iterdir()) == [] and api.get_audio(big.id) is None


def test_workers_alive_while_their_key_lives(make_store):
    store = make_store()
    store.heartbeat("w-short", [], 0.2, {"batch_size": 2})
    store.heartbeat("w-long", [], 30, {"batch_size": 8})
    assert set(store.stats().workers) == {"w-short", "w-long"}
    time.sleep(0.35)
    assert set(store.stats().workers) == {"w-long"}
    assert store.r.smembers(store._k("workers")) == {b"w-long"}      # the stale id was pruned


def test_events_stream_records_each_terminal_transition_once(make_store):
    store = make_store()
    a, b = job(), job()
    store.submit(a, 10)
    store.submit(b, 10)
    store.claim("w1", 2, 30)
    assert store.complete(a.id, "w1", b"x", "audio/wav", {})
    assert not store.complete(a.id, "w1", b"x", "audio/wav", {})
    assert store.fail(b.id, "w1", "no")
    assert store.events() == [{"job": a.id, "state": "COMPLETED", "worker": "w1"},
                              {"job": b.id, "state": "FAILED", "worker": "w1"}]


def test_prefixes_isolate_deployments(make_store):
    one, two = make_store(), make_store()
    j = job()
    one.submit(j, 10)
    assert two.get(j.id) is None and two.claim("w", 10, 30) == []
    assert one.stats().by_state["QUEUED"] == 1 and two.stats().by_state["QUEUED"] == 0


def test_duplicate_job_id_is_refused(make_store):
    store = make_store()
    j = job()
    store.submit(j, 10)
    with pytest.raises(redis.ResponseError):
        store.submit(j, 10)
    assert len(store.claim("w", 10, 30)) == 1


def test_unreachable_redis_raises_store_unavailable_quickly():
    store = RedisJobStore(f"redis://127.0.0.1:{free_port()}/0", timeout=1.0)
    try:
        for call in (lambda: store.submit(job(), 10), lambda: store.get("x"), store.stats,
                     lambda: store.claim("w", 1, 30), lambda: store.wait("x", 0.1)):
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable, match="unavailable"):
                call()
            assert time.monotonic() - t0 < 3
    finally:
        store.close()


def test_redis_restart_loses_nothing_accepted_and_the_store_recovers(tmp_path):
    server = RedisProcess(tmp_path / "redis").start()
    store = RedisJobStore(server.url, timeout=1.0)
    try:
        jobs = [job(f"acct-{i % 2}") for i in range(6)]
        for j in jobs:
            store.submit(j, 100)
        claimed = store.claim("w1", 2, 30)
        assert store.complete(claimed[0].id, "w1", b"kept", "audio/wav", {})
        server.kill()                                              # SIGKILL: only the AOF survives
        with pytest.raises(StoreUnavailable):
            store.get(jobs[0].id)
        server.start()                                             # same port, same directory
        assert store.get_audio(claimed[0].id) == (b"kept", "audio/wav")
        assert store.get(claimed[1].id).state is JobState.PROCESSING
        st = store.stats()
        assert (st.by_state["QUEUED"], st.by_state["PROCESSING"], st.by_state["COMPLETED"]) == (4, 1, 1)
        rest = store.claim("w2", 10, 30)
        assert {j.id for j in rest} == {j.id for j in jobs} - {c.id for c in claimed}
        assert not store.complete(claimed[0].id, "w1", b"again", "audio/wav", {})
    finally:
        store.close()
        server.stop()


def test_wait_survives_a_redis_restart(tmp_path):
    """A waiter's events listener reconnects and resumes from its position in the stream."""
    import threading

    server = RedisProcess(tmp_path / "redis").start()
    api, worker = RedisJobStore(server.url, timeout=1.0), RedisJobStore(server.url, timeout=1.0)
    try:
        j = job()
        api.submit(j, 10)
        worker.claim("w1", 1, 30)
        assert api.wait(j.id, 0.05).state is JobState.PROCESSING     # starts the listener
        server.kill()
        server.start()
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("job", api.wait(j.id, 10)))
        t.start()
        time.sleep(0.3)
        assert worker.complete(j.id, "w1", b"x", "audio/wav", {})
        t.join(10)
        assert result["job"].state is JobState.COMPLETED
    finally:
        api.close()
        worker.close()
        server.stop()
