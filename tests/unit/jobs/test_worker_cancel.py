"""The worker and cancellation: between its stages it records progress and learns which jobs are still its own,
so a job cancelled while its voice is fetched never reaches the engine, and one cancelled during synthesis is
neither encoded nor stored (the engine's batch in progress is not interrupted: it has no per-request abort)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from chatterbox_serverless.engine.contract import VoiceAudio
from chatterbox_serverless.jobs.sqlite_store import SQLiteJobStore
from chatterbox_serverless.jobs.store import Job, JobState
from chatterbox_serverless.jobs.worker import Worker
from chatterbox_serverless.media import encode_audio
from chatterbox_serverless.testing import FakeEngineForTests


@pytest.fixture
def store(tmp_path):
    s = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    yield s
    s.close()


def add(store, text: str = "hello", **params) -> str:
    job = Job(id=f"job-{time.monotonic_ns()}", owner="", params={"text": text, "output_format": "wav", **params})
    store.submit(job, 1000)
    return job.id


class CountingEncoder:
    def __init__(self):
        self.calls = 0

    def __call__(self, audio, rate, fmt):
        self.calls += 1
        return encode_audio(audio, rate, fmt)


def stages(store, job_id: str) -> list:
    return [(e.type, e.data.get("status") or e.data.get("stage")) for e in store.job_events(job_id)]


def test_a_job_cancelled_while_its_voice_is_fetched_never_reaches_the_engine(store):
    fetching, release = threading.Event(), threading.Event()

    def slow_voice(value: str) -> VoiceAudio:
        fetching.set()
        release.wait(10)
        return VoiceAudio(np.zeros(16000, np.float32), 16000)

    plain, voiced = add(store), add(store, reference_audio="https://example.com/me.wav")
    engine = FakeEngineForTests()
    w = Worker(store, engine, encode=encode_audio, resolve_reference=slow_voice, batch_wait=0.0)
    batch = store.claim(w.worker_id, 8, 30)
    t = threading.Thread(target=w.process, args=(batch,))
    t.start()
    assert fetching.wait(10)
    assert store.cancel(voiced).cancelled
    release.set()
    t.join(20)
    assert engine.batches == [[plain]]                       # the cancelled job was dropped before the engine
    assert store.get(plain).state is JobState.COMPLETED
    assert store.get(voiced).state is JobState.FAILED and store.get(voiced).cancelled
    assert stages(store, plain) == [("state", "QUEUED"), ("state", "PROCESSING"), ("progress", "synthesizing"),
                                    ("progress", "encoding"), ("state", "COMPLETED")]
    assert stages(store, voiced) == [("state", "QUEUED"), ("state", "PROCESSING"), ("state", "FAILED")]


def test_a_job_cancelled_during_synthesis_is_not_encoded_nor_stored(store):
    long_text = "A sentence that goes on for a while. " * 12           # 444 characters: 2 chunks
    kept, cancelled = add(store, long_text), add(store)
    engine = FakeEngineForTests(delay=0.6)
    encoder = CountingEncoder()
    w = Worker(store, engine, encode=encoder, batch_wait=0.0)
    batch = store.claim(w.worker_id, 8, 30)
    t = threading.Thread(target=w.process, args=(batch,))
    t.start()
    deadline = time.monotonic() + 10
    while not engine.batches and time.monotonic() < deadline:
        time.sleep(0.01)
    store.cancel(cancelled)                                  # while the engine runs the batch
    t.join(20)
    assert engine.batches == [[kept, cancelled]]             # no per-request abort: it ran with the batch
    assert encoder.calls == 1                                # ...but only the kept job was encoded
    assert store.get(kept).state is JobState.COMPLETED and store.get_audio(cancelled) is None
    assert store.get(cancelled).cancelled and w.metrics.jobs_finished.labels("COMPLETED")._value.get() == 1
    progress = [e.data for e in store.job_events(kept) if e.type == "progress"]
    assert [(p["stage"], p["chunks_done"], p["chunks_total"]) for p in progress] == [
        ("synthesizing", 0, 2), ("encoding", 2, 2)]
    assert [e.type for e in store.job_events(cancelled)].count("progress") == 1    # synthesizing only
