"""The worker: claims a batch of jobs, turns them into engine requests, runs the engine, stores each result.

Store-agnostic (any `JobStore`), so the same class runs in-process under `serve` (SQLite) and standalone against a
shared store. Per job: content policy, reference audio (fetched/decoded by `resolve_reference`), synthesis,
encoding, `complete` — a failure at any step fails that job alone, with a reason. A heartbeat thread extends the
leases of the jobs in hand and advertises the worker; a janitor recovers expired leases and purges expired
results. `stop()` (SIGTERM) stops claiming, finishes the batch in hand within the grace time, and otherwise hands
its jobs back to the queue.

Models: a worker claims only jobs of the API models its engine serves (`models`, default `[engine.model]`), and
advertises them in its heartbeat info ("models"), so /ready shows which worker serves what. A job's params carry
what its model needs: `language` (Multilingual), `source_audio` (voice conversion: the speech to convert, fetched
and decoded like reference audio, the SSRF-safe `resolve_reference`), `top_k` (Turbo, a synthesis parameter).

Billing is not the worker's: the store settles or releases a job's credit hold with its terminal transition
(`JobStore.attach_billing`). The worker's maintenance may repair holds (`reconcile_with(accounts)`), nothing more.

Streamed jobs (params `stream: true`): the engine hands their audio over piece by piece (`on_audio`), and each
piece is appended to the job's chunk channel (`JobStore.append_chunk`, as media/stream.py's 16-bit PCM) as it
comes, so API replicas can send it while the job runs; the completed job stores its whole encoded audio as any
job does. A piece the store refuses (the job was cancelled or taken) stops that request in the engine; one it
cannot write (storage down) hands the job back like a result that cannot be stored (a new attempt: readers are
told the stream restarted). Engines without `on_audio` just don't stream (readers get the file at the end).

Cancellation: a job cancelled before the engine runs is dropped between stages (`progress` answers which jobs are
still this worker's). While the engine runs a batch, a watcher thread asks the store every `cancel_poll_interval`
seconds (one `progress` call, recording nothing, for all the batch's jobs) which are still held, and calls the
engine's `abort(request_id)` (the contract's optional part) for each that is not: the engine stops working on it
at its next step and frees its rows; the rest of the batch goes on.

Storage failures are the server's, not the job's: when the result cannot be stored (read-only or full disk, the
store unreachable), the job is handed back with `store.retry_later` for a later attempt, after a backoff that
doubles from the lease length, and the worker stops claiming until `store.writable()` says storage works again.
Only a job that has used `max_attempts` FAILs, with a reason naming nothing of the server. No error text stored
in a job carries a server path (`public_reason`).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import inspect
import logging
import os
import re
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..engine.chunking import split_text
from ..engine.contract import (Engine, OnAudio, PreparedVoice, SynthesisParams, SynthesisRequest, SynthesisResult,
                               VoiceAudio)
from .policy import ContentPolicy
from .batching import BatchClaimer
from .store import DEFAULT_MODEL, Job, JobStore

if TYPE_CHECKING:
    from ..accounts.service import Accounts

log = logging.getLogger(__name__)

STORAGE_REASON = "the server could not store the result; try again later"
MAX_RETRY_DELAY = 600.0         # seconds: the longest backoff before a job whose result could not be stored is retried
STORAGE_CHECK_INTERVAL = 0.5    # seconds between `store.writable()` checks while storage is broken
# OS errors that say the server's storage is broken (not the job's input)
STORAGE_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EIO})

# Filesystem paths inside error texts: absolute (/srv/data/x, ./x, ~/x) or relative with 3+ parts (data/audio/x);
# never the path part of a URL (preceded by "/", ":" or a host name's characters).
_PATH = re.compile(r"(?<![\w:/.~@%+-])(?:(?:~|\.{1,2})?/[\w.@+~%-]+(?:/[\w.@+~%-]*)*|[\w.@+~%-]+(?:/[\w.@+~%-]+){2,})")


def scrub_paths(text: str) -> str:
    """`text` with every filesystem path replaced by "<path>"."""
    return _PATH.sub("<path>", text)


def public_reason(e: BaseException) -> str:
    """An exception as a client may read it: an OS error's text without its file name, no path anywhere."""
    if isinstance(e, OSError) and (e.filename is not None or e.filename2 is not None):
        text = e.strerror or type(e).__name__
    else:
        text = str(e) or type(e).__name__
    return scrub_paths(text)


def is_storage_error(e: BaseException) -> bool:
    """An OS error of the server's storage (read-only, full, failing disk), wherever it was raised."""
    return isinstance(e, OSError) and e.errno in STORAGE_ERRNOS

ResolveReference = Callable[[str], VoiceAudio]          # reference_audio value -> decoded clip; raises with a reason
ResolveVoice = Callable[[str], "VoiceAudio | PreparedVoice"]   # library voice id -> the voice; raises with a reason
EncodeAudio = Callable[[np.ndarray, int, str], tuple[bytes, str]]   # (samples, rate, format) -> (bytes, media type)


class WorkerMetrics:
    """Prometheus series of one worker, on their own registry (the API exports it beside its own)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.inference_seconds = Histogram(
            "chatterbox_inference_seconds", "Engine time per batch", registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.audio_seconds = Counter("chatterbox_audio_seconds", "Seconds of audio produced", registry=self.registry)
        self.batch_size = Histogram("chatterbox_batch_size", "Jobs per engine batch", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.jobs_finished = Counter("chatterbox_worker_jobs", "Jobs finished by this worker", ["state"],
                                     registry=self.registry)
        self.storage_errors = Counter("chatterbox_worker_storage_errors",
                                      "Results that could not be stored (their job is retried later)",
                                      registry=self.registry)
        self.busy = Gauge("chatterbox_worker_busy", "1 while the engine runs a batch", registry=self.registry)


class _Stream:
    """A streamed job in the batch: digests of the pieces appended, and what stopped its stream, if anything."""

    def __init__(self, job: Job):
        self.job = job
        self.digests: list[bytes] = []
        self.failure: BaseException | None = None     # the store could not take a piece (storage)
        self.lost = False                              # the store refused a piece: no longer this worker's job
        self.diverged = False                          # a second run of the request made other audio


class StreamStopped(Exception):
    """Raised from on_audio to stop a streamed request in the engine."""


def synthesis_params(params: dict) -> SynthesisParams:
    """The engine's parameters from a job's stored params (validated by the API at submit)."""
    return SynthesisParams(**{k: params[k] for k in SynthesisParams.__dataclass_fields__ if k in params})


def _no_reference_support(value: str) -> VoiceAudio:
    raise RuntimeError("this worker cannot read reference audio (no resolver configured)")


def _no_voice_library(value: str) -> VoiceAudio:
    raise RuntimeError("this worker has no voice library (no resolver configured)")


class Worker:
    def __init__(self, store: JobStore, engine: Engine, *, encode: EncodeAudio,
                 resolve_reference: ResolveReference | None = None, resolve_voice: ResolveVoice | None = None,
                 policy: ContentPolicy | None = None,
                 worker_id: str | None = None, batch_size: int = 8, batch_wait: float = 0.02,
                 lease_seconds: float = 30.0, max_attempts: int = 3, retention_seconds: float = 3600.0,
                 shutdown_grace: float = 30.0, poll_interval: float = 0.1, maintenance_interval: float = 5.0,
                 metrics: WorkerMetrics | None = None, info: dict | None = None,
                 cancel_poll_interval: float = 0.5, use_core: bool = True, models: Sequence[str] | None = None):
        self.store = store
        # the API models whose jobs this worker claims (default: the one its engine serves)
        self.models: tuple[str, ...] = (tuple(models) if models is not None
                                        else (str(getattr(engine, "model", None) or DEFAULT_MODEL),))
        self.cancel_poll_interval = cancel_poll_interval   # while a batch runs: cancelled jobs aborted (0: never)
        self._repair: Accounts | None = None    # reconcile_with(): holds left open, repaired in maintenance
        self.engine = engine
        self.encode = encode
        self.resolve_reference = resolve_reference or _no_reference_support
        self.resolve_voice = resolve_voice or _no_voice_library       # `voice`: a library voice's id
        self.policy = policy or ContentPolicy()
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.retention_seconds = retention_seconds
        self.shutdown_grace = shutdown_grace
        self.maintenance_interval = maintenance_interval
        self.metrics = metrics or WorkerMetrics()
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "batch_size": batch_size,
                     "started_at": time.time(), **(info or {}), "models": list(self.models)}
        self.claimer = BatchClaimer(store, self.worker_id, batch_size=batch_size, batch_wait=batch_wait,
                                   lease_seconds=lease_seconds, poll_interval=poll_interval, models=self.models)
        self._stop = threading.Event()
        self._abandon = threading.Event()        # set by stop() when the grace time ran out
        self._heartbeat_stop = threading.Event()
        self._in_hand: set[str] = set()
        self._in_hand_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._heartbeat_thread: threading.Thread | None = None
        self._fetch_pool = ThreadPoolExecutor(4, thread_name_prefix="reference-fetch")
        self._last_maintenance = 0.0
        self.batches_done = 0
        self.storage_problem: str | None = None     # why storage failed; no claims until store.writable()
        self._next_storage_check = 0.0
        try:        # engines that take on_audio stream (the contract's optional part)
            self.engine_streams = "on_audio" in inspect.signature(engine.synthesize).parameters
        except (TypeError, ValueError):
            self.engine_streams = False
        # an engine with a core (engine/core.py) is driven step by step (jobs/engine_loop.py): jobs join it between
        # steps and leave it as each ends; other engines run a batch at a time (`process`)
        new_core = getattr(engine, "new_core", None)
        self.core = new_core() if use_core and callable(new_core) else None
        if self.core is not None:
            self.engine_streams = True

    def reconcile_with(self, accounts: Accounts | None) -> None:
        """Let this worker's maintenance repair credit holds (`accounts.maybe_reconcile(store.get)`): holds whose
        job ended in a store without billing attached, or whose job vanished. Billing itself is the store's."""
        self._repair = accounts

    # --- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._abandon.clear()
        self._heartbeat_stop.clear()
        self._thread = threading.Thread(target=self.run, name=f"worker-{self.worker_id}", daemon=True)
        self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, name="worker-heartbeat", daemon=True)
        self._thread.start()
        self._heartbeat_thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def notify(self) -> None:
        self.claimer.notify()

    def stop(self, grace: float | None = None) -> None:
        """Stop claiming; let the batch in hand finish for `grace` seconds, then give its jobs back to the queue."""
        grace = self.shutdown_grace if grace is None else grace
        self._stop.set()
        self.claimer.notify()
        if self._thread is not None:
            self._thread.join(grace)
        self._abandon.set()             # what is still running is handed back below; the loop drops it
        with self._in_hand_lock:
            left = list(self._in_hand)
            self._in_hand.clear()
        for job_id in left:
            try:
                if self.store.release(job_id, self.worker_id):
                    log.info("released job %s back to the queue at shutdown", job_id, extra={"request_id": job_id})
            except Exception:
                log.exception("could not release job %s (its lease will expire)", job_id)
        self._heartbeat_stop.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(2.0)
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)

    def run(self) -> None:
        """The worker loop (blocking) until `stop()`."""
        log.info("worker %s started", self.worker_id)
        if self.core is not None:
            from .engine_loop import CoreLoop
            try:
                CoreLoop(self, self.core).run()
            finally:
                log.info("worker %s stopped", self.worker_id)
            return
        while not self._stop.is_set():
            try:
                self.maintain()
                if not self._storage_ready():
                    self._stop.wait(STORAGE_CHECK_INTERVAL)
                    continue
                jobs = self.claimer.next_batch(self._stop)
                if not jobs:
                    continue
                with self._in_hand_lock:
                    self._in_hand.update(j.id for j in jobs)
                if self._stop.is_set():     # stopped while filling the batch: hand the jobs back
                    break
                self.process(jobs)
            except Exception:
                log.exception("worker loop error; retrying in 1 s")
                self._stop.wait(1.0)
        log.info("worker %s stopped", self.worker_id)

    def maintain(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_maintenance < self.maintenance_interval:
            return
        self._last_maintenance = now
        try:
            n = self.store.recover_expired(self.max_attempts)
            if n:
                log.warning("recovered %d job(s) whose worker stopped", n)
            self.store.purge_expired(self.retention_seconds)
        except Exception:
            log.exception("maintenance failed")
        if self._repair is not None:    # holds whose job ended unbilled or vanished
            self._repair.maybe_reconcile(self.store.get)

    def _storage_ready(self) -> bool:
        """False while the store reported a storage failure and `store.writable()` still reports a problem
        (checked every STORAGE_CHECK_INTERVAL): claiming then would only burn the attempts of queued jobs."""
        if self.storage_problem is None:
            return True
        now = time.monotonic()
        if now < self._next_storage_check:
            return False
        self._next_storage_check = now + STORAGE_CHECK_INTERVAL
        try:
            problem = self.store.writable()
        except Exception as e:  # noqa: BLE001 - a probe that cannot run is a problem
            problem = f"the store cannot be probed ({type(e).__name__})"
        if problem is None:
            log.warning("storage is writable again; claiming jobs")
            self.storage_problem = None
            return True
        if problem != self.storage_problem:
            log.error("storage is not writable: %s; not claiming jobs until it is", problem)
        self.storage_problem = problem
        return False

    def _heartbeat_loop(self) -> None:
        interval = max(0.05, min(5.0, self.lease_seconds / 3))
        while True:
            with self._in_hand_lock:
                ids = list(self._in_hand)
            try:
                self.store.heartbeat(self.worker_id, ids, self.lease_seconds,
                                     {**self.info, "jobs_in_hand": len(ids), "batches": self.batches_done})
            except Exception as e:
                log.warning("heartbeat failed: %s", e)
            if self._heartbeat_stop.wait(interval):
                return

    # --- one batch --------------------------------------------------------------------------------------------
    def _prepare(self, job: Job) -> SynthesisRequest | None:
        """The engine request for a claimed job (content policy, its voice fetched or loaded), or None when the
        job failed here (with its reason) or was handed back (storage). Runs in the fetch pool."""
        text = str(job.params.get("text", ""))
        reason = self.policy.violation(text)
        if reason:
            self._fail(job, reason)
            return None
        voice = source = None
        ref, library_voice = job.params.get("reference_audio"), job.params.get("voice")
        source_audio = job.params.get("source_audio")
        param = "reference_audio" if ref else "voice"
        try:
            if ref or library_voice:
                voice = self.resolve_reference(ref) if ref else self.resolve_voice(str(library_voice))
            if source_audio:    # voice conversion: the speech to convert, through the same safe fetch/decode
                param = "source_audio"
                source = self.resolve_reference(source_audio)
        except Exception as e:
            if is_storage_error(e):
                self._retry_later(job, e)
                return None
            reason = public_reason(e)
            self._fail(job, reason if reason.startswith(param) else f"{param}: {reason}")
            return None
        language = job.params.get("language")
        try:
            return SynthesisRequest(text=text, params=synthesis_params(job.params), voice=voice, request_id=job.id,
                                    stream=bool(job.params.get("stream")) and self.engine_streams,
                                    language=str(language) if language else None, source=source)
        except Exception as e:
            self._fail(job, f"invalid parameters: {e}")
            return None

    def process(self, jobs: Sequence[Job]) -> None:
        """One batch, the batch-at-once way (engines without a core): every job prepared (voices fetched in
        parallel), the engine run on all of them, each result stored."""
        claimed_at = time.time()
        prepared = [(job, self._fetch_pool.submit(self._prepare, job)) for job in jobs]
        ready: list[tuple[Job, SynthesisRequest]] = []
        for job, future in prepared:
            request = future.result()
            if request is not None:
                ready.append((job, request))
        if not ready:
            return
        # Between stages, progress events double as the check that each job is still ours: one cancelled while
        # its voice was fetched never reaches the engine, one cancelled during synthesis is aborted in the engine
        # (`_abort_cancelled`: at its next decoding step) and is not encoded.
        chunks = {job.id: self._chunk_count(request.text) for job, request in ready}
        held = self._still_held({job.id: {"stage": "synthesizing", "chunks_done": 0, "chunks_total": chunks[job.id]}
                                 for job, _ in ready})
        ready = [(job, request) for job, request in ready if job.id in held]
        if not ready:
            return
        streams = {job.id: _Stream(job) for job, request in ready if request.stream}
        with self._abort_cancelled([job.id for job, _ in ready]):
            results, seconds = self._synthesize([r for _, r in ready], self._on_audio(streams) if streams else None)
        self.batches_done += 1
        self.metrics.inference_seconds.observe(seconds)
        self.metrics.batch_size.observe(len(ready))
        held = self._still_held({job.id: {"stage": "encoding", "chunks_done": chunks[job.id],
                                          "chunks_total": chunks[job.id]} if result.error is None else {}
                                 for (job, _), result in zip(ready, results)})
        for (job, _), result in zip(ready, results):
            stream = streams.get(job.id)
            if stream is not None and (stream.failure is not None or stream.lost or stream.diverged):
                self._stream_stopped(stream)
            elif job.id in held:
                self._finish(job, result, seconds, len(ready), claimed_at)

    def _chunk_count(self, text: str) -> int:
        """The chunks the engine cuts `text` into (engine/chunking.py, at the engine's chunk size)."""
        return len(split_text(text, int(getattr(self.engine, "max_chunk_chars", 280) or 280)) or [""])

    def _still_held(self, updates: dict[str, dict]) -> set[str]:
        """Record progress events and learn which jobs are still this worker's; a job that is not (cancelled, or
        its lease lost) is dropped here. If the store cannot answer, all are kept: `complete` refuses a lost job
        anyway."""
        try:
            held = self.store.progress(self.worker_id, updates)
        except Exception as e:  # noqa: BLE001 - progress is best effort
            log.warning("could not record progress (%s); going on", e)
            return set(updates)
        for job_id in set(updates) - held:
            log.info("job %s is no longer this worker's (cancelled, or its lease lost): dropped", job_id,
                     extra={"request_id": job_id})
            with self._in_hand_lock:
                self._in_hand.discard(job_id)
        return held

    @contextlib.contextmanager
    def _abort_cancelled(self, job_ids: list[str]):
        """While the body runs the engine: every `cancel_poll_interval` s, one `progress` call (recording nothing)
        learns which of `job_ids` are no longer this worker's (cancelled, or the lease lost); the engine's
        `abort` is called for each, again at every poll (idempotent: an engine forgets aborts when its batch
        ends, and a failed batch runs its requests again one by one). Nothing happens for an engine without
        `abort`."""
        abort = getattr(self.engine, "abort", None)
        if abort is None or not callable(abort) or self.cancel_poll_interval <= 0 or not job_ids:
            yield
            return
        done = threading.Event()

        def watch() -> None:
            told: set[str] = set()
            while not done.wait(self.cancel_poll_interval):
                try:
                    held = self.store.progress(self.worker_id, {job_id: {} for job_id in job_ids})
                except Exception as e:  # noqa: BLE001 - best effort: `complete` refuses a lost job anyway
                    log.debug("could not poll for cancellations (%s)", e)
                    continue
                for job_id in job_ids:
                    if job_id in held or done.is_set():
                        continue
                    if job_id not in told:
                        told.add(job_id)
                        log.info("job %s is no longer this worker's (cancelled, or its lease lost): aborted in "
                                 "the engine", job_id, extra={"request_id": job_id})
                    try:
                        abort(job_id)
                    except Exception:  # noqa: BLE001 - the job is dropped after the batch anyway
                        log.exception("engine abort failed", extra={"request_id": job_id})

        thread = threading.Thread(target=watch, name="worker-cancel-watch", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join(5.0)

    def _on_audio(self, streams: dict[str, _Stream]) -> OnAudio:
        """The engine's on_audio for this batch: each piece appended to its job's chunk channel, in order."""
        rate = int(self.engine.sample_rate)
        from ..media.stream import pack_piece

        def on_audio(request_id: str, seq: int, samples: np.ndarray) -> None:
            stream = streams[request_id]
            data = pack_piece(samples, rate, str(stream.job.params.get("output_format") or "mp3"))
            digest = hashlib.sha256(data).digest()
            if seq < len(stream.digests):       # the request runs again (its batch failed): same audio, or stop
                if stream.digests[seq] != digest:
                    stream.diverged = True
                    raise StreamStopped("a second run made other audio than the pieces already streamed")
                return
            try:
                held = self.store.append_chunk(request_id, self.worker_id, seq, data)
            except Exception as e:  # noqa: BLE001 - storage: the job is handed back (see _stream_stopped)
                stream.failure = e
                raise StreamStopped("the streamed audio could not be stored") from e
            if not held:
                stream.lost = True
                raise StreamStopped("the job is no longer this worker's (cancelled, or its lease lost)")
            stream.digests.append(digest)
        return on_audio

    def _stream_stopped(self, stream: _Stream) -> None:
        job = stream.job
        if stream.failure is not None:          # as a result that cannot be stored: a later attempt
            self._retry_later(job, stream.failure)
        elif stream.lost:
            log.info("job %s is no longer this worker's (cancelled, or its lease lost): its stream stopped", job.id,
                     extra={"request_id": job.id})
            self._drop(job)
        else:
            self._fail(job, "the engine failed while this request's audio was streaming, and running it again "
                            "gave other audio than what was already sent; submit it again")

    def _synthesize(self, requests: list[SynthesisRequest], on_audio: OnAudio | None = None
                    ) -> tuple[list[SynthesisResult], float]:
        t0 = time.perf_counter()
        self.metrics.busy.set(1)
        try:
            results = list(self.engine.synthesize(requests, on_audio=on_audio) if on_audio is not None
                           else self.engine.synthesize(requests))
            if len(results) != len(requests):
                raise RuntimeError(f"the engine returned {len(results)} results for {len(requests)} requests")
        except Exception as e:
            if len(requests) == 1:
                log.exception("synthesis failed", extra={"request_id": requests[0].request_id})
                results = [SynthesisResult(error=f"synthesis failed: {type(e).__name__}: {e}")]
            else:   # isolate the failing request(s): run each alone
                log.warning("batch of %d failed (%s); running its requests one by one", len(requests), e)
                results = [self._synthesize([r], on_audio if r.stream else None)[0][0] for r in requests]
        finally:
            self.metrics.busy.set(0)
        return results, time.perf_counter() - t0

    def _finish(self, job: Job, result: SynthesisResult, seconds: float, batch: int, claimed_at: float) -> None:
        metrics = {"inference_time": round(seconds, 4), "queue_time": round(max(0.0, claimed_at - job.created_at), 4),
                   "batch_size": batch, "attempts": job.attempts}
        for k, v in (result.metrics or {}).items():
            if isinstance(v, (int, float, str, bool)) and k not in metrics:
                metrics[k] = v
        if result.error is not None or result.audio is None:
            self._fail(job, result.error or "the engine returned no audio", metrics)
            return
        fmt = str(job.params.get("output_format") or "mp3")
        speed = float(job.params.get("speed") or 1.0)
        try:
            audio = np.asarray(result.audio, dtype=np.float32).reshape(-1)
            rate = int(self.engine.sample_rate)
            if speed != 1.0:       # billed on the audio the model made; the output is `speed` times shorter
                from ..media.stretch import time_stretch
                metrics["speed"] = speed
                data, media_type = self.encode(time_stretch(audio, rate, speed), rate, fmt)
            else:
                data, media_type = self.encode(audio, rate, fmt)
        except Exception as e:
            log.exception("encoding failed", extra={"request_id": job.id})
            if is_storage_error(e):
                self._retry_later(job, e)
            else:
                self._fail(job, f"encoding the audio as {fmt} failed: {public_reason(e)}", metrics)
            return
        metrics["audio_seconds"] = round(len(audio) / rate, 3)
        metrics["total_time"] = round(max(0.0, time.time() - job.created_at), 4)
        try:
            done = self.store.complete(job.id, self.worker_id, data, media_type, metrics)
        except Exception as e:      # read-only or full disk, store down: the server's problem, retried later
            self._retry_later(job, e)
            return
        self._drop(job)
        if done:
            self.metrics.audio_seconds.inc(metrics["audio_seconds"])
            self.metrics.jobs_finished.labels("COMPLETED").inc()
            log.info("job completed", extra={"request_id": job.id, "inference_time": metrics["inference_time"],
                                             "audio_seconds": metrics["audio_seconds"], "batch_size": batch})
        else:
            log.warning("job %s was taken from this worker (lease lost); result dropped", job.id,
                        extra={"request_id": job.id})

    def retry_delay(self, attempts: int) -> float:
        """Backoff before a job whose result could not be stored is tried again: the lease length, doubling
        with each attempt used, at most MAX_RETRY_DELAY."""
        return min(MAX_RETRY_DELAY, self.lease_seconds * 2 ** max(0, attempts - 1))

    def _retry_later(self, job: Job, cause: BaseException) -> None:
        """A storage failure while finishing `job`: hand it back for a later attempt (bounded by max_attempts),
        stop claiming until storage works again. The cause is logged, never stored in the job."""
        log.error("storing the result of %s failed (%s: %s); the job will be retried", job.id,
                  type(cause).__name__, cause, extra={"request_id": job.id})
        self.metrics.storage_errors.inc()
        self.storage_problem = self.storage_problem or "a result could not be stored"
        self._drop(job)                 # no more heartbeats for it, whatever happens next
        if job.attempts >= self.max_attempts:
            self._fail(job, STORAGE_REASON)
            return
        delay = self.retry_delay(job.attempts)
        try:
            if self.store.retry_later(job.id, self.worker_id, STORAGE_REASON, delay):
                log.warning("job %s handed back; retried in %.0f s at the earliest", job.id, delay,
                            extra={"request_id": job.id})
        except Exception as e:  # nothing can be written: its lease runs out and recover_expired requeues it
            log.error("could not hand %s back (%s); it will be retried after its lease", job.id, e,
                      extra={"request_id": job.id})

    def _fail(self, job: Job, reason: str, metrics: dict | None = None) -> None:
        reason = scrub_paths(reason)
        try:
            done = self.store.fail(job.id, self.worker_id, reason, metrics)
        except Exception as e:   # cannot even write the failure: the lease runs out and the job is retried
            log.error("could not mark %s FAILED (%s); it will be retried after its lease", job.id, e,
                      extra={"request_id": job.id})
            with self._in_hand_lock:   # stop heart-beating it so its lease can run out
                self._in_hand.discard(job.id)
            return
        self._drop(job)
        if done:
            self.metrics.jobs_finished.labels("FAILED").inc()
            log.info("job failed: %s", reason, extra={"request_id": job.id})

    def _drop(self, job: Job) -> None:
        with self._in_hand_lock:
            self._in_hand.discard(job.id)


class Janitor:
    """Maintenance without a worker (an API with `--workers 0` on its own store): recover leases, purge results,
    and, given `accounts`, repair credit holds left open (`Accounts.maybe_reconcile`); billing is the store's."""

    def __init__(self, store: JobStore, *, max_attempts: int = 3, retention_seconds: float = 3600.0,
                 interval: float = 10.0, accounts: Accounts | None = None):
        self.store, self.max_attempts, self.retention_seconds, self.interval = (
            store, max_attempts, retention_seconds, interval)
        self.accounts = accounts
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="janitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.store.recover_expired(self.max_attempts)
                self.store.purge_expired(self.retention_seconds)
            except Exception:
                log.exception("maintenance failed")
            if self.accounts is not None:
                self.accounts.maybe_reconcile(self.store.get)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
