"""Where each backend keeps a job's chunk channel, beyond the shared contract: SQLite rows deleted by the claim of
a new attempt and by the purge; a Redis stream per job with no TTL while the job runs, the job's TTL once it is
terminal, deleted by a new claim."""
from __future__ import annotations

import sqlite3
import time
import uuid

import redis

from chatterbox_serverless.jobs.redis_store import RedisJobStore
from chatterbox_serverless.jobs.sqlite_store import SQLiteJobStore
from chatterbox_serverless.jobs.store import Job
from chatterbox_serverless.testing.redis import delete_prefix, new_prefix


def new_job() -> Job:
    return Job(id=str(uuid.uuid4()), owner="acct", params={"text": "hi", "stream": True})


def test_sqlite_rows_go_with_the_attempt_and_the_job(tmp_path):
    store = SQLiteJobStore(tmp_path / "jobs.db")
    try:
        job = new_job()
        store.submit(job, 10)
        store.claim("w1", 1, 0.05)
        assert store.append_chunk(job.id, "w1", 0, b"a" * 100)
        rows = lambda: sqlite3.connect(tmp_path / "jobs.db").execute(
            "SELECT attempt, seq FROM job_chunks WHERE job_id = ?", (job.id,)).fetchall()
        assert rows() == [(1, 0)]
        time.sleep(0.1)
        store.recover_expired(3)
        assert rows() == [(1, 0)]                   # kept until a new attempt starts (a reader is told first)
        store.claim("w2", 1, 30)
        assert rows() == []
        assert store.append_chunk(job.id, "w2", 0, b"b")
        assert store.complete(job.id, "w2", b"whole", "audio/wav", {})
        time.sleep(0.05)
        store.purge_expired(0.01)
        assert rows() == []
    finally:
        store.close()


def test_redis_stream_has_the_jobs_ttl(redis_url):
    prefix = new_prefix()
    store = RedisJobStore(redis_url, prefix=prefix, retention=60)
    r = redis.Redis.from_url(redis_url)
    try:
        job = new_job()
        store.submit(job, 10)
        store.claim("w1", 1, 30)
        assert store.append_chunk(job.id, "w1", 0, b"a")
        key = f"{prefix}chunks:{job.id}"
        assert r.type(key) == b"stream" and r.ttl(key) == -1          # no TTL while the job runs
        assert [i for i, _ in r.xrange(key)] == [b"1-1"]
        assert store.complete(job.id, "w1", b"whole", "audio/wav", {})
        assert 55 <= r.ttl(key) <= 60 and abs(r.ttl(key) - r.ttl(f"{prefix}job:{job.id}")) <= 1
        other = new_job()
        store.submit(other, 10)
        store.claim("w1", 1, 0.05)
        assert store.append_chunk(other.id, "w1", 0, b"b")
        time.sleep(0.1)
        store.recover_expired(3)
        store.claim("w2", 1, 30)
        assert not r.exists(f"{prefix}chunks:{other.id}")              # the new attempt starts a new stream
        store.purge_expired(0)
        time.sleep(0.01)
        store.purge_expired(0)
        assert not r.exists(key)
    finally:
        store.close()
        r.close()
        delete_prefix(redis_url, prefix)
