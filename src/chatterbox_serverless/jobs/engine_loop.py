"""The worker's loop over an engine core (engine/core.py): jobs join the engine whenever it has room, each one
completes or fails the moment it ends.

    loop: claim up to the core's free slots ─► prepare each job in the fetch pool (content policy, reference audio
          or library voice, the engine request) ─► core.add_request ─► core.step() ─► events:
              AudioChunk       ─► the job's chunk channel (store.append_chunk), as the batch path's on_audio
              RequestFinished  ─► encode, store.complete (Worker._finish)
              RequestFailed    ─► store.fail with the engine's reason, or nothing for an aborted job (cancelled:
                                  the store has it already)

While the core has work the loop never waits for a batch: claims are non-blocking (`store.claim`), a job's reference
audio is fetched in the pool while the engine steps, and every `cancel_poll_interval` seconds one `progress` call
learns which jobs are no longer this worker's (cancelled, or the lease lost): the core aborts them at its next step.
With nothing to do it waits on the claimer as the batch worker does (woken by `notify`).

Shutdown (`Worker.stop`): no more claims; the requests in the core run to their end within the grace time; then
the worker hands the rest back to the queue (`store.release`) and this loop aborts them and leaves. The durability
rules are the batch path's, by the same methods: a result that cannot be stored is retried later, a stream the
store refuses stops its request, no error names a server path.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING

from ..engine.core import AudioChunk, RequestFailed, RequestFinished
from .store import Job

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger(__name__)


class CoreLoop:
    def __init__(self, worker: "Worker", core):
        self.worker, self.core = worker, core
        self.preparing: dict[str, tuple[Job, float, Future]] = {}    # job id -> (job, claimed_at, preparation)
        self.running: dict[str, tuple[Job, float]] = {}              # in the core: job id -> (job, claimed_at)
        self.streams: dict = {}                                      # job id -> worker._Stream
        self.on_audio = worker._on_audio(self.streams)
        self._next_cancel_poll = 0.0

    # ---- the loop ------------------------------------------------------------------------------------------------
    def run(self) -> None:
        w = self.worker
        while True:
            if w._stop.is_set():
                if w._abandon.is_set() or not (self.running or self.preparing):
                    break
            else:
                try:
                    self._claim()
                except Exception:
                    log.exception("claiming failed; retrying in 1 s")
                    w._stop.wait(1.0)
            self._admit_prepared()
            if self.core.has_unfinished():
                self._step()
                self._poll_cancellations()
            elif self.preparing:
                time.sleep(0.005)
        if self.running:                        # abandoned at shutdown (handed back by Worker.stop): their rows
            for job_id in list(self.running):   # are freed by one more step, which has nothing else to do
                self.core.abort(job_id)
            self.running.clear()
            self.core.step()

    def _claim(self) -> None:
        w = self.worker
        w.maintain()
        if not w._storage_ready():
            if not self.core.has_unfinished():
                w._stop.wait(0.5)
            return
        room = self.core.free_slots() - len(self.preparing)
        if room <= 0:
            return
        if self.core.has_unfinished() or self.preparing:
            jobs = w.claimer.claim(min(room, w.claimer.batch_size))
        else:
            jobs = w.claimer.next_batch(w._stop, limit=room)
        if not jobs:
            return
        claimed_at = time.time()
        with w._in_hand_lock:
            w._in_hand.update(j.id for j in jobs)
        for job in jobs:
            self.preparing[job.id] = (job, claimed_at, w._fetch_pool.submit(w._prepare, job))

    def _admit_prepared(self) -> None:
        w = self.worker
        done = [(jid, job, at, fut) for jid, (job, at, fut) in self.preparing.items() if fut.done()]
        if not done:
            return
        ready = []
        for jid, job, at, fut in done:
            del self.preparing[jid]
            try:
                request = fut.result()
            except Exception as e:  # noqa: BLE001 - _prepare fails its job itself; this is a bug guard
                log.exception("preparing job %s failed", jid, extra={"request_id": jid})
                w._fail(job, f"invalid parameters: {type(e).__name__}")
                continue
            if request is not None:
                ready.append((job, at, request))
        if not ready:
            return
        held = w._still_held({job.id: {"stage": "synthesizing", "chunks_done": 0,
                                       "chunks_total": w._chunk_count(request.text)} for job, _, request in ready})
        for job, at, request in ready:
            if job.id not in held:
                continue
            if request.stream:
                from .worker import _Stream
                self.streams[job.id] = _Stream(job)
            self.core.add_request(request)
            self.running[job.id] = (job, at)

    def _step(self) -> None:
        w = self.worker
        w.metrics.busy.set(1)
        try:
            self.core.step(emit=self._on_event)
        except Exception as e:  # noqa: BLE001 - the core isolates requests; this is its own failure
            log.exception("engine step failed; failing the requests it held")
            for job_id in list(self.running):
                job, _ = self.running.pop(job_id)
                self.core.abort(job_id)
                w._fail(job, f"synthesis failed: {type(e).__name__}: {e}")
            self.core = self.core.engine.new_core(self.core.scheduler.config)
        finally:
            w.metrics.busy.set(0)
            w.batches_done += 1

    # ---- events --------------------------------------------------------------------------------------------------
    def _on_event(self, ev) -> None:
        w = self.worker
        entry = self.running.get(ev.request_id)
        if entry is None:
            return
        job, claimed_at = entry
        if isinstance(ev, AudioChunk):
            stream = self.streams.get(job.id)
            if stream is None:
                return
            try:
                self.on_audio(job.id, ev.seq, ev.samples)
            except Exception:  # noqa: BLE001 - StreamStopped: the store refused or failed; the job is handled below
                self.core.abort(job.id)
                del self.running[job.id]
                self.streams.pop(job.id, None)
                w._stream_stopped(stream)
            return
        del self.running[job.id]
        self.streams.pop(job.id, None)
        if isinstance(ev, RequestFinished):
            seconds = float(ev.result.metrics.get("latency_s", 0.0))
            w.metrics.inference_seconds.observe(seconds)
            n = w._chunk_count(str(job.params.get("text", "")))
            if job.id in w._still_held({job.id: {"stage": "encoding", "chunks_done": n, "chunks_total": n}}):
                w._finish(job, ev.result, seconds, len(self.running) + 1, claimed_at)
        elif isinstance(ev, RequestFailed):
            if ev.error == "cancelled":
                w._drop(job)             # cancelled by its client or taken from this worker: the store knows
            else:
                w._fail(job, ev.error)

    def _poll_cancellations(self) -> None:
        w = self.worker
        if w.cancel_poll_interval <= 0 or not self.running or time.monotonic() < self._next_cancel_poll:
            return
        self._next_cancel_poll = time.monotonic() + w.cancel_poll_interval
        try:
            held = w.store.progress(w.worker_id, {job_id: {} for job_id in self.running})
        except Exception as e:  # noqa: BLE001 - best effort: `complete` refuses a lost job anyway
            log.debug("could not poll for cancellations (%s)", e)
            return
        for job_id in [j for j in self.running if j not in held]:
            log.info("job %s is no longer this worker's (cancelled, or its lease lost): aborted in the engine",
                     job_id, extra={"request_id": job_id})
            self.core.abort(job_id)
