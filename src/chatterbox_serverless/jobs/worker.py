"""The worker: claims a batch of jobs, turns them into engine requests, runs the engine, stores each result.

Store-agnostic (any `JobStore`), so the same class runs in-process under `serve` (SQLite) and standalone against a
shared store. Per job: content policy, reference audio (fetched/decoded by `resolve_reference`), synthesis,
encoding, `complete` — a failure at any step fails that job alone, with a reason. A heartbeat thread extends the
leases of the jobs in hand and advertises the worker; a janitor recovers expired leases and purges expired
results. `stop()` (SIGTERM) stops claiming, finishes the batch in hand within the grace time, and otherwise hands
its jobs back to the queue.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..engine.types import Engine, SynthesisParams, SynthesisRequest, SynthesisResult, VoiceAudio
from .policy import ContentPolicy
from .scheduler import Scheduler
from .store import Job, JobStore

if TYPE_CHECKING:
    from ..accounts.service import Accounts

log = logging.getLogger(__name__)

ResolveReference = Callable[[str], VoiceAudio]          # reference_audio value -> decoded clip; raises with a reason
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
        self.busy = Gauge("chatterbox_worker_busy", "1 while the engine runs a batch", registry=self.registry)


def synthesis_params(params: dict) -> SynthesisParams:
    """The engine's parameters from a job's stored params (validated by the API at submit)."""
    return SynthesisParams(**{k: params[k] for k in SynthesisParams.__dataclass_fields__ if k in params})


def _no_reference_support(value: str) -> VoiceAudio:
    raise RuntimeError("this worker cannot read reference audio (no resolver configured)")


class Worker:
    def __init__(self, store: JobStore, engine: Engine, *, encode: EncodeAudio,
                 resolve_reference: ResolveReference | None = None, policy: ContentPolicy | None = None,
                 worker_id: str | None = None, batch_size: int = 8, batch_wait: float = 0.02,
                 lease_seconds: float = 30.0, max_attempts: int = 3, retention_seconds: float = 3600.0,
                 shutdown_grace: float = 30.0, poll_interval: float = 0.1, maintenance_interval: float = 5.0,
                 metrics: WorkerMetrics | None = None, info: dict | None = None, accounts: Accounts | None = None):
        self.store = store
        self.accounts = accounts        # bills jobs: settle on COMPLETED, release on FAILED
        self.engine = engine
        self.encode = encode
        self.resolve_reference = resolve_reference or _no_reference_support
        self.policy = policy or ContentPolicy()
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.retention_seconds = retention_seconds
        self.shutdown_grace = shutdown_grace
        self.maintenance_interval = maintenance_interval
        self.metrics = metrics or WorkerMetrics()
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "batch_size": batch_size,
                     "started_at": time.time(), **(info or {})}
        self.scheduler = Scheduler(store, self.worker_id, batch_size=batch_size, batch_wait=batch_wait,
                                   lease_seconds=lease_seconds, poll_interval=poll_interval)
        self._stop = threading.Event()
        self._heartbeat_stop = threading.Event()
        self._in_hand: set[str] = set()
        self._in_hand_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._heartbeat_thread: threading.Thread | None = None
        self._fetch_pool = ThreadPoolExecutor(4, thread_name_prefix="reference-fetch")
        self._last_maintenance = 0.0
        self.batches_done = 0

    # --- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._heartbeat_stop.clear()
        self._thread = threading.Thread(target=self.run, name=f"worker-{self.worker_id}", daemon=True)
        self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, name="worker-heartbeat", daemon=True)
        self._thread.start()
        self._heartbeat_thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def notify(self) -> None:
        self.scheduler.notify()

    def stop(self, grace: float | None = None) -> None:
        """Stop claiming; let the batch in hand finish for `grace` seconds, then give its jobs back to the queue."""
        grace = self.shutdown_grace if grace is None else grace
        self._stop.set()
        self.scheduler.notify()
        if self._thread is not None:
            self._thread.join(grace)
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
        while not self._stop.is_set():
            try:
                self.maintain()
                jobs = self.scheduler.next_batch(self._stop)
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
        if self.accounts is not None:   # holds of jobs that ended without billing (crash, recover_expired)
            self.accounts.maybe_reconcile(self.store.get)

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
    def process(self, jobs: Sequence[Job]) -> None:
        claimed_at = time.time()
        ready: list[tuple[Job, SynthesisRequest]] = []
        voices = {}
        for job in jobs:
            ref = job.params.get("reference_audio")
            if ref:
                voices[job.id] = self._fetch_pool.submit(self.resolve_reference, ref)
        for job in jobs:
            text = str(job.params.get("text", ""))
            reason = self.policy.violation(text)
            if reason:
                self._fail(job, reason)
                continue
            voice = None
            if job.id in voices:
                try:
                    voice = voices[job.id].result()
                except Exception as e:
                    reason = str(e) or type(e).__name__
                    self._fail(job, reason if reason.startswith("reference_audio") else f"reference_audio: {reason}")
                    continue
            try:
                request = SynthesisRequest(text=text, params=synthesis_params(job.params), voice=voice,
                                           request_id=job.id)
            except Exception as e:
                self._fail(job, f"invalid parameters: {e}")
                continue
            ready.append((job, request))
        if not ready:
            return
        results, seconds = self._synthesize([r for _, r in ready])
        self.batches_done += 1
        self.metrics.inference_seconds.observe(seconds)
        self.metrics.batch_size.observe(len(ready))
        for (job, _), result in zip(ready, results):
            self._finish(job, result, seconds, len(ready), claimed_at)

    def _synthesize(self, requests: list[SynthesisRequest]) -> tuple[list[SynthesisResult], float]:
        t0 = time.perf_counter()
        self.metrics.busy.set(1)
        try:
            results = list(self.engine.synthesize(requests))
            if len(results) != len(requests):
                raise RuntimeError(f"the engine returned {len(results)} results for {len(requests)} requests")
        except Exception as e:
            if len(requests) == 1:
                log.exception("synthesis failed", extra={"request_id": requests[0].request_id})
                results = [SynthesisResult(error=f"synthesis failed: {type(e).__name__}: {e}")]
            else:   # isolate the failing request(s): run each alone
                log.warning("batch of %d failed (%s); running its requests one by one", len(requests), e)
                results = [self._synthesize([r])[0][0] for r in requests]
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
        try:
            audio = np.asarray(result.audio, dtype=np.float32).reshape(-1)
            rate = int(self.engine.sample_rate)
            data, media_type = self.encode(audio, rate, fmt)
        except Exception as e:
            log.exception("encoding failed", extra={"request_id": job.id})
            self._fail(job, f"encoding the audio as {fmt} failed: {e}", metrics)
            return
        metrics["audio_seconds"] = round(len(audio) / rate, 3)
        metrics["total_time"] = round(max(0.0, time.time() - job.created_at), 4)
        try:
            done = self.store.complete(job.id, self.worker_id, data, media_type, metrics)
        except Exception as e:      # disk full, store down: fail with the reason, or leave it to the lease
            log.error("storing the result of %s failed: %s", job.id, e, extra={"request_id": job.id})
            self._fail(job, f"the result could not be stored ({e})", metrics)
            return
        finally:
            self._drop(job)
        if done:
            if self.accounts is not None:
                self.accounts.finish(job.id, True, metrics)
            self.metrics.audio_seconds.inc(metrics["audio_seconds"])
            self.metrics.jobs_finished.labels("COMPLETED").inc()
            log.info("job completed", extra={"request_id": job.id, "inference_time": metrics["inference_time"],
                                             "audio_seconds": metrics["audio_seconds"], "batch_size": batch})
        else:
            log.warning("job %s was taken from this worker (lease lost); result dropped", job.id,
                        extra={"request_id": job.id})

    def _fail(self, job: Job, reason: str, metrics: dict | None = None) -> None:
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
            if self.accounts is not None:
                self.accounts.finish(job.id, False, error=reason)
            self.metrics.jobs_finished.labels("FAILED").inc()
            log.info("job failed: %s", reason, extra={"request_id": job.id})

    def _drop(self, job: Job) -> None:
        with self._in_hand_lock:
            self._in_hand.discard(job.id)


class Janitor:
    """Maintenance without a worker (an API with `--workers 0` on its own store): recover leases, purge results."""

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
