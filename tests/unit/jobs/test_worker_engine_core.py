"""The worker driving the engine core (jobs/engine_loop.py) with the tiny random engine on SQLite: a short job
claimed while a long one decodes completes first, with the audio the engine gives it alone; a job cancelled while
it decodes is aborted and the other completes; a streamed job's chunk channel carries its audio as it is made
and the pieces are its stored audio; stopping with no grace hands unfinished jobs back to the queue."""
from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch

from chatterbox_serverless.engine.contract import SynthesisParams, SynthesisRequest
from chatterbox_serverless.engine.pipeline import ChatterboxEngine
from chatterbox_serverless.engine.resolve import resolve_checkpoint
from chatterbox_serverless.jobs.sqlite_store import SQLiteJobStore
from chatterbox_serverless.jobs.store import Job, JobState
from chatterbox_serverless.jobs.worker import Worker
from chatterbox_serverless.media import encode_audio
from chatterbox_serverless.media.stream import unpack_piece

from conftest import wait_until

LONG = " ".join(f"Sentence number {i} of the long request is here." for i in range(8))
SHORT = "A short one."


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    torch.set_num_threads(1)
    e = ChatterboxEngine(resolve_checkpoint("tiny-random", tmp_path_factory.mktemp("data")), device="cpu",
                         dtype="float32", max_chunk_chars=60, watermark=False)
    e.max_new_tokens = 40
    return e


@pytest.fixture
def store(tmp_path):
    s = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    yield s
    s.close()


def submit(store, text: str, **params) -> str:
    job = Job(id=str(uuid.uuid4()), owner="", params={"text": text, "output_format": "pcm", "seed": 3, **params})
    store.submit(job, 100)
    return job.id


def worker(store, engine, **kw) -> Worker:
    for k, v in dict(batch_wait=0.0, poll_interval=0.01, maintenance_interval=0.05,
                     cancel_poll_interval=0.02).items():
        kw.setdefault(k, v)
    return Worker(store, engine, encode=encode_audio, **kw)


def pcm(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2")


def slowed(engine, monkeypatch, seconds: float = 0.01):
    """Each T3 step a little slower, so that jobs arriving later find the first one still decoding."""
    import time
    step = engine.decoder.step

    def slow_step():
        time.sleep(seconds)
        return step()
    monkeypatch.setattr(engine.decoder, "step", slow_step)


def test_the_worker_drives_the_core_and_a_short_job_overtakes_a_long_one(store, engine, monkeypatch):
    alone = engine.synthesize([SynthesisRequest(SHORT, SynthesisParams(seed=3))])[0].audio
    slowed(engine, monkeypatch)
    w = worker(store, engine)
    assert w.core is not None
    long_id = submit(store, LONG)
    w.start()
    try:
        wait_until(lambda: engine.decoder.rows_in_use > 0, timeout=30)
        short_id = submit(store, SHORT)
        w.notify()
        wait_until(lambda: store.get(long_id).state is JobState.COMPLETED, timeout=120)
    finally:
        w.stop()
    short, long = store.get(short_id), store.get(long_id)
    assert short.state is JobState.COMPLETED and short.finished_at < long.finished_at
    data, _ = store.get_audio(short_id)
    expected, _ = encode_audio(alone, engine.sample_rate, "pcm")
    assert data == expected


def test_a_job_cancelled_while_it_decodes_is_aborted_and_the_other_completes(store, engine, monkeypatch):
    slowed(engine, monkeypatch)
    w = worker(store, engine)
    keep, drop = submit(store, LONG), submit(store, LONG, seed=4)
    w.start()
    try:
        wait_until(lambda: engine.decoder.rows_in_use > 0, timeout=30)
        store.cancel(drop)
        wait_until(lambda: store.get(keep).state is JobState.COMPLETED, timeout=120)
        wait_until(lambda: not w.core.has_unfinished(), timeout=30)
    finally:
        w.stop()
    assert store.get(drop).cancelled and store.get(drop).state is JobState.FAILED
    assert not any(r.request.request_id == drop for r in engine.decoder.active)


def test_a_streamed_job_fills_its_chunk_channel_with_its_audio(store, engine):
    w = worker(store, engine)
    job_id = submit(store, LONG, stream=True)
    w.start()
    try:
        wait_until(lambda: store.get(job_id).state is JobState.COMPLETED, timeout=120)
    finally:
        w.stop()
    read = store.read_chunks(job_id, attempt=1)
    assert read.end and len(read.chunks) > 1
    streamed = np.concatenate([unpack_piece(c.data)[1] for c in read.chunks])
    data, _ = store.get_audio(job_id)
    assert np.array_equal(streamed, pcm(data))


def test_stopping_without_grace_hands_unfinished_jobs_back(store, engine, monkeypatch):
    slowed(engine, monkeypatch, 0.05)
    w = worker(store, engine)
    job_id = submit(store, LONG)
    w.start()
    wait_until(lambda: engine.decoder.rows_in_use > 0, timeout=30)
    w.stop(grace=0.0)
    job = store.get(job_id)
    assert job.state is JobState.QUEUED
