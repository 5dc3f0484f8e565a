"""The worker with streamed jobs (engine double, SQLite): each piece the engine hands over lands in the job's chunk
channel while the job runs, and the pieces are the completed job's audio; a job that is not streamed gets none;
a job cancelled mid-stream stops its stream in the engine; a piece the store cannot write hands the job back for
a new attempt, whose stream restarts; a batch that fails and runs again streams nothing twice."""
from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest

from chatterbox_serverless.jobs.sqlite_store import SQLiteJobStore
from chatterbox_serverless.jobs.store import Job, JobState, StoreUnavailable
from chatterbox_serverless.jobs.worker import Worker
from chatterbox_serverless.media import encode_audio
from chatterbox_serverless.media.stream import unpack_piece

from conftest import FakeEngineForTests, wait_until

TEXT = "First sentence here. Second one is here. And a third, the last."


@pytest.fixture
def store(tmp_path):
    s = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    yield s
    s.close()


def submit(store, text: str = TEXT, **params) -> str:
    job = Job(id=str(uuid.uuid4()), owner="", params={"text": text, "output_format": "pcm", **params})
    store.submit(job, 100)
    return job.id


def worker(store, engine, **kw) -> Worker:
    for k, v in dict(batch_wait=0.0, poll_interval=0.01, maintenance_interval=0.05).items():
        kw.setdefault(k, v)
    return Worker(store, engine, encode=encode_audio, **kw)


def samples_of(read) -> np.ndarray:
    return np.concatenate([unpack_piece(c.data)[1] for c in read.chunks])


def test_pieces_land_in_the_channel_while_the_job_runs_and_make_its_audio(store):
    engine = FakeEngineForTests(piece_delay=0.3)
    streamed, plain = submit(store, stream=True), submit(store)
    w = worker(store, engine, batch_size=2)
    w.start()
    try:
        first = wait_until(lambda: (r := store.read_chunks(streamed)) and r.chunks and r, timeout=10)
        assert first.state is JobState.PROCESSING and first.chunks[0].seq == 0 and first.attempt == 1
        wait_until(lambda: store.get(streamed).state is JobState.COMPLETED, timeout=10)
    finally:
        w.stop()
    read = store.read_chunks(streamed, attempt=1)
    assert read.end and [c.seq for c in read.chunks] == [0, 1, 2]
    rates = {unpack_piece(c.data)[0] for c in read.chunks}
    stored, media_type = store.get_audio(streamed)
    assert rates == {24000} and media_type == "audio/pcm"
    assert samples_of(read).tobytes() == stored                      # the pieces are the job's audio
    assert store.get(streamed).metrics["stream_pieces"] == 3
    assert store.read_chunks(plain).chunks == [] and store.get(plain).state is JobState.COMPLETED
    assert "stream_pieces" not in store.get(plain).metrics


def test_an_engine_without_on_audio_completes_streamed_jobs_without_pieces(store):
    class OldEngine(FakeEngineForTests):
        def synthesize(self, requests):            # the contract before streaming
            assert not any(r.stream for r in requests)
            return super().synthesize(requests)
    job = submit(store, stream=True)
    w = worker(store, OldEngine())
    w.start()
    try:
        wait_until(lambda: store.get(job).state is JobState.COMPLETED)
    finally:
        w.stop()
    assert store.read_chunks(job).chunks == []


def test_a_job_cancelled_mid_stream_stops_in_the_engine(store):
    engine = FakeEngineForTests(piece_delay=0.3)
    job = submit(store, text="One. Two. Three. Four. Five. Six.", stream=True)
    w = worker(store, engine)
    w.start()
    try:
        wait_until(lambda: store.read_chunks(job).chunks)
        store.cancel(job)
        time.sleep(0.8)
        read = store.read_chunks(job, attempt=1)
        assert read.state is JobState.FAILED and read.end and 1 <= len(read.chunks) <= 3
        wait_until(lambda: not w._in_hand)
    finally:
        w.stop()
    assert store.get(job).cancelled


def test_a_piece_that_cannot_be_stored_hands_the_job_back_and_its_stream_restarts(store):
    engine = FakeEngineForTests(piece_delay=0.05)
    job = submit(store, stream=True)
    real_append, failed = store.append_chunk, threading.Event()

    def flaky_append(job_id, worker_id, seq, data):
        if seq == 1 and not failed.is_set():
            failed.set()
            raise StoreUnavailable("the job store is unavailable")
        return real_append(job_id, worker_id, seq, data)
    store.append_chunk = flaky_append
    w = worker(store, engine, lease_seconds=0.3, max_attempts=3)
    w.retry_delay = lambda attempts: 0.1
    w.start()
    try:
        wait_until(lambda: store.get(job).state is JobState.COMPLETED, timeout=15)
    finally:
        w.stop()
    read = store.read_chunks(job)
    assert failed.is_set() and read.attempt == 2 and [c.seq for c in read.chunks] == [0, 1, 2]
    assert store.read_chunks(job, after=0, attempt=1).restarted
    assert samples_of(read).tobytes() == store.get_audio(job)[0]


def test_a_failed_batch_run_again_streams_each_piece_once(store):
    class CrashOnce(FakeEngineForTests):
        crashed = False

        def synthesize(self, requests, on_audio=None):
            if len(requests) > 1 and not self.crashed:
                self.crashed = True
                for r in requests:           # some audio leaves, then the whole batch raises
                    if r.stream:
                        on_audio(r.request_id, 0, np.full(2400, 0.1, np.float32))
                raise RuntimeError("batch crashed")
            return super().synthesize(requests, on_audio)
    engine = CrashOnce(base_seconds=0.3, seconds_per_char=0.0)
    same = submit(store, text="A. B.", stream=True)
    w = worker(store, engine, batch_size=2)
    ids = [same, submit(store, text="C.", stream=True)]
    # the retry of each request alone makes other audio than the crashed run's first piece: it must fail, not splice
    w.start()
    try:
        wait_until(lambda: all(store.get(i).state.terminal for i in ids), timeout=10)
    finally:
        w.stop()
    for i in ids:
        job = store.get(i)
        read = store.read_chunks(i)
        assert job.state is JobState.FAILED and "other audio" in job.error
        assert [c.seq for c in read.chunks] == [0]


def test_a_failed_batch_run_again_with_the_same_audio_completes_with_each_piece_once(store):
    class CrashAfterStreaming(FakeEngineForTests):
        crashed = False

        def synthesize(self, requests, on_audio=None):
            results = super().synthesize(requests, on_audio)
            if len(requests) > 1 and not self.crashed:
                self.crashed = True
                raise RuntimeError("batch crashed after streaming everything")
            return results
    engine = CrashAfterStreaming()
    w = worker(store, engine, batch_size=2)
    ids = [submit(store, text="A. B.", stream=True), submit(store, text="C. D. E.", stream=True)]
    w.start()
    try:
        wait_until(lambda: all(store.get(i).state.terminal for i in ids), timeout=10)
    finally:
        w.stop()
    assert engine.crashed
    for i, n in zip(ids, (2, 3)):
        read = store.read_chunks(i)
        assert store.get(i).state is JobState.COMPLETED and [c.seq for c in read.chunks] == list(range(n))
        assert samples_of(read).tobytes() == store.get_audio(i)[0]
