"""The engine core (engine/core.py) on tiny random checkpoints, float32, CPU: requests added between steps give
exactly the audio `synthesize` gives them (streamed or not, alone or among others), a short request admitted
while a long one decodes finishes first, an abort frees its rows at the next step and leaves the others
unchanged, admission respects free_slots; and the scheduler's policy on hand-made views."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from chatterbox_serverless.engine.contract import PreparedVoice, SynthesisParams, SynthesisRequest
from chatterbox_serverless.engine.core import (AudioChunk, EngineCore, PendingChunk, RequestFailed, RequestFinished,
                                               S3GenUnit, Scheduler, SchedulerConfig, SchedulerView)
from chatterbox_serverless.engine.pipeline import ChatterboxEngine
from chatterbox_serverless.engine.resolve import resolve_checkpoint

LONG = ("The long request has many sentences. Each of them becomes a chunk of its own. The chunks decode side "
        "by side in T3. Then S3Gen vocodes them in groups. This one keeps the engine busy for a while.")
SHORT = "A short one."


@pytest.fixture(scope="module", params=["tiny-random", "tiny-random-turbo"])
def engine(request, tmp_path_factory):
    torch.set_num_threads(1)
    return ChatterboxEngine(resolve_checkpoint(request.param, tmp_path_factory.mktemp("data")), device="cpu",
                            dtype="float32", max_chunk_chars=60)


def req(rid: str, text: str, seed: int = 1, stream: bool = False) -> SynthesisRequest:
    return SynthesisRequest(text, SynthesisParams(seed=seed), request_id=rid, stream=stream)


def drain(core: EngineCore, steps: list | None = None, add: dict | None = None) -> list:
    """Step until done; `add`: {step number: request} added before that step. Events in order."""
    events, n = [], 0
    add = dict(add or {})
    while core.has_unfinished() or add:
        if n in add:
            core.add_request(add.pop(n))
        events += core.step()
        n += 1
        if steps is not None:
            steps.append(n)
        assert n < 10_000
    return events


def finished(events) -> dict[str, np.ndarray]:
    return {e.request_id: e.result.audio for e in events if isinstance(e, RequestFinished)}


def test_core_gives_the_audio_synthesize_gives(engine):
    alone = engine.synthesize([req("a", LONG), req("b", SHORT, seed=2)])
    core = EngineCore(engine)
    core.add_request(req("a", LONG))
    core.add_request(req("b", SHORT, seed=2))
    out = finished(drain(core))
    assert np.array_equal(out["a"], alone[0].audio)
    assert np.array_equal(out["b"], alone[1].audio)


def test_a_streamed_request_streams_windows_while_it_decodes_with_the_same_tokens(engine):
    from chatterbox_serverless.engine.s3gen_stream import WindowPlan
    plain = engine.synthesize([req("s", SHORT)])[0]
    core = EngineCore(engine, window_plan=WindowPlan(first=6, every=8, context=8))
    core.add_request(req("s", SHORT, stream=True))
    events, decoding_when_first = [], None
    while core.has_unfinished():
        step = core.step()
        if decoding_when_first is None and any(isinstance(e, AudioChunk) for e in step):
            decoding_when_first = engine.decoder.busy
        events += step
    chunks = [e.samples for e in events if isinstance(e, AudioChunk)]
    done = [e.result for e in events if isinstance(e, RequestFinished)][0]
    assert len(chunks) > 1 and decoding_when_first          # audio before the one chunk finished decoding
    assert np.array_equal(np.concatenate(chunks), done.audio)
    assert done.metrics["speech_tokens"] == plain.metrics["speech_tokens"]
    assert abs(len(done.audio) - len(plain.audio)) <= 0.001 * engine.sample_rate


def test_a_streamed_long_request_streams_every_chunk_in_order(engine):
    core = EngineCore(engine)
    core.add_request(req("s", LONG, stream=True))
    events = drain(core)
    pieces = [e for e in events if isinstance(e, AudioChunk)]
    assert [p.seq for p in pieces] == list(range(len(pieces))) and len(pieces) >= 3
    assert np.array_equal(np.concatenate([p.samples for p in pieces]), finished(events)["s"])


def test_a_short_request_admitted_while_a_long_one_decodes_finishes_first_with_its_own_audio(engine):
    alone = engine.synthesize([req("short", SHORT, seed=5)])[0].audio
    core = EngineCore(engine)
    core.add_request(req("long", LONG))
    events = drain(core, add={3: req("short", SHORT, seed=5)})
    order = [e.request_id for e in events if isinstance(e, RequestFinished)]
    assert order == ["short", "long"]
    assert np.array_equal(finished(events)["short"], alone)


def test_a_short_request_overtakes_a_long_ones_vocoding_between_flow_steps(engine):
    """The long request's S3Gen group is under way (its flow solve begun) when the short one arrives: the long
    one's vocoding waits, suspended between two steps, while the short one decodes and vocodes, and resumes
    where it stopped (both give the samples they give alone)."""
    alone = {"long": engine.synthesize([req("long", LONG)])[0].audio,
             "short": engine.synthesize([req("short", SHORT, seed=5)])[0].audio}
    core = EngineCore(engine, SchedulerConfig(s3gen_share=0.01))
    core.add_request(req("long", LONG))
    events = []
    while core.requests["long"].vocoding is None:          # until its first group's first flow step has run
        events += core.step()
        assert len(events) < 10_000 and core.has_unfinished()
    suspended = core.requests["long"].vocoding
    groups_left = len(core.requests["long"].groups)
    core.add_request(req("short", SHORT, seed=5))
    while not any(isinstance(e, RequestFinished) for e in events):
        events += core.step()
    assert [e.request_id for e in events if isinstance(e, RequestFinished)] == ["short"]
    assert core.requests["long"].vocoding is suspended and len(core.requests["long"].groups) == groups_left
    events += drain(core)
    assert [e.request_id for e in events if isinstance(e, RequestFinished)] == ["short", "long"]
    for rid, audio in finished(events).items():
        assert np.array_equal(audio, alone[rid]), rid


def test_abort_frees_rows_at_the_next_step_and_leaves_the_others_unchanged(engine):
    alone = engine.synthesize([req("keep", LONG, seed=3)])[0].audio
    core = EngineCore(engine)
    core.add_request(req("keep", LONG, seed=3))
    core.add_request(req("drop", LONG, seed=4))
    events = core.step() + core.step()
    rows_before = engine.decoder.rows_in_use
    core.abort("drop")
    events += core.step()
    assert RequestFailed("drop", "cancelled") in events
    assert engine.decoder.rows_in_use < rows_before
    events += drain(core)
    assert np.array_equal(finished(events)["keep"], alone)
    assert "drop" not in finished(events)


def test_free_slots_bounds_admission_and_a_bad_request_fails_alone(engine):
    core = EngineCore(engine, SchedulerConfig(max_requests=2))
    assert core.free_slots() == 2
    core.add_request(req("x", SHORT))
    core.add_request(SynthesisRequest(SHORT, voice=PreparedVoice("another-model", b""), request_id="bad"))
    assert core.free_slots() == 0
    with pytest.raises(ValueError):
        core.add_request(req("x", SHORT))
    events = drain(core)
    assert "x" in finished(events)
    assert [e.error for e in events if isinstance(e, RequestFailed)] == [
        "the voice's stored conditionals were computed for another model variant"]
    assert core.free_slots() == 2


# ---- the scheduler alone ----------------------------------------------------------------------------------------
def view(**kw) -> SchedulerView:
    base = dict(pending=(), free_rows=8, t3_busy=False, units=(), t3_seconds=0.0, s3gen_seconds=0.0,
                unit_seconds=1.0)
    return SchedulerView(**{**base, **kw})


def unit(rid, *, streamed=False, first=False, arrival=0, left=100) -> S3GenUnit:
    return S3GenUnit(rid, (0,), streamed, first, arrival, left)


def test_scheduler_admits_every_first_chunk_before_anyones_next_within_free_rows():
    s = Scheduler()
    pending = [PendingChunk("long", i, 0, 2) for i in range(1, 6)] + [PendingChunk("new", 0, 1, 2)]
    plan = s.schedule(view(pending=pending, free_rows=4, t3_busy=True))
    assert [(p.request_id, p.index) for p in plan.admit] == [("new", 0), ("long", 1)]
    assert plan.decode


def test_scheduler_keeps_s3gen_within_its_share_while_t3_decodes_and_runs_it_freely_when_idle():
    s = Scheduler(SchedulerConfig(s3gen_share=0.3))
    work = [unit("long", left=400)]
    assert s.schedule(view(t3_busy=True, units=work, t3_seconds=1.0)).s3gen is None
    assert s.schedule(view(t3_busy=True, units=work, t3_seconds=3.0)).s3gen is not None
    assert s.schedule(view(t3_busy=True, units=work, t3_seconds=3.0, s3gen_seconds=1.0)).s3gen is None
    assert s.schedule(view(t3_busy=False, units=work)).s3gen == work[0]


def test_scheduler_orders_units_first_audio_then_streamed_then_least_work_left():
    s = Scheduler()
    units = [unit("long", left=400, arrival=0), unit("short", left=100, arrival=1),
             unit("streamed", streamed=True, arrival=2, left=300)]
    assert s.schedule(view(units=units)).s3gen.request_id == "streamed"
    assert s.schedule(view(units=units[:2])).s3gen.request_id == "short"
    first = unit("new", streamed=True, first=True, arrival=3)
    plan = s.schedule(view(units=units + [first], t3_busy=True, t3_seconds=0.0))
    assert plan.s3gen == first          # a first piece ignores the budget


def test_scheduler_defers_an_idle_t3_while_the_vocoding_ahead_of_the_arrival_outlasts_its_decoding():
    s = Scheduler()
    measured = dict(t3_step_seconds=0.1, s3gen_seconds_per_work=0.01)       # 100 steps: 10 s; 1000 work: 10 s
    big = PendingChunk("big", 0, 2, 2, work=2000, t3_steps=100)
    ahead = [unit("a", left=1500, arrival=0)]                                # 15 s of vocoding before big's
    assert s.schedule(view(pending=[big], units=ahead, **measured)).admit == ()
    assert s.schedule(view(pending=[big], units=[unit("a", left=900)], **measured)).admit == (big,)
    # a smaller request's vocoding goes first, so nothing waits ahead of it: it starts at once, and what waited
    # decodes with it
    small = PendingChunk("small", 0, 3, 2, work=200, t3_steps=100)
    assert s.schedule(view(pending=[big, small], units=ahead, **measured)).admit == (big, small)
    # a streamed arrival is always due; T3 already decoding takes everyone; nothing measured yet: no deferral
    streamed = PendingChunk("st", 0, 4, 2, streamed=True, work=5000, t3_steps=100)
    assert s.schedule(view(pending=[streamed], units=ahead, **measured)).admit == (streamed,)
    assert s.schedule(view(pending=[big], units=ahead, t3_busy=True, **measured)).admit == (big,)
    assert s.schedule(view(pending=[big], units=ahead)).admit == (big,)
    # the S3Gen work keeps running meanwhile
    assert s.schedule(view(pending=[big], units=ahead, **measured)).s3gen == ahead[0]


def test_the_core_measures_what_the_scheduler_estimates_with(engine):
    core = EngineCore(engine)
    core.add_request(req("a", SHORT))
    drain(core)
    core.add_request(req("b", LONG))
    core._plan_new(lambda ev: None)
    v = core._view()
    assert v.t3_step_seconds > 0 and v.s3gen_seconds_per_work > 0        # measured on "a"
    chunks = core.requests["b"].chunks
    assert [(p.index, p.streamed, p.work, p.t3_steps) for p in v.pending] == [
        (c.index, False, EngineCore._work(chunks), c.t3.max_new_tokens) for c in chunks]
