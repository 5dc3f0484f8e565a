"""The engine core: requests join and leave between steps; each `step()` returns what happened (vLLM's shape).

    core = EngineCore(engine)                      # engine: a loaded ChatterboxEngine (pipeline.py)
    core.add_request(SynthesisRequest(...))        # -> its id; from the driving thread, at any time
    core.abort(request_id)                         # any thread; takes effect at the next step
    while core.has_unfinished():
        for event in core.step():                  # AudioChunk | RequestFinished | RequestFailed
            ...

Three parts, each testable alone, plain dataclasses between them:
- the **scheduler** (`Scheduler.schedule`) decides, from a `SchedulerView` of the state, what one step does: which
  chunks enter T3 (rows permitting, every request's first chunk before anyone's next one, oldest first, so a
  short request that arrives while a long one decodes starts at the next step; while T3 is idle, an unstreamed
  arrival whose vocoding would queue behind S3Gen work that outlasts its decoding waits, so that later arrivals
  decode with it instead of each paying for its own T3 steps: `Scheduler.due`), whether T3 decodes one token for
  its active rows, and which unit of S3Gen work runs (`S3GenUnit`), under a time budget: while T3 has rows
  decoding, S3Gen gets at most `s3gen_share` of the engine's time (a streamed request's first audio is exempt),
  so neither stage starves the other; with T3 idle S3Gen runs unit after unit. Units go first-audio first, then
  streamed pieces, then the request with the least S3Gen work left (a short request is not queued behind a long
  one's vocoding: a unit is one step of it, so the long one's flow solve waits, suspended between two steps,
  while the short one's runs);
- the **model runner** (`ModelRunner`) computes and decides nothing: the T3 decoding step (`T3Decoder.step`), one
  S3Gen unit (one flow solver step or the vocoder of a group of chunks: a step of `ChatterboxEngine.s3gen_steps`,
  or one streamed window), the watermark;
- the **core** (`EngineCore`) keeps each request's state, asks the scheduler, has the runner compute, and turns the
  outcome into events.

A request is planned as `ChatterboxEngine.synthesize` plans it (voice conditionals, text split into chunks, one
T3 request per chunk, per-chunk seeds), so it draws the same tokens as there, alone or among others. Its audio:
- not streamed: once every chunk is decoded, its chunks are vocoded in the flow groups `synthesize` uses
  (`ChatterboxEngine.s3gen_groups`; each group's solver steps and vocoder one unit each, the same operations
  in the same order as there), joined and watermarked as there: the same samples as
  `synthesize` gives for it (on CPU, where S3Gen runs per request; tests/unit/engine/test_engine_core.py);
- streamed (`stream=True`): its current chunk is vocoded in windows while T3 is still decoding it
  (engine/s3gen_stream.py `ChunkStreamer`: the flow re-run over the voice prompt, a bounded left context and the
  tokens so far, the 3-token lookahead held back, the noise fixed per chunk, the vocoder's excitation carried;
  the first window after 12 tokens, then every 30), one window per unit; once the chunk is decoded its final
  window flushes it and the next chunk's windows begin. A chunk's windows go on one another, chunks are joined
  with the crossfade stream, and each piece is watermarked (pieces under pipeline.MIN_PIECE_SECONDS wait for the
  next, so each carries the mark); each piece is an `AudioChunk` event and `RequestFinished` carries their
  concatenation. Same tokens as unstreamed; the audio differs within the bounds s3gen_stream.py states (its
  noise is drawn for the chunk's longest length, not the exact one), and the re-decoded windows cost S3Gen time
  (about 3x a chunk's one flow call on CPU: the price of streaming, paid only by requests that ask for it).

Memory and admission: T3 rows are bounded by the engine's `max_rows`; the number of requests in the core (decoding
or waiting for S3Gen) by `SchedulerConfig.max_requests`, which the driver reads through `free_slots()` before it
adds more. An aborted request frees its rows at T3's next step and its S3Gen work is dropped; it ends with
`RequestFailed(error="cancelled")`. A failure (its voice, its text, a stage that raised for it) fails that request
alone; a T3 step that raised rebuilds the decoder and fails the requests it held (their chunks cannot be resumed).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from typing import Callable, Sequence, Union

import numpy as np
import torch

from .chunking import CrossfadeStream, crossfade_join
from .contract import SynthesisRequest, SynthesisResult

log = logging.getLogger(__name__)


# ---- events ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class AudioChunk:
    """Piece `seq` (0, 1, ...) of a streamed request's audio: mono float32 at the engine's sample rate."""
    request_id: str
    seq: int
    samples: np.ndarray


@dataclasses.dataclass
class RequestFinished:
    request_id: str
    result: SynthesisResult          # its audio (for a streamed request: its pieces concatenated) and metrics


@dataclasses.dataclass
class RequestFailed:
    request_id: str
    error: str                       # fit for the client ("cancelled" after `abort`)


Event = Union[AudioChunk, RequestFinished, RequestFailed]


# ---- scheduler -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_requests: int = 16           # requests in the core at once (decoding, or waiting for S3Gen)
    s3gen_share: float = 0.3         # S3Gen's share of the engine's time at most while T3 has rows decoding
    unit_estimate_s: float = 1.0     # expected seconds of an S3Gen unit before one was measured


@dataclasses.dataclass(frozen=True)
class PendingChunk:
    """A chunk waiting to enter T3."""
    request_id: str
    index: int                       # chunk number within its request
    arrival: int                     # order of its request's arrival
    rows: int                        # T3 rows it takes (2 with CFG)
    streamed: bool = False
    work: int = 0                    # S3Gen work of its request (as S3GenUnit.work_left): where its vocoding will queue
    t3_steps: int = 0                # decoding steps it takes at most (its token bound)


@dataclasses.dataclass(frozen=True)
class S3GenUnit:
    """One unit of S3Gen work of one request over `chunks` (indices in the request): the next step (a flow solver
    step or the vocoder) of that flow group, or a streamed chunk's next window."""
    request_id: str
    chunks: tuple[int, ...]
    streamed: bool
    first_audio: bool                # a streamed request's first piece (exempt from the time budget)
    arrival: int
    work_left: int                   # S3Gen work its request has left, this unit included: frames of prompt + speech
                                     # tokens over its remaining chunks (the flow's cost grows with both)


@dataclasses.dataclass(frozen=True)
class SchedulerView:
    pending: Sequence[PendingChunk]  # not yet in T3, in no particular order
    free_rows: int                   # T3 rows free (after what already waits inside the decoder)
    t3_busy: bool                    # T3 has rows decoding or admitted
    units: Sequence[S3GenUnit]       # S3Gen work whose input is ready
    t3_seconds: float                # engine time spent in T3 since S3Gen work began to wait (none waited before)
    s3gen_seconds: float             # ... and in S3Gen
    unit_seconds: float              # expected seconds of a unit (the last measured)
    t3_step_seconds: float = 0.0     # expected seconds of a T3 step (measured; 0 before any)
    s3gen_seconds_per_work: float = 0.0  # expected S3Gen seconds per token of work (measured; 0 before any)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    admit: tuple[PendingChunk, ...] = ()
    decode: bool = False
    s3gen: S3GenUnit | None = None


class Scheduler:
    """Decides; never computes. See the module docstring for the policy."""

    def __init__(self, config: SchedulerConfig = SchedulerConfig()):
        if not 0 < config.s3gen_share < 1:
            raise ValueError("s3gen_share must be between 0 and 1")
        self.config = config

    def schedule(self, view: SchedulerView) -> StepPlan:
        admit, free = [], view.free_rows
        if view.t3_busy or any(self.due(p, view) for p in view.pending):
            for p in sorted(view.pending, key=lambda p: (p.index, p.arrival)):
                if p.rows <= free:
                    admit.append(p)
                    free -= p.rows
        decode = view.t3_busy or bool(admit)
        unit = None
        if view.units:
            first = min(view.units, key=self.s3gen_order)
            share = self.config.s3gen_share
            within_budget = view.s3gen_seconds + view.unit_seconds <= share / (1 - share) * view.t3_seconds
            if first.first_audio or not decode or within_budget:
                unit = first
        return StepPlan(tuple(admit), decode, unit)

    @staticmethod
    def s3gen_order(u: S3GenUnit) -> tuple:
        return (not u.first_audio, not u.streamed, u.work_left, u.arrival)

    def due(self, p: PendingChunk, view: SchedulerView) -> bool:
        """Should T3, idle now, start decoding for p? Not while the S3Gen work that will run before p's own
        (`s3gen_order`) outlasts p's decoding: p's audio would wait for that work anyway, and a chunk admitted
        later decodes together with what arrives meanwhile (a T3 step costs about the same for 2 rows as for 16
        on a CPU), instead of each arrival paying for its own steps. A streamed chunk is always due (its first
        window is its first audio), and so is everything before anything was measured."""
        if p.streamed:
            return True
        mine = (True, True, p.work, p.arrival)
        ahead = sum(u.work_left for u in view.units if self.s3gen_order(u) < mine)
        return ahead * view.s3gen_seconds_per_work <= p.t3_steps * view.t3_step_seconds


# ---- model runner -------------------------------------------------------------------------------------------------
class ModelRunner:
    """Computes what the scheduler chose, with the engine's networks: T3 steps, S3Gen units, the watermark."""

    def __init__(self, engine):
        self.engine = engine

    @property
    def decoder(self):
        return self.engine.decoder

    def submit(self, t3_request) -> None:
        self.engine.decoder.submit(t3_request)

    def decode_step(self):
        """One T3 step: every active row draws one token; returns the chunks' results that finished in it."""
        return self.engine.decoder.step()

    def vocode(self, chunks):
        """The S3Gen work of chunks as steps (`ChatterboxEngine.s3gen_steps`): each `next` runs one flow step or
        the vocoder; its return value is their waveforms."""
        return self.engine.s3gen_steps(list(chunks))

    def stream_window(self, streamer, tokens: torch.Tensor, final: bool) -> np.ndarray:
        """A streamed chunk's next window (s3gen_stream.ChunkStreamer.advance): its tokens so far in, audio out."""
        return streamer.advance(tokens, final=final)

    def watermark(self, audio: np.ndarray) -> np.ndarray:
        w = self.engine.watermarker
        return audio if w is None else w.apply(audio, self.engine.sample_rate)


# ---- the core -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Request:
    request: SynthesisRequest
    arrival: int
    added: float
    chunks: list                                  # pipeline._Chunk, in order
    joiner: CrossfadeStream | None = None         # streamed: the crossfade stream
    submitted: set = dataclasses.field(default_factory=set)    # chunk indices given to T3
    decoded: int = 0                              # chunks whose tokens are known
    groups: list | None = None                    # not streamed: flow groups left (lists of chunk indices)
    vocoding: object | None = None                # not streamed: the first group's S3Gen steps under way
    next_piece: int = 0                           # streamed: the chunk whose windows are being made
    streamer: object | None = None                # streamed: that chunk's s3gen_stream.ChunkStreamer
    windows: int = 0                              # streamed: windows vocoded (all chunks)
    windows_in_chunk: int = 0                     # streamed: windows of the current chunk handed to the joiner
    pieces: list = dataclasses.field(default_factory=list)
    first_audio_s: float | None = None
    t3_s: float = 0.0
    s3gen_s: float = 0.0
    group_s: float = 0.0                          # not streamed: S3Gen seconds of its current flow group so far

    @property
    def id(self) -> str:
        return self.request.request_id


class EngineCore:
    """Drive from one thread (`add_request`, `step`); `abort` from any. See the module docstring."""

    def __init__(self, engine, config: SchedulerConfig | None = None, window_plan=None):
        """`window_plan`: how streamed chunks are cut into windows (s3gen_stream.WindowPlan; DEFAULT_PLAN)."""
        self.engine = engine
        self.scheduler = Scheduler(config or SchedulerConfig())
        self.runner = ModelRunner(engine)
        self.requests: dict[str, _Request] = {}
        self._arrivals = itertools.count()
        self._ids = itertools.count()
        self._aborts: set[str] = set()
        self._abort_lock = threading.Lock()
        self._t3_s = self._s3gen_s = 0.0
        self._unit_s = self.scheduler.config.unit_estimate_s
        self._step_s = 0.0                # a T3 step's seconds (moving average)
        self._per_work_s = 0.0            # S3Gen seconds per token of work (the last flow group's)
        self._by_t3: dict[int, tuple[_Request, object]] = {}   # id(T3Request) -> (request, chunk)
        self._partial: dict[int, torch.Tensor] = {}             # id(T3Request) -> speech tokens so far
        from .s3gen_stream import DEFAULT_PLAN
        self.window_plan = window_plan or DEFAULT_PLAN

    # ---- public ----------------------------------------------------------------------------------------------
    def add_request(self, request: SynthesisRequest) -> str:
        """Queue a request (planned at the next step); returns its id (request.request_id, or a new one)."""
        if not request.request_id:
            request = dataclasses.replace(request, request_id=f"req-{next(self._ids)}")
        if request.request_id in self.requests:
            raise ValueError(f"request {request.request_id!r} is already in the engine")
        self.requests[request.request_id] = _Request(request, next(self._arrivals), time.perf_counter(), chunks=None)
        return request.request_id

    def abort(self, request_id: str) -> None:
        """Stop a request at the next step (thread-safe): its T3 rows are freed then, no further S3Gen work runs
        for it, and the step reports `RequestFailed(request_id, "cancelled")`. Unknown ids are ignored."""
        with self._abort_lock:
            self._aborts.add(request_id)
        self.engine.decoder.abort(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def free_slots(self) -> int:
        """How many more requests the core takes now (its `max_requests` less those it holds)."""
        return max(0, self.scheduler.config.max_requests - len(self.requests))

    @property
    def sample_rate(self) -> int:
        return self.engine.sample_rate

    def step(self, emit: Callable[[Event], None] | None = None) -> list[Event]:
        """Plan new requests, apply aborts, then one scheduled step: chunks admitted to T3, one decoding step, one
        unit of S3Gen. Returns the events of the step (also passed to `emit` as each happens, so a streamed
        piece can leave before the step's remaining work)."""
        events: list[Event] = []

        def out(ev: Event) -> None:
            events.append(ev)
            if emit is not None:
                emit(ev)

        with self.engine._lock, torch.inference_mode():
            self._apply_aborts(out)
            self._plan_new(out)
            plan = self.scheduler.schedule(self._view())
            for p in plan.admit:
                self._submit(p)
            if plan.decode and self.runner.decoder.busy:
                self._decode(out)
            if plan.s3gen is not None:
                self._run_unit(plan.s3gen, out)
            if not self._units():
                self._t3_s = self._s3gen_s = 0.0          # no S3Gen work waits: its budget starts afresh
        return events

    # ---- steps ------------------------------------------------------------------------------------------------
    def _apply_aborts(self, out) -> None:
        with self._abort_lock:
            ids, self._aborts = self._aborts, set()
        for rid in ids:
            r = self.requests.pop(rid, None)
            if r is not None:
                self._forget_t3(r)
                out(RequestFailed(rid, "cancelled"))
        if not self.requests:
            self.engine.decoder.clear_aborts()

    def _plan_new(self, out) -> None:
        from .pipeline import MIN_PIECE_SECONDS, _reason
        for r in [r for r in self.requests.values() if r.chunks is None]:
            try:
                r.chunks = self.engine._plan(r.arrival, r.request)
            except Exception as e:        # its voice or its text: this request alone
                del self.requests[r.id]
                out(RequestFailed(r.id, _reason(e)))
                continue
            if r.request.stream:
                r.joiner = CrossfadeStream(self.engine.sample_rate, self.engine.crossfade_seconds,
                                           int(MIN_PIECE_SECONDS * self.engine.sample_rate))

    def _view(self) -> SchedulerView:
        decoder = self.runner.decoder
        chain = decoder.chain
        waiting_rows = sum(chain.rows_needed(q.params) for q in decoder.waiting)
        pending = [PendingChunk(r.id, c.index, r.arrival, chain.rows_needed(c.t3.params), r.joiner is not None,
                                self._work(r.chunks), int(c.t3.max_new_tokens))
                   for r in self.requests.values() if r.chunks is not None
                   for c in r.chunks if c.index not in r.submitted]
        return SchedulerView(pending=pending, free_rows=decoder.max_rows - decoder.rows_in_use - waiting_rows,
                             t3_busy=decoder.busy, units=self._units(), t3_seconds=self._t3_s,
                             s3gen_seconds=self._s3gen_s, unit_seconds=self._unit_s, t3_step_seconds=self._step_s,
                             s3gen_seconds_per_work=self._per_work_s)

    def _units(self) -> list[S3GenUnit]:
        units = []
        for r in self.requests.values():
            if r.chunks is None:
                continue
            if r.joiner is not None:
                if r.next_piece < len(r.chunks) and self._window_due(r):
                    units.append(S3GenUnit(r.id, (r.next_piece,), True, not r.pieces, r.arrival,
                                           self._work(r.chunks[r.next_piece:])))
            elif r.decoded == len(r.chunks):
                if r.groups is None:
                    r.groups = self._groups(r)
                if r.groups:
                    units.append(S3GenUnit(r.id, tuple(r.groups[0]), False, False, r.arrival,
                                           self._work([r.chunks[i] for g in r.groups for i in g])))
        return units

    @staticmethod
    def _work(chunks) -> int:
        """S3Gen work of chunks, in tokens: each one's voice prompt and its speech tokens (drawn, or its bound)."""
        return sum(int(c.conds.gen_prompt_token.shape[-1])
                   + (int(c.tokens.numel()) if c.tokens is not None else int(c.t3.max_new_tokens)) for c in chunks)

    def _window_due(self, r: _Request) -> bool:
        """Is a window of r's current chunk ready: its tokens all decoded (the final window), or enough of them
        decoded so far for the streamer's next window?"""
        c = r.chunks[r.next_piece]
        if c.tokens is not None:
            return True
        partial = self._partial.get(id(c.t3))
        return partial is not None and self._streamer(r).ready(len(partial))

    def _streamer(self, r: _Request):
        if r.streamer is None:
            from .s3gen_stream import ChunkStreamer
            c = r.chunks[r.next_piece]
            r.streamer = ChunkStreamer(self.engine.s3gen, c.conds, seed=c.seed,
                                       suffix=tuple(self.engine.parts.flow_suffix_tokens),
                                       max_tokens=c.t3.max_new_tokens, plan=self.window_plan)
        return r.streamer

    def _groups(self, r: _Request) -> list[list[int]]:
        speaking = [c for c in r.chunks if c.tokens is not None and c.tokens.numel() > 0]
        return [[c.index for c in g] for g in self.engine.s3gen_groups(speaking)] if speaking else []

    def _submit(self, p: PendingChunk) -> None:
        r = self.requests[p.request_id]
        c = r.chunks[p.index]
        self.runner.submit(c.t3)
        r.submitted.add(p.index)
        self._by_t3[id(c.t3)] = (r, c)

    def _decode(self, out) -> None:
        from .pipeline import _reason
        t0 = time.perf_counter()
        holders = {r.id for r, _ in self._by_t3.values()}
        try:
            finished = self.runner.decode_step()
        except Exception as e:
            log.exception("T3 step failed; the requests it held fail, the decoder is rebuilt")
            self.engine._new_decoder()
            for rid in holders:
                r = self.requests.pop(rid, None)
                if r is not None:
                    self._forget_t3(r)
                    out(RequestFailed(rid, _reason(e)))
            return
        spent = time.perf_counter() - t0
        self._t3_s += spent
        self._step_s = spent if not self._step_s else 0.9 * self._step_s + 0.1 * spent
        for rid in holders:
            if rid in self.requests:
                self.requests[rid].t3_s += spent
        for res in finished:
            held = self._by_t3.pop(id(res.request), None)
            if held is None or res.stop_reason == "aborted":
                continue
            r, c = held
            c.tokens = res.speech_tokens
            r.decoded += 1
        # speech tokens drawn so far by each chunk still decoding (what a streamed chunk's windows are made of)
        start = self.engine.t3.cfg.start_speech_token
        self._partial = {id(a.request): torch.tensor([t for t in a.tokens if t < start], dtype=torch.long)
                         for a in self.runner.decoder.active if a.request.request_id in self._streamed_ids()}
        for r in list(self.requests.values()):      # a request with nothing to vocode ends here
            if r.chunks is not None and r.decoded == len(r.chunks) and r.joiner is None and not self._groups(r):
                del self.requests[r.id]
                out(RequestFailed(r.id, "the model produced no speech for this text"))

    def _run_unit(self, unit: S3GenUnit, out) -> None:
        from .pipeline import _reason
        r = self.requests[unit.request_id]
        chunks = [r.chunks[i] for i in unit.chunks]
        group_done = False
        t0 = time.perf_counter()
        try:
            if r.joiner is not None:
                self._stream_window(r, out)
            else:
                if r.vocoding is None:
                    r.vocoding = self.runner.vocode([c for c in chunks if c.tokens.numel() > 0])
                try:
                    next(r.vocoding)
                except StopIteration as done:
                    for c, wav in zip([c for c in chunks if c.tokens.numel() > 0], done.value):
                        c.wav = wav
                    r.vocoding = None
                    r.groups.pop(0)
                    group_done = True
        except Exception as e:          # its vocoding, or its consumer: this request alone
            log.warning("request %s failed in S3Gen: %s", r.id, e)
            del self.requests[r.id]
            out(RequestFailed(r.id, _reason(e)))
            return
        finally:
            spent = time.perf_counter() - t0
            self._s3gen_s += spent
            r.s3gen_s += spent
            r.group_s += spent
            if not unit.first_audio:
                self._unit_s = spent
        if group_done:                  # what a token of S3Gen work costs, for the scheduler's estimates
            self._per_work_s, r.group_s = r.group_s / max(1, self._work(chunks)), 0.0
        if r.joiner is None and not r.groups:
            self._finish(r, out)
        elif r.joiner is not None and r.next_piece == len(r.chunks):
            self._finish(r, out)

    def _stream_window(self, r: _Request, out) -> None:
        """The next window of r's current chunk (the final one once the chunk is decoded), joined to what was
        streamed (a chunk's windows go on one another; chunks are crossfaded), watermarked, handed out."""
        c = r.chunks[r.next_piece]
        streamer = self._streamer(r)
        final = c.tokens is not None
        wav = self.runner.stream_window(streamer, c.tokens if final else self._partial[id(c.t3)], final)
        continues = r.windows_in_chunk > 0
        r.windows_in_chunk = 0 if final else r.windows_in_chunk + (1 if len(wav) else 0)
        r.windows += 1
        last = final and r.next_piece == len(r.chunks) - 1
        if final:
            r.next_piece += 1
            r.streamer = None
        piece = r.joiner.push(wav, last=last, continues=continues and len(wav) > 0)
        if len(piece):
            piece = self.runner.watermark(piece)
            if r.first_audio_s is None:
                r.first_audio_s = time.perf_counter() - r.added
            out(AudioChunk(r.id, len(r.pieces), piece))
            r.pieces.append(piece)

    def _finish(self, r: _Request, out) -> None:
        del self.requests[r.id]
        if r.joiner is not None:
            if not r.pieces:
                out(RequestFailed(r.id, "the model produced no speech for this text"))
                return
            audio = np.concatenate(r.pieces)
            extra = {"stream_pieces": len(r.pieces), "stream_windows": r.windows,
                     "first_audio_s": round(r.first_audio_s or 0.0, 4)}
        else:
            audio = crossfade_join([c.wav for c in r.chunks if c.wav is not None], self.engine.sample_rate,
                                   self.engine.crossfade_seconds)
            audio = self.runner.watermark(audio)
            extra = {}
        out(RequestFinished(r.id, SynthesisResult(audio=audio, metrics={
            "audio_seconds": round(len(audio) / self.engine.sample_rate, 3),
            "speech_tokens": sum(int(c.tokens.numel()) for c in r.chunks if c.tokens is not None),
            "chunks": len(r.chunks), "t3_s": round(r.t3_s, 4), "s3gen_s": round(r.s3gen_s, 4),
            "latency_s": round(time.perf_counter() - r.added, 4), **extra})))

    def _streamed_ids(self) -> set[str]:
        return {r.id for r in self.requests.values() if r.joiner is not None}

    def _forget_t3(self, r: _Request) -> None:
        for key in [k for k, (owner, _) in self._by_t3.items() if owner is r]:
            del self._by_t3[key]
