"""Several models: a worker claims only its engine's model and says so in its heartbeat; a service with two
engines runs a worker each, every job done by the engine of its model; jobs' language and source audio reach
the engine's request."""
from __future__ import annotations

import time

import numpy as np
import pytest

from chatterbox_serverless.engine.contract import VoiceAudio
from chatterbox_serverless.jobs.sqlite_store import SQLiteJobStore
from chatterbox_serverless.jobs.store import Job, JobState
from chatterbox_serverless.jobs.worker import Worker
from chatterbox_serverless.media import encode_audio
from chatterbox_serverless.service import ServiceError, WorkerGroup, build_service
from chatterbox_serverless.settings import Settings

from conftest import FakeEngineForTests, wait_until

TURBO, ORIGINAL = "chatterbox-turbo", "chatterbox-tts"


@pytest.fixture
def store(tmp_path):
    s = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    yield s
    s.close()


def add(store, model: str, text: str = "hello", **params) -> str:
    job = Job(id=f"{model}-{time.monotonic_ns()}", owner="", params={"text": text, "output_format": "wav", **params})
    store.submit(job, 1000, model=model)
    return job.id


def make_worker(store, engine, **kw) -> Worker:
    return Worker(store, engine, encode=encode_audio, batch_wait=0.0, poll_interval=0.01, **kw)


def test_a_worker_claims_only_its_engines_model_and_advertises_it(store):
    turbo_jobs = [add(store, TURBO) for _ in range(3)]
    original = add(store, ORIGINAL)
    w = make_worker(store, FakeEngineForTests(model=TURBO))
    assert w.models == (TURBO,)
    w.start()
    try:
        wait_until(lambda: all(store.get(i).state == JobState.COMPLETED for i in turbo_jobs))
        time.sleep(0.1)                                         # polls that find only the original's job
        assert store.get(original).state == JobState.QUEUED
        assert store.stats().workers[w.worker_id]["models"] == [TURBO]
    finally:
        w.stop()


def test_the_engine_core_worker_claims_only_its_model_too(store, tmp_path):
    """The real tiny Turbo engine, driven step by step (jobs/engine_loop.py): its model's job only."""
    import torch

    from chatterbox_serverless.engine.pipeline import ChatterboxEngine
    from chatterbox_serverless.engine.resolve import resolve_checkpoint
    torch.set_num_threads(1)
    engine = ChatterboxEngine(resolve_checkpoint("tiny-random-turbo", tmp_path / "data"), device="cpu",
                              dtype="float32", watermark=False)
    engine.max_new_tokens = 20
    assert engine.model == TURBO
    original, turbo = add(store, ORIGINAL, text="Hi there."), add(store, TURBO, text="Hi there.")
    w = make_worker(store, engine)
    assert w.core is not None
    w.start()
    try:
        wait_until(lambda: store.get(turbo).state.terminal, timeout=60)
        assert store.get(turbo).state == JobState.COMPLETED, store.get(turbo).error
        assert store.get(original).state == JobState.QUEUED
    finally:
        w.stop()


def test_a_worker_may_be_told_its_models(store):
    ids = [add(store, ORIGINAL), add(store, "chatterbox-vc")]
    w = make_worker(store, FakeEngineForTests(), models=[ORIGINAL, "chatterbox-vc"])
    w.start()
    try:
        wait_until(lambda: all(store.get(i).state == JobState.COMPLETED for i in ids))
    finally:
        w.stop()


def test_language_and_source_audio_reach_the_engine(store):
    fetched = []

    def resolve(value: str) -> VoiceAudio:
        fetched.append(value)
        if value == "unreadable":
            raise ValueError("cannot decode the audio")
        return VoiceAudio(np.full(8000, 0.1 if value == "speech" else 0.2, np.float32), 16000)

    engine = FakeEngineForTests()
    german = add(store, ORIGINAL, text="Guten Tag.", language="de")
    converted = add(store, ORIGINAL, text="", source_audio="speech", reference_audio="target")
    bad = add(store, ORIGINAL, text="", source_audio="unreadable")
    w = make_worker(store, engine, resolve_reference=resolve, use_core=False)
    w.process(store.claim(w.worker_id, 8, 30))
    requests = {r.request_id: r for r in engine.requests}
    assert requests[german].language == "de" and requests[german].source is None
    vc = requests[converted]
    assert vc.language is None and float(vc.source.samples[0]) == pytest.approx(0.1)
    assert float(vc.voice.samples[0]) == pytest.approx(0.2)                 # the target voice
    assert bad not in requests
    failed = store.get(bad)
    assert failed.state == JobState.FAILED and failed.error == "source_audio: cannot decode the audio"
    assert sorted(fetched) == ["speech", "target", "unreadable"]


def test_a_service_with_two_engines_runs_each_models_jobs_on_its_engine(tmp_path):
    original, turbo = FakeEngineForTests(delay=0.02), FakeEngineForTests(delay=0.02, model=TURBO)
    settings = Settings(data_dir=tmp_path / "data", no_auth=True, batch_wait=0.0, shutdown_grace=5.0)
    service = build_service(settings, engines=[original, turbo], model_name="fake")
    try:
        assert service.served_models == (ORIGINAL, TURBO) and service.default_model == ORIGINAL
        assert service.engine is original and service.engine_for(TURBO) is turbo
        assert isinstance(service.worker, WorkerGroup) and len(service.workers) == 2
        assert [w.models for w in service.workers] == [(ORIGINAL,), (TURBO,)]
        ids = {m: [add(service.store, m, text=f"{m} {i}") for i in range(4)] for m in (ORIGINAL, TURBO)}
        service.start()
        assert service.worker.alive
        wait_until(lambda: all(service.store.get(i).state == JobState.COMPLETED for v in ids.values() for i in v))
        done_by = {m: {i for b in e.batches for i in b} for m, e in ((ORIGINAL, original), (TURBO, turbo))}
        assert done_by == {m: set(v) for m, v in ids.items()}
        workers = service.store.stats().workers
        assert sorted(tuple(info["models"]) for info in workers.values()) == [(ORIGINAL,), (TURBO,)]
        assert len({w.worker_id for w in service.workers}) == 2            # distinct leases
    finally:
        service.stop()
        service.close()
    assert not any(w.alive for w in service.workers)


def test_one_engine_keeps_a_plain_worker_and_an_api_without_engines_serves_what_it_is_told(tmp_path):
    settings = Settings(data_dir=tmp_path / "one", no_auth=True)
    service = build_service(settings, engine=FakeEngineForTests(model=TURBO))
    try:
        assert service.served_models == (TURBO,) and isinstance(service.worker, Worker)
    finally:
        service.close()
    api = build_service(Settings(data_dir=tmp_path / "api", no_auth=True, workers=0),
                        served_models=[TURBO, ORIGINAL])
    try:
        assert api.served_models == (TURBO,  ORIGINAL) and api.worker is None and api.janitor is not None
    finally:
        api.close()
    bare = build_service(Settings(data_dir=tmp_path / "bare", no_auth=True, workers=0))
    try:
        assert bare.served_models == (ORIGINAL,)
    finally:
        bare.close()


def test_two_engines_of_one_model_are_refused(tmp_path):
    with pytest.raises(ServiceError, match="serve chatterbox-turbo"):
        build_service(Settings(data_dir=tmp_path / "d", no_auth=True),
                      engines=[FakeEngineForTests(model=TURBO), FakeEngineForTests(model=TURBO)])
