"""Storage failures are the server's problem, not the job's: a worker (with the engine double) whose results
cannot be stored hands its jobs back, claims nothing while `store.writable()` reports the problem, and finishes
them once storage is repaired; only a job that used all its attempts FAILs, with a reason naming nothing of the
server. Both stores, billing attached (a completed job is settled, a failed one released)."""
from __future__ import annotations

import errno
import shutil
import time
import uuid

import pytest

from chatterbox_serverless.accounts import account_store_for
from chatterbox_serverless.accounts.service import Accounts, Pricing
from chatterbox_serverless.engine.contract import VoiceAudio
from chatterbox_serverless.jobs.redis_store import RedisJobStore
from chatterbox_serverless.jobs.sqlite_store import SQLiteJobStore
from chatterbox_serverless.jobs.store import Job, JobState, StoreUnavailable
from chatterbox_serverless.jobs.worker import STORAGE_REASON, Worker
from chatterbox_serverless.media import encode_audio

from conftest import FakeEngineForTests, wait_until
from chatterbox_serverless.testing.redis import RedisProcess, delete_prefix, free_port, new_prefix

SERVER_PATH = "/srv/data/audio/3f2a.mp3"     # what an OS error would carry: must never reach a job


class Env:
    """A store with billing attached, an account with credits, workers with the engine double."""

    def __init__(self, kind: str, store, audio_dir=None):
        self.kind, self.store, self.audio_dir = kind, store, audio_dir
        self.account_store = account_store_for(store)
        store.attach_billing(self.account_store)
        self.accounts = Accounts(self.account_store, Pricing(credits_per_second=2.0, minimum=3))
        _, self.acc = self.accounts.create_key(credits=1000)
        self.workers: list[Worker] = []

    def account(self):
        return self.account_store.get(self.acc.id)

    def submit(self, text: str = "hello world") -> str:
        job = Job(id=str(uuid.uuid4()), owner=self.acc.id, params={"text": text, "output_format": "wav"})
        self.accounts.hold_for(self.acc, job.id, text)
        self.store.submit(job, 100)
        return job.id

    def worker(self, engine=None, **kw) -> Worker:
        for k, v in dict(batch_wait=0.0, poll_interval=0.01, maintenance_interval=0.05, lease_seconds=0.3,
                         max_attempts=3, encode=encode_audio).items():
            kw.setdefault(k, v)
        w = Worker(self.store, engine or FakeEngineForTests(), **kw)
        self.workers.append(w)
        return w

    def close(self) -> None:
        for w in self.workers:
            w.stop(grace=1.0)
        self.account_store.close()
        self.store.close()


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def env(request, tmp_path):
    if request.param == "sqlite":
        store = SQLiteJobStore(tmp_path / "data" / "jobs.sqlite3")
        e, cleanup = Env("sqlite", store, store.audio_dir), None
    else:       # audio in a shared directory (inline_max_bytes=0: every result is a file there)
        url, prefix = request.getfixturevalue("redis_url"), new_prefix()
        audio_dir = tmp_path / "shared-audio"
        e = Env("redis", RedisJobStore(url, prefix=prefix, audio_dir=str(audio_dir), inline_max_bytes=0), audio_dir)
        cleanup = (url, prefix)
    yield e
    e.close()
    if cleanup:
        delete_prefix(*cleanup)


def path_free(text: str | None) -> bool:
    return text is not None and "/" not in text


def test_a_broken_audio_dir_holds_the_job_until_repaired(env, tmp_path):
    """The audio directory is replaced by a file (root ignores chmod): the job is not FAILED while that lasts,
    the worker claims nothing, writable() says why (no path); repaired, the job completes and is billed."""
    away = tmp_path / "audio-away"
    shutil.move(env.audio_dir, away)
    env.audio_dir.write_text("not a directory any more")
    problem = env.store.writable()
    assert problem and problem.startswith("audio files cannot be written") and path_free(problem)
    first = env.submit()
    w = env.worker()
    w.start()
    wait_until(lambda: w.storage_problem is not None and env.store.get(first).attempts == 1, timeout=10)
    second = env.submit()                          # queued while storage is broken: not claimed meanwhile
    deadline = time.monotonic() + 2.0              # several backoffs (0.3 s, the lease) long
    while time.monotonic() < deadline:
        for job_id in (first, second):
            job = env.store.get(job_id)
            assert job.state in (JobState.PROCESSING, JobState.QUEUED) and job.error is None, job
        time.sleep(0.05)
    assert env.store.get(first).attempts == 1 and env.store.get(second).attempts == 0
    assert w.storage_problem == env.store.writable()
    assert env.account().held == 2 * 7

    env.audio_dir.unlink()                         # repaired
    shutil.move(away, env.audio_dir)
    assert env.store.writable() is None
    wait_until(lambda: all(env.store.get(j).state is JobState.COMPLETED for j in (first, second)), timeout=10)
    assert env.store.get(first).attempts == 2 and env.store.get(second).attempts == 1
    assert env.store.get_audio(first)[1] == "audio/wav" and w.storage_problem is None
    a = env.account()
    assert (a.balance, a.held) == (1000 - 2 * 3, 0)    # 0.21 s each: the minimum, 3


def test_a_job_that_exhausts_its_attempts_fails_with_a_path_free_reason(env, monkeypatch):
    """Results cannot be stored although the probe passes (a full disk with room for a probe, not a result):
    each attempt hands the job back after a growing backoff; the last one FAILs it, saying nothing of the
    server; its hold is released."""
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", SERVER_PATH)
    import chatterbox_serverless.jobs.redis_store as redis_store
    import chatterbox_serverless.jobs.sqlite_store as sqlite_store
    monkeypatch.setattr(sqlite_store if env.kind == "sqlite" else redis_store, "write_atomically", no_space)
    job_id = env.submit()
    w = env.worker(lease_seconds=0.2)
    w.start()
    wait_until(lambda: env.store.get(job_id).state is JobState.FAILED, timeout=15)
    job = env.store.get(job_id)
    assert job.error == STORAGE_REASON and path_free(job.error) and job.attempts == 3
    assert env.store.get_audio(job_id) is None and w.metrics.storage_errors._value.get() == 3
    a = env.account()
    assert (a.balance, a.held) == (1000, 0)
    assert env.accounts.store.usage(a.id).failed == 1
    assert not [p for p in env.audio_dir.iterdir() if not p.name.startswith(".probe")]


def nothing_writable_then_repaired(env: Env, break_storage, repair) -> None:
    """Break every write while the job is being synthesised: completing, handing back, recovering all fail; the
    job is never FAILED; once writes work again it is queued again and completes, billed once."""
    engine = FakeEngineForTests(delay=0.4)
    job_id = env.submit()
    w = env.worker(engine)
    w.start()
    wait_until(lambda: env.store.get(job_id).state is JobState.PROCESSING, timeout=10)
    break_storage()
    problem = env.store.writable()
    assert problem is not None and path_free(problem)
    wait_until(lambda: w.storage_problem is not None and len(engine.batches) == 1, timeout=10)
    time.sleep(1.0)                                 # past the lease (0.3 s): recover_expired cannot write either
    job = env.store.get(job_id)
    assert job.state is JobState.PROCESSING and job.error is None
    assert env.account().held == 7
    repair()
    wait_until(lambda: env.store.get(job_id).state is JobState.COMPLETED, timeout=10)
    assert env.store.get(job_id).attempts == 2 and len(engine.batches) == 2
    a = env.account()
    assert (a.balance, a.held) == (1000 - 3, 0)


def test_sqlite_read_only_data_dir_leaves_the_job_to_its_lease(tmp_path, monkeypatch):
    """Every transaction fails as on a read-only data dir (root ignores permissions, so it is simulated at the
    store's transaction), audio writes fail with EROFS."""
    env = Env("sqlite", SQLiteJobStore(tmp_path / "data" / "jobs.sqlite3"))
    store = env.store

    def read_only(*args, **kwargs):
        raise StoreUnavailable("the job database cannot be written (attempt to write a readonly database)")

    def no_files(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", SERVER_PATH)

    def break_storage():
        monkeypatch.setattr(store, "_transaction", read_only)
        import chatterbox_serverless.jobs.sqlite_store as sqlite_store
        monkeypatch.setattr(sqlite_store, "write_atomically", no_files)
    try:
        nothing_writable_then_repaired(env, break_storage, monkeypatch.undo)
    finally:
        monkeypatch.undo()
        env.close()


def test_redis_out_of_memory_leaves_the_job_to_its_lease(tmp_path):
    """A real Redis refusing every write (maxmemory reached under noeviction), then given memory again."""
    server = RedisProcess(tmp_path / "redis", persistent=False).start()
    env = Env("redis", RedisJobStore(server.url, prefix="t:"))
    try:
        env.store.r.config_set("maxmemory-policy", "noeviction")
        nothing_writable_then_repaired(env, lambda: env.store.r.config_set("maxmemory", "1"),
                                       lambda: env.store.r.config_set("maxmemory", "0"))
    finally:
        env.close()
        server.stop()


def test_error_texts_never_carry_a_server_path(env):
    """Engine, encoder and reference errors are shown to clients: paths in them are removed, an OS error's file
    name is dropped; an encoder's storage error is the server's (the job is retried, not failed)."""
    class PathEngine(FakeEngineForTests):
        def synthesize(self, requests):
            if any("ENGINE" in r.text for r in requests):
                raise RuntimeError(f"cannot open {SERVER_PATH} (model shard)")
            return super().synthesize(requests)

    def encode(audio, rate, fmt):
        if fmt == "flac":
            raise OSError(errno.ENOENT, "No such file or directory", SERVER_PATH)
        if fmt == "ogg":
            raise OSError(errno.EROFS, "Read-only file system", SERVER_PATH)
        return encode_audio(audio, rate, fmt)

    def resolve(value: str) -> VoiceAudio:
        raise ValueError(f"reference_audio: cannot read ./data/cache/{value}.wav")

    ids = {}
    for name, params in (("engine", {"text": "ENGINE please"}), ("flac", {"output_format": "flac"}),
                         ("ogg", {"output_format": "ogg"}), ("ref", {"reference_audio": "voice"})):
        job = Job(id=str(uuid.uuid4()), owner="", params={"text": "hello", **params})
        env.store.submit(job, 100)
        ids[name] = job.id
    w = env.worker(PathEngine(), batch_size=1, encode=encode, resolve_reference=resolve)
    for _ in range(4):
        w.process(env.store.claim(w.worker_id, 1, 30))
    jobs = {name: env.store.get(job_id) for name, job_id in ids.items()}
    assert jobs["engine"].error == "synthesis failed: RuntimeError: cannot open <path> (model shard)"
    assert jobs["flac"].error == "encoding the audio as flac failed: No such file or directory"
    assert jobs["ref"].error == "reference_audio: cannot read <path>"
    assert jobs["ogg"].state is JobState.PROCESSING and jobs["ogg"].error is None    # handed back
    assert all(path_free(j.error) for j in jobs.values() if j.state is JobState.FAILED)


def test_redis_writable_reports_refused_writes(tmp_path):
    """A Redis that refuses writes (out of memory under noeviction) or cannot be reached: a short reason."""
    server = RedisProcess(tmp_path / "redis", persistent=False).start()
    store = RedisJobStore(server.url, prefix="t:")
    try:
        assert store.writable() is None
        store.r.config_set("maxmemory", "1")
        store.r.config_set("maxmemory-policy", "noeviction")
        assert store.writable() == "Redis refuses writes (OOM)"
        store.r.config_set("maxmemory", "0")
        assert store.writable() is None
    finally:
        store.close()
        server.stop()
    gone = RedisJobStore(f"redis://127.0.0.1:{free_port()}/0", timeout=1.0)
    try:
        assert gone.writable() == "Redis cannot be reached"
    finally:
        gone.close()
