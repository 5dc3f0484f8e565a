"""The job store interface. Two implementations pass one contract suite (tests/test_store_contract.py):
SQLite (jobs/sqlite_store.py, the embedded single-machine default) and Redis (jobs/redis_store.py, scale-out).

Life of a job:  submit -> QUEUED -> claim (lease) -> PROCESSING -> complete | fail
A PROCESSING job whose lease runs out (worker died) goes back to QUEUED by `recover_expired`, or to FAILED
once it has used `max_attempts`. `release` hands a job back without counting the attempt (graceful stop);
`retry_later` hands it back for a later attempt that counts (the server could not store its result).
Terminal jobs and their audio are deleted `retention` seconds after they finished.

Billing: after `attach_billing(account_store)` (the account store living in the same backend), the store closes
a job's credit hold in the same transaction / script as its terminal transition: COMPLETED settles it (at the
price recorded with the hold, for the metrics' `audio_seconds`), FAILED releases it (`fail`, and
`recover_expired` giving up). A reader that sees COMPLETED sees the settled balance. Jobs without a hold
transition as before. The job store knows nothing of prices or keys: the hold-closing code is the account
store's, run on the job store's connection (SQLite) or composed into its scripts (Redis).

Errors stored in a job (`error`) are shown to its client: they never contain a server path.

Queue conventions (all additive to the hosted contract; each is atomic in the store):
  * cancel: `cancel` moves a QUEUED or PROCESSING job to FAILED (`cancelled`, error CANCELLED_REASON) in one
    transition that also releases its hold; a PROCESSING job's worker loses it as it would a lost lease (its
    `complete`/`fail` are refused, `progress` tells it the job is no longer its own).
  * events: every state change (and a worker's `progress`) appends a `JobEvent` to the job's own numbered log,
    in the same transaction as the change; `job_events(id, after)` reads it (any replica), deleted with the job.
  * webhooks: a job submitted with `webhook_url` gets a delivery queued with its terminal transition (same
    transaction); `claim_webhooks` hands due deliveries out under a lease (two dispatchers never make the same
    attempt), `finish_webhook` records the attempt (delivered, retry at a time, or failed). Durable: a delivery
    due while no process runs is made by the next one that polls.
  * queue position: `queue_position` counts the QUEUED jobs `claim` would take before a job, given the
    round-robin-by-owner order, if nothing else arrived (a new owner's first job can still go ahead of it).
  * models: every job is for one API model (`Job.model`, "chatterbox-tts" by default; engine/catalog.py names
    them). `claim(..., models=[...])` takes only jobs of those models (None: any), so a worker claims what its
    engine serves and a job waits for a worker of its model. Each model has its own queue: fairness by owner,
    `queue_position` and the `max_queued` bound are per model (a model with no worker running cannot fill the
    queue of the others, and a job's place counts the jobs that the workers of its model take before it).
  * idempotency keys: `claim_idempotency_key` reserves (owner, key) for one job id atomically, so concurrent
    duplicates create one job.
  * chunk channel: a job's audio as it is made (streamed jobs), readable by any replica while the worker writes
    it. `append_chunk` (the lease holder only) appends piece `seq` of the current attempt; `read_chunks` returns
    the pieces after a position with the attempt they belong to and whether the stream is over. Every claim
    starts a new attempt (its number: the job's claims so far, released and recovered ones included, so it
    never repeats) and drops the previous attempt's pieces in the same transition; a reader that follows an
    attempt which is over (the job was retried, or is back in the queue) gets `restarted`, never pieces of two
    attempts. Pieces are kept until the job is purged (SQLite: a table; Redis: a stream per job with the job's
    TTL).
"""
from __future__ import annotations

import os
import secrets
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Sequence

MIN_FREE_BYTES = 1 << 20        # `writable` reports a full disk below this much free space
CANCELLED_REASON = "cancelled by the client"
DEFAULT_MODEL = "chatterbox-tts"   # the API model of jobs that name none (engine/catalog.py: the original variant)
LOST_ATTEMPT = "no answer was recorded for the last attempt (its sender stopped)"   # a webhook's last_error


class JobState(str, Enum):
    QUEUED = "QUEUED"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED)


@dataclass
class Job:
    id: str                                   # unguessable (uuid4)
    owner: str                                # account id of the submitting key ("" when auth is off)
    params: dict                              # validated request parameters, JSON-serialisable
    state: JobState = JobState.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None           # first claim
    finished_at: float | None = None
    attempts: int = 0                         # claims that counted
    error: str | None = None                  # reason, when FAILED
    metrics: dict = field(default_factory=dict)
    media_type: str | None = None             # of the stored audio, when COMPLETED
    worker_id: str | None = None              # lease holder while PROCESSING
    lease_until: float | None = None
    webhook_url: str | None = None            # POSTed the result once terminal (validated by the API)
    base_url: str | None = None               # the API base the client used: URLs in the webhook's body
    cancelled: bool = False                   # FAILED because the client cancelled it
    webhook: dict | None = None               # delivery state when webhook_url is set (read-only; the store's):
                                              # {"state": pending|delivered|failed, "attempts", "last_status",
                                              #  "last_error"}
    model: str = DEFAULT_MODEL                # the API model it is for: only a worker serving it claims it


@dataclass
class JobEvent:
    seq: int                                  # 1, 2, ... per job: the SSE id (resume with Last-Event-ID)
    type: str                                 # "state" (data["status"]) or "progress" (data["stage"], chunks)
    data: dict                                # what happened, with "at" (Unix time)


@dataclass
class AudioChunk:
    seq: int                                  # 0, 1, ... within its attempt
    data: bytes                               # opaque to the store (the worker's encoding: media/stream.py)


@dataclass
class ChunkRead:
    """What `read_chunks` saw, in one consistent read."""
    state: JobState                           # the job's state
    attempt: int                              # the stream attempt the job is on (0: never claimed)
    chunks: list[AudioChunk]                  # of `attempt`, numbered above `after`, in order
    restarted: bool = False                   # the attempt asked for is over (retried / requeued): its stream is
                                              # gone, and nothing of it may be joined with a later attempt's
    end: bool = False                         # the job is terminal and no chunk follows these: nothing more comes


@dataclass
class WebhookDelivery:
    job_id: str
    attempt: int                              # this attempt's number (1 = the first)


@dataclass
class IdempotencyRecord:
    job_id: str                               # the job the key was first used for
    fingerprint: str                          # of the request it was used with
    created_at: float


@dataclass
class StoreStats:
    by_state: dict[str, int]                  # live (unexpired) jobs per state
    oldest_queued_age: float                  # seconds; 0 when the queue is empty
    workers: dict[str, dict]                  # live workers: id -> what they advertised ("models": what they serve)
    queued_by_model: dict[str, int] = field(default_factory=dict)   # QUEUED jobs per API model (those with any)


class QueueFull(Exception):
    """The bounded queue is full: the API answers 429."""


class StoreUnavailable(Exception):
    """The backend cannot be reached: the API answers 502."""


class JobStore(ABC):
    # --- API side -------------------------------------------------------------------------------------------
    @abstractmethod
    def submit(self, job: Job, max_queued: int, model: str | None = None) -> None:
        """Persist a new QUEUED job (durable when this returns). `model`: the API model it is for (sets
        `job.model`; None keeps it). Raises QueueFull when `max_queued` jobs of that model wait."""

    @abstractmethod
    def get(self, job_id: str) -> Job | None:
        """The job, or None when unknown or expired."""

    @abstractmethod
    def get_audio(self, job_id: str) -> tuple[bytes, str] | None:
        """(audio bytes, media type) of a COMPLETED job, or None."""

    @abstractmethod
    def wait(self, job_id: str, timeout: float) -> Job | None:
        """Block until the job is terminal or `timeout` seconds pass; return its latest state."""

    @abstractmethod
    def stats(self) -> StoreStats: ...

    # --- worker side ----------------------------------------------------------------------------------------
    @abstractmethod
    def claim(self, worker_id: str, limit: int, lease_seconds: float,
              models: Sequence[str] | None = None) -> list[Job]:
        """Move up to `limit` QUEUED jobs of `models` (None: of any model) to PROCESSING under a lease, fairly
        across owners within a model (round-robin by owner, oldest first within one), counting an attempt each.
        Never returns one job to two workers."""

    @abstractmethod
    def heartbeat(self, worker_id: str, job_ids: list[str], lease_seconds: float, info: dict | None = None) -> None:
        """Extend the leases this worker holds, and advertise the worker as alive (with `info`)."""

    @abstractmethod
    def complete(self, job_id: str, worker_id: str, audio: bytes, media_type: str, metrics: dict) -> bool:
        """Store the audio and mark COMPLETED, only if `worker_id` still holds the lease. False otherwise
        (the job was reclaimed and may be completed by another worker: never twice)."""

    @abstractmethod
    def fail(self, job_id: str, worker_id: str | None, error: str, metrics: dict | None = None) -> bool:
        """Mark FAILED with a reason (only if still held by `worker_id`; None: any non-terminal job)."""

    @abstractmethod
    def release(self, job_id: str, worker_id: str) -> bool:
        """Give a held job back to the queue without counting the attempt (graceful shutdown)."""

    @abstractmethod
    def retry_later(self, job_id: str, worker_id: str, reason: str, delay: float) -> bool:
        """The holder could not finish the job for a reason of the server's (its result could not be stored):
        give it up for `delay` seconds. The job stays PROCESSING, held by no worker (a late `complete` from the
        old holder is refused), until `recover_expired` queues it again once `delay` has passed (the attempt
        counts), or FAILs it with `reason` if it has used `max_attempts`. False when not held by `worker_id`."""

    # --- maintenance ----------------------------------------------------------------------------------------
    @abstractmethod
    def recover_expired(self, max_attempts: int) -> int:
        """Expired leases: back to QUEUED, or FAILED once `max_attempts` are used (with the reason given to
        `retry_later`, if it was, else one saying the worker stopped). Returns how many."""

    @abstractmethod
    def purge_expired(self, retention_seconds: float) -> int:
        """Delete terminal jobs (and their audio) finished more than `retention_seconds` ago."""

    @abstractmethod
    def writable(self) -> str | None:
        """Health probe (/ready): None when jobs and audio can be written now, else a short reason naming no
        path. It really writes (a tiny transaction or key, a file in the audio directory), so it is cheap but
        not free: call it per readiness check, not per request."""

    # --- queue conventions (see the module docstring) -----------------------------------------------------
    @abstractmethod
    def cancel(self, job_id: str) -> Job | None:
        """Cancel a QUEUED or PROCESSING job: FAILED with CANCELLED_REASON and `cancelled`, its hold released,
        its worker's lease gone, in one transition. A terminal job is left as it is. Returns the job as it is
        afterwards (cancelled now or before, or finished otherwise), None when unknown or expired."""

    @abstractmethod
    def queue_position(self, job_id: str) -> int | None:
        """How many QUEUED jobs of its model `claim` would take before this one if no other job arrived (0:
        next), given the round-robin order across owners (see `claim`); None when the job is not QUEUED."""

    @abstractmethod
    def job_events(self, job_id: str, after: int = 0, limit: int = 1000) -> list[JobEvent]:
        """The job's events numbered above `after`, oldest first (at most `limit`); [] when none or unknown."""

    @abstractmethod
    def progress(self, worker_id: str, updates: dict[str, dict]) -> set[str]:
        """Record progress events (`{job_id: data}`, data e.g. {"stage", "chunks_done", "chunks_total"}) for
        the jobs `worker_id` still holds; an empty data records nothing. Returns the ids it still holds: a
        job missing from the answer was cancelled or taken from this worker, which drops it."""

    @abstractmethod
    def claim_idempotency_key(self, owner: str, key: str, fingerprint: str, job_id: str, ttl: float,
                              stale_after: float = 30.0) -> IdempotencyRecord | None:
        """Reserve (owner, key) for `job_id` for `ttl` seconds, atomically: None when reserved now (the
        caller submits `job_id`), else the record of the job it is held by. A record whose job does not exist
        and that is older than `stale_after` seconds (its submitter died between reserving and submitting)
        is taken over."""

    @abstractmethod
    def release_idempotency_key(self, owner: str, key: str, job_id: str) -> None:
        """Drop the reservation of (owner, key) if it is still `job_id`'s (the submission was refused)."""

    @abstractmethod
    def claim_webhooks(self, claimer: str, limit: int, lease_seconds: float, max_attempts: int) -> list[WebhookDelivery]:
        """Up to `limit` due deliveries, each counting one attempt and leased to `claimer` for
        `lease_seconds` (not due again before, so no other claimer makes the same attempt). A delivery that
        used `max_attempts` without a report (its claimer died) is marked failed instead."""

    @abstractmethod
    def finish_webhook(self, job_id: str, claimer: str, attempt: int, outcome: str, status: int | None = None,
                       error: str | None = None, retry_in: float = 0.0) -> bool:
        """Record attempt `attempt` of `claimer`: outcome "delivered", "failed" (no more attempts) or "retry"
        (due again in `retry_in` seconds), with the receiver's HTTP status or an error. False when that
        attempt is not the current one of that claimer (its lease ran out and another took it)."""

    @abstractmethod
    def append_chunk(self, job_id: str, worker_id: str, seq: int, data: bytes) -> bool:
        """Append piece `seq` of the job's current attempt, only if `worker_id` holds the job (PROCESSING under its
        lease): False otherwise (cancelled, taken, finished). `seq` must be the attempt's next number (0 first):
        appending a piece already there with the same bytes is a no-op (a retried write) that returns True;
        with other bytes, or leaving a gap, ValueError."""

    @abstractmethod
    def read_chunks(self, job_id: str, after: int = -1, attempt: int | None = None,
                    limit: int = 100) -> ChunkRead | None:
        """The job's pieces numbered above `after` (at most `limit`), of `attempt` (None: the current one), in
        one consistent read with the job's state. When `attempt` is given and is not the one the job is on, or
        the job went back to the queue since (its attempt is over), `restarted` is set, no pieces are returned,
        and `attempt` is the current one; with `attempt` None, an attempt that is over has no pieces to read
        (they are dropped when the next attempt starts). None when the job is unknown or expired."""

    def attach_billing(self, account_store) -> None:
        """Close credit holds with the jobs' terminal transitions, atomically (see the module docstring).
        `account_store`: the account store of the same backend (same database file / Redis server and
        prefix): ValueError otherwise. None detaches."""
        raise NotImplementedError(f"{type(self).__name__} cannot bill jobs")

    def close(self) -> None:
        pass


def probe_directory(directory: Path) -> str | None:
    """None when a file can be created, written, synced and deleted in `directory` and the disk has room; else
    a short reason (an OS error's text, never the path)."""
    probe = directory / f".probe-{secrets.token_hex(6)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(probe)
        st = os.statvfs(directory)
    except OSError as e:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
        return e.strerror or type(e).__name__
    if st.f_bavail * st.f_frsize < MIN_FREE_BYTES:
        return "the disk is full"
    return None
