"""The embedded job store: one SQLite database (WAL) in the data dir, audio files beside it.

Durability: every state change is one transaction (`synchronous=FULL` by default: an accepted job survives a
crash of the process and of the machine). Audio is written atomically (tmp file, fsync, rename, fsync of the
directory) before the job is marked COMPLETED, under a name unique to the writing attempt, so a worker that lost
its lease never overwrites nor deletes the winner's file.

Threads: one writer connection behind a lock; each reading thread has its own connection (WAL readers never wait
for the writer), so status polls stay fast while jobs are being written.

Fairness: `claim` serves owners round-robin within a model (the owner served least recently first in that
model's queue, `queue_turns`), oldest job first within one owner. In one claim of several jobs, round k takes
every (model, owner)'s k-th job, owners in the same order each round (turn, then oldest queued job, then owner
id), so one big claim takes jobs in the order that claims of one job at a time would: `queue_position` counts
exactly that order within the job's model.

Models: the `model` column (added by the migration at open to databases made before it: their jobs are
"chatterbox-tts", the only model then); `claim(models=...)` reads only those models' queued rows (index
jobs_queued_model). The per-owner turns were `owner_turns (owner)` before; the migration moves them to
`queue_turns (model, owner)` as the original model's.

Queue conventions (jobs/store.py): `job_events` holds each job's numbered events, `webhook_deliveries` the
delivery of a job's result to its webhook (created in the terminal transition's transaction, claimed with a
lease: `hook_due` is both when it is due and, while an attempt runs, when that attempt's lease ends),
`idempotency_keys` the (owner, key) reservations (primary key: two submissions cannot both reserve one),
`job_chunks` the chunk channel (a streamed job's pieces, keyed by job, attempt and number; `claims` counts a
job's claims, the attempt number; `claim` deletes the previous attempt's pieces, `purge_expired` the job's).

A full disk, a read-only data dir: `submit` raises (nothing was accepted); `complete` raises OSError or
StoreUnavailable after removing its partial file, and the job stays PROCESSING under its lease, so the worker
hands it back with `retry_later` for a later attempt, or, if even that cannot be written, the lease runs out and
`recover_expired` retries it once the database is writable again (bounded attempts). `writable()` probes both
the database and the audio directory (for /ready).

Billing (`attach_billing(account_store)`): the account tables live in this database file; closing a job's
credit hold is SQL run by the account store on this store's writer connection, inside the transaction that
marks the job COMPLETED or FAILED.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Sequence

from .files import write_atomically
from .store import (CANCELLED_REASON, DEFAULT_MODEL, LOST_ATTEMPT, AudioChunk, ChunkRead, IdempotencyRecord, Job, JobEvent,
                    JobState, JobStore, QueueFull, StoreStats, StoreUnavailable, WebhookDelivery, probe_directory)

log = logging.getLogger(__name__)

WORKER_ALIVE_SECONDS = 30.0     # a worker that has not heartbeaten for this long is not listed as alive
ORPHAN_AUDIO_SECONDS = 600.0    # audio files no job refers to (a crash between write and commit) are removed after

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    params TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    metrics TEXT NOT NULL DEFAULT '{}',
    media_type TEXT,
    audio_file TEXT,
    worker_id TEXT,
    lease_until REAL
);
CREATE INDEX IF NOT EXISTS jobs_queued ON jobs(owner, created_at) WHERE state = 'QUEUED';
CREATE INDEX IF NOT EXISTS jobs_leased ON jobs(lease_until) WHERE state = 'PROCESSING';
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS queue_turns (model TEXT NOT NULL, owner TEXT NOT NULL, turn INTEGER NOT NULL,
                                        PRIMARY KEY (model, owner)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS workers (id TEXT PRIMARY KEY, info TEXT NOT NULL, seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS store_probe (id INTEGER PRIMARY KEY CHECK (id = 1), at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    at REAL NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    job_id TEXT PRIMARY KEY,
    hook_state TEXT NOT NULL,
    hook_due REAL,
    hook_attempts INTEGER NOT NULL DEFAULT 0,
    hook_claimer TEXT,
    hook_status INTEGER,
    hook_error TEXT
);
CREATE INDEX IF NOT EXISTS webhook_due ON webhook_deliveries(hook_due) WHERE hook_state = 'pending';
CREATE TABLE IF NOT EXISTS idempotency_keys (
    owner TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    job_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (owner, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_expiry ON idempotency_keys(expires_at);
CREATE TABLE IF NOT EXISTS job_chunks (
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (job_id, attempt, seq)
);
"""
# columns added after the first release, added at open when missing: (column, declaration)
_JOB_MIGRATIONS = (("retry_reason", "TEXT"),    # why the job was handed back by `retry_later` (its FAILED
                                                # reason if it runs out of attempts); cleared at the next claim
                   ("webhook_url", "TEXT"), ("base_url", "TEXT"), ("cancelled", "INTEGER NOT NULL DEFAULT 0"),
                   ("claims", "INTEGER NOT NULL DEFAULT 0"),   # every claim counts here: the stream attempt
                   ("model", f"TEXT NOT NULL DEFAULT '{DEFAULT_MODEL}'"))   # the API model the job is for

_COLUMNS = ("id, owner, params, state, created_at, started_at, finished_at, attempts, error, metrics, "
            "media_type, worker_id, lease_until, webhook_url, base_url, cancelled, model")
_HOOK_COLUMNS = "hook_state, hook_attempts, hook_status, hook_error"     # of webhook_deliveries, LEFT JOINed

_EXTENSIONS = {"audio/mpeg": "mp3", "audio/wav": "wav", "audio/x-wav": "wav", "audio/flac": "flac",
               "audio/ogg": "ogg"}


def _row_to_job(row: tuple) -> Job:
    """A job from `_COLUMNS` (and, when present, `_HOOK_COLUMNS` after them)."""
    (id_, owner, params, state, created, started, finished, attempts, error, metrics, media_type, worker_id,
     lease_until, webhook_url, base_url, cancelled, model) = row[:17]
    webhook = None
    if webhook_url:
        hook_state, hook_attempts, hook_status, hook_error = row[17:21] if len(row) >= 21 else (None,) * 4
        webhook = {"state": hook_state or "pending", "attempts": hook_attempts or 0, "last_status": hook_status,
                   "last_error": hook_error}
    return Job(id=id_, owner=owner, params=json.loads(params), state=JobState(state), created_at=created,
               started_at=started, finished_at=finished, attempts=attempts, error=error,
               metrics=json.loads(metrics) if metrics else {}, media_type=media_type, worker_id=worker_id,
               lease_until=lease_until, webhook_url=webhook_url or None, base_url=base_url or None,
               cancelled=bool(cancelled), webhook=webhook, model=model or DEFAULT_MODEL)


def _event(conn: sqlite3.Connection, job_id: str, kind: str, data: dict, now: float) -> None:
    """Append the next numbered event of a job (inside the caller's transaction)."""
    conn.execute("INSERT INTO job_events (job_id, seq, at, type, data) "
                 "SELECT ?, COALESCE(MAX(seq), 0) + 1, ?, ?, ? FROM job_events WHERE job_id = ?",
                 (job_id, now, kind, json.dumps({**data, "at": round(now, 6)}), job_id))


def _ended(conn: sqlite3.Connection, job_id: str, state: str, now: float, cancelled: bool = False) -> None:
    """What goes with every terminal transition: its event, and the webhook delivery of a job that has one."""
    _event(conn, job_id, "state", {"status": state, **({"cancelled": True} if cancelled else {})}, now)
    conn.execute("INSERT OR IGNORE INTO webhook_deliveries (job_id, hook_state, hook_due, hook_attempts) "
                 "SELECT id, 'pending', ?, 0 FROM jobs WHERE id = ? AND COALESCE(webhook_url, '') != ''",
                 (now, job_id))


class _PendingSubmit:
    __slots__ = ("job", "max_queued", "done", "error")

    def __init__(self, job: Job, max_queued: int):
        self.job, self.max_queued, self.done, self.error = job, max_queued, False, None


class SQLiteJobStore(JobStore):
    """`SQLiteJobStore(path)`: the database file at `path` (created with its directory), audio in `audio/` beside
    it. `retention_seconds` hides terminal jobs that finished longer ago than that, even before a purge."""

    def __init__(self, path: str | os.PathLike, retention_seconds: float = 3600.0, synchronous: str = "FULL"):
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError("synchronous must be FULL, NORMAL or EXTRA")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.audio_dir = self.path.parent / "audio"
        self.audio_dir.mkdir(exist_ok=True)
        self.retention_seconds = float(retention_seconds)
        self._synchronous = synchronous.upper()
        self._write_lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._pending: list[_PendingSubmit] = []
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._changed = threading.Condition()
        self._closed = False
        self._billing = None            # the account store closing holds with terminal transitions
        self._writer = self._connect()
        with self._write_lock:
            self._writer.executescript(_SCHEMA)
            self._transaction(self._migrate)

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        have = {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
        for column, decl in _JOB_MIGRATIONS:
            if column not in have:
                conn.execute(f"ALTER TABLE jobs ADD COLUMN {column} {decl}")
        conn.execute("CREATE INDEX IF NOT EXISTS jobs_queued_model ON jobs(model, owner, created_at) "
                     "WHERE state = 'QUEUED'")
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'owner_turns'").fetchone():
            conn.execute("INSERT OR IGNORE INTO queue_turns (model, owner, turn) SELECT ?, owner, turn FROM owner_turns",
                         (DEFAULT_MODEL,))
            conn.execute("DROP TABLE owner_turns")

    def attach_billing(self, account_store) -> None:
        """Bill jobs with their terminal transitions: `account_store` is the SQLite account store of this
        database file (accounts.account_store_for(store)); its `settle_in`/`release_in` run in our transactions."""
        if account_store is None:
            self._billing = None
            return
        path = getattr(account_store, "path", None)
        if path is None or not all(callable(getattr(account_store, m, None)) for m in ("settle_in", "release_in")):
            raise ValueError("SQLite jobs are billed by the SQLite account store of the same database file")
        if Path(path).resolve() != self.path.resolve():
            raise ValueError(f"the account store ({path}) is not in the job database ({self.path})")
        self._billing = account_store

    # --- connections ------------------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA busy_timeout=30000")
        except sqlite3.Error as e:
            raise StoreUnavailable(f"cannot open the job database {self.path}: {e}") from e
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise StoreUnavailable("the job store is closed")
            conn = self._connect()
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def _write(self, fn):
        """Run `fn(conn)` in one IMMEDIATE transaction on the writer connection; commit, or roll back on error."""
        with self._write_lock:
            return self._transaction(fn)

    def _transaction(self, fn):
        """The body of `_write`, for callers that already hold the writer lock."""
        if self._closed:
            raise StoreUnavailable("the job store is closed")
        conn = self._writer
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                raise
        except sqlite3.OperationalError as e:   # disk full, I/O error, locked by another process for 30 s
            raise StoreUnavailable(f"the job database cannot be written ({e})") from e
        return result

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    # --- API side ---------------------------------------------------------------------------------------------
    def submit(self, job: Job, max_queued: int, model: str | None = None) -> None:
        """Group commit: concurrent submissions that queue up behind the writer lock are inserted by whichever
        thread gets it first, in one transaction (one fsync for all); each returns once its row is committed."""
        if model is not None:
            job.model = model
        entry = _PendingSubmit(job, max_queued)
        with self._pending_lock:
            self._pending.append(entry)
        with self._write_lock:
            if not entry.done:
                with self._pending_lock:
                    group, self._pending = self._pending, []
                self._insert_group(group)
        if entry.error is not None:
            raise entry.error

    def _insert_group(self, group: list["_PendingSubmit"]) -> None:
        """Called with the writer lock held."""
        def insert(conn: sqlite3.Connection) -> None:
            queued: dict[str, int] = {}          # per model: the bound is each model's own
            for e in group:
                j = e.job
                model = j.model or DEFAULT_MODEL
                if model not in queued:
                    queued[model] = conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'QUEUED' AND model = ?",
                                                 (model,)).fetchone()[0]
                if queued[model] >= e.max_queued:
                    e.error = QueueFull(f"{queued[model]} jobs are waiting (the limit is {e.max_queued})")
                    continue
                try:
                    conn.execute("INSERT INTO jobs (id, owner, params, state, created_at, attempts, metrics, "
                                 "webhook_url, base_url, model) VALUES (?,?,?,?,?,?,?,?,?,?)",
                                 (j.id, j.owner, json.dumps(j.params), JobState.QUEUED.value, j.created_at, 0,
                                  json.dumps(j.metrics or {}), j.webhook_url, j.base_url, model))
                except sqlite3.IntegrityError as ie:     # a duplicate id fails alone
                    e.error = ie
                    continue
                _event(conn, j.id, "state", {"status": JobState.QUEUED.value}, time.time())
                queued[model] += 1

        try:
            self._transaction(insert)
        except BaseException as err:
            failure = err if isinstance(err, Exception) else StoreUnavailable(str(err))
            for e in group:
                if e.error is None:
                    e.error = failure
        finally:
            for e in group:
                e.done = True

    def get(self, job_id: str) -> Job | None:
        row = self._reader().execute(f"SELECT {_COLUMNS}, {_HOOK_COLUMNS} FROM jobs LEFT JOIN webhook_deliveries "
                                     "ON webhook_deliveries.job_id = jobs.id WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        job = _row_to_job(row)
        if job.finished_at is not None and job.finished_at < time.time() - self.retention_seconds:
            return None
        return job

    def audio_file(self, job_id: str) -> Path | None:
        """Path of a COMPLETED job's audio file (for streaming it without reading it whole), or None."""
        job = self.get(job_id)
        if job is None or job.state != JobState.COMPLETED:
            return None
        row = self._reader().execute("SELECT audio_file FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if not row or not row[0]:
            return None
        path = self.audio_dir / row[0]
        return path if path.is_file() else None

    def get_audio(self, job_id: str) -> tuple[bytes, str] | None:
        path = self.audio_file(job_id)
        if path is None:
            return None
        job = self.get(job_id)
        try:
            return path.read_bytes(), (job.media_type if job else None) or "application/octet-stream"
        except FileNotFoundError:   # purged meanwhile
            return None

    def wait(self, job_id: str, timeout: float) -> Job | None:
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            remaining = deadline - time.monotonic()
            if job is None or job.state.terminal or remaining <= 0:
                return job
            # in-process changes notify at once; the bounded wait covers writers in other processes
            with self._changed:
                self._changed.wait(min(remaining, 0.2))

    def stats(self) -> StoreStats:
        now = time.time()
        conn = self._reader()
        by_state = {s.value: 0 for s in JobState}
        for state, n in conn.execute(
                "SELECT state, COUNT(*) FROM jobs WHERE finished_at IS NULL OR finished_at >= ? GROUP BY state",
                (now - self.retention_seconds,)):
            by_state[state] = n
        (oldest,) = conn.execute("SELECT MIN(created_at) FROM jobs WHERE state = 'QUEUED'").fetchone()
        workers = {wid: json.loads(info) for wid, info in conn.execute(
            "SELECT id, info FROM workers WHERE seen >= ?", (now - WORKER_ALIVE_SECONDS,))}
        by_model = dict(conn.execute("SELECT model, COUNT(*) FROM jobs WHERE state = 'QUEUED' GROUP BY model"))
        return StoreStats(by_state=by_state, oldest_queued_age=max(0.0, now - oldest) if oldest else 0.0,
                          workers=workers, queued_by_model=by_model)

    # --- worker side ------------------------------------------------------------------------------------------
    def claim(self, worker_id: str, limit: int, lease_seconds: float,
              models: Sequence[str] | None = None) -> list[Job]:
        if limit <= 0:
            return []
        models = None if models is None else sorted(set(models))
        if models == []:
            return []
        where = "" if models is None else f" AND model IN ({','.join('?' * len(models))})"

        def tx(conn: sqlite3.Connection) -> list[Job]:
            now = time.time()
            # round rn takes each (model, owner)'s rn-th job; owners in the same order every round (see the
            # docstring)
            picked = conn.execute(
                f"""WITH ranked AS (
                       SELECT id, owner, model,
                              ROW_NUMBER() OVER (PARTITION BY model, owner ORDER BY created_at, rowid) AS rn,
                              MIN(created_at) OVER (PARTITION BY model, owner) AS head
                       FROM jobs WHERE state = 'QUEUED'{where})
                   SELECT r.id, r.owner, r.model FROM ranked r
                   LEFT JOIN queue_turns t ON t.model = r.model AND t.owner = r.owner
                   WHERE r.rn <= ? ORDER BY r.rn, COALESCE(t.turn, 0), r.head, r.owner, r.model LIMIT ?""",
                (*(models or ()), limit, limit)).fetchall()
            if not picked:
                return []
            (turn,) = conn.execute("SELECT COALESCE(MAX(turn), 0) FROM queue_turns").fetchone()
            for job_id, owner, model in picked:
                turn += 1
                conn.execute("INSERT INTO queue_turns (model, owner, turn) VALUES (?, ?, ?) "
                             "ON CONFLICT(model, owner) DO UPDATE SET turn = excluded.turn", (model, owner, turn))
                conn.execute(
                    "UPDATE jobs SET state = 'PROCESSING', worker_id = ?, lease_until = ?, attempts = attempts + 1, "
                    "claims = claims + 1, started_at = COALESCE(started_at, ?), retry_reason = NULL WHERE id = ?",
                    (worker_id, now + lease_seconds, now, job_id))
                conn.execute("DELETE FROM job_chunks WHERE job_id = ?", (job_id,))    # a new attempt's stream
            marks = ",".join("?" * len(picked))
            rows = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id IN ({marks})", [p[0] for p in picked])
            jobs = {r[0]: _row_to_job(r) for r in rows}
            for job in jobs.values():
                _event(conn, job.id, "state", {"status": JobState.PROCESSING.value, "attempt": job.attempts}, now)
            return [jobs[p[0]] for p in picked]
        jobs = self._write(tx)
        if jobs:
            self._notify()
        return jobs

    def heartbeat(self, worker_id: str, job_ids: list[str], lease_seconds: float, info: dict | None = None) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            now = time.time()
            if job_ids:
                marks = ",".join("?" * len(job_ids))
                conn.execute(f"UPDATE jobs SET lease_until = ? WHERE state = 'PROCESSING' AND worker_id = ? "
                             f"AND id IN ({marks})", [now + lease_seconds, worker_id, *job_ids])
            conn.execute("INSERT INTO workers (id, info, seen) VALUES (?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                         "info = excluded.info, seen = excluded.seen", (worker_id, json.dumps(info or {}), now))
        self._write(tx)

    def complete(self, job_id: str, worker_id: str, audio: bytes, media_type: str, metrics: dict) -> bool:
        row = self._reader().execute("SELECT state, worker_id FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or row[0] != JobState.PROCESSING.value or row[1] != worker_id:
            return False
        name = f"{job_id}.{secrets.token_hex(4)}.{_EXTENSIONS.get(media_type, 'bin')}"
        write_atomically(self.audio_dir / name, audio)

        def tx(conn: sqlite3.Connection) -> bool:
            now = time.time()
            cur = conn.execute(
                "UPDATE jobs SET state = 'COMPLETED', finished_at = ?, metrics = ?, media_type = ?, audio_file = ?, "
                "worker_id = NULL, lease_until = NULL, error = NULL, retry_reason = NULL "
                "WHERE id = ? AND state = 'PROCESSING' AND worker_id = ?",
                (now, json.dumps(metrics or {}), media_type, name, job_id, worker_id))
            if cur.rowcount != 1:
                return False
            if self._billing is not None:
                self._billing.settle_in(conn, job_id, metrics, now)
            _ended(conn, job_id, JobState.COMPLETED.value, now)
            return True
        try:
            done = self._write(tx)
        except BaseException:
            (self.audio_dir / name).unlink(missing_ok=True)
            raise
        if not done:
            (self.audio_dir / name).unlink(missing_ok=True)
            return False
        self._notify()
        return True

    def fail(self, job_id: str, worker_id: str | None, error: str, metrics: dict | None = None) -> bool:
        def tx(conn: sqlite3.Connection) -> bool:
            now = time.time()
            sql = ("UPDATE jobs SET state = 'FAILED', error = ?, finished_at = ?, worker_id = NULL, lease_until = NULL"
                   + (", metrics = ?" if metrics is not None else "")
                   + " WHERE id = ? AND state IN ('QUEUED', 'PROCESSING')")
            args: list = [error, now]
            if metrics is not None:
                args.append(json.dumps(metrics))
            args.append(job_id)
            if worker_id is not None:
                sql += " AND state = 'PROCESSING' AND worker_id = ?"
                args.append(worker_id)
            if conn.execute(sql, args).rowcount != 1:
                return False
            if self._billing is not None:
                self._billing.release_in(conn, job_id, error, now)
            _ended(conn, job_id, JobState.FAILED.value, now)
            return True
        done = self._write(tx)
        if done:
            self._notify()
        return done

    def release(self, job_id: str, worker_id: str) -> bool:
        def tx(conn: sqlite3.Connection) -> bool:
            if conn.execute(
                    "UPDATE jobs SET state = 'QUEUED', worker_id = NULL, lease_until = NULL, "
                    "attempts = MAX(attempts - 1, 0), started_at = CASE WHEN attempts <= 1 THEN NULL ELSE started_at END "
                    "WHERE id = ? AND state = 'PROCESSING' AND worker_id = ?", (job_id, worker_id)).rowcount != 1:
                return False
            _event(conn, job_id, "state", {"status": JobState.QUEUED.value}, time.time())
            return True
        done = self._write(tx)
        if done:
            self._notify()
        return done

    def retry_later(self, job_id: str, worker_id: str, reason: str, delay: float) -> bool:
        def tx(conn: sqlite3.Connection) -> bool:
            return conn.execute(
                "UPDATE jobs SET worker_id = NULL, lease_until = ?, retry_reason = ? "
                "WHERE id = ? AND state = 'PROCESSING' AND worker_id = ?",
                (time.time() + max(0.0, delay), reason, job_id, worker_id)).rowcount == 1
        return self._write(tx)

    # --- queue conventions ------------------------------------------------------------------------------------
    def cancel(self, job_id: str) -> Job | None:
        def tx(conn: sqlite3.Connection) -> bool:
            now = time.time()
            if conn.execute(
                    "UPDATE jobs SET state = 'FAILED', error = ?, cancelled = 1, finished_at = ?, worker_id = NULL, "
                    "lease_until = NULL, retry_reason = NULL WHERE id = ? AND state IN ('QUEUED', 'PROCESSING')",
                    (CANCELLED_REASON, now, job_id)).rowcount != 1:
                return False
            if self._billing is not None:
                self._billing.release_in(conn, job_id, CANCELLED_REASON, now)
            _ended(conn, job_id, JobState.FAILED.value, now, cancelled=True)
            return True
        if self._write(tx):
            self._notify()
        return self.get(job_id)

    def queue_position(self, job_id: str) -> int | None:
        """Exact for the claim order (see the module docstring): the job's own earlier jobs, every other owner's
        jobs of earlier rounds, and this round's jobs of the owners served before this job's owner."""
        conn = self._reader()
        conn.execute("BEGIN")           # one snapshot for the three reads
        try:
            row = conn.execute("SELECT owner, created_at, rowid, model FROM jobs WHERE id = ? AND state = 'QUEUED'",
                               (job_id,)).fetchone()
            if row is None:
                return None
            owner, created, rowid, model = row
            (rank,) = conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE state = 'QUEUED' AND model = ? AND owner = ? AND "
                "(created_at < ? OR (created_at = ? AND rowid < ?))",
                (model, owner, created, created, rowid)).fetchone()
            owners = conn.execute(
                "SELECT j.owner, COUNT(*), MIN(j.created_at), COALESCE(MAX(t.turn), 0) FROM jobs j "
                "LEFT JOIN queue_turns t ON t.model = j.model AND t.owner = j.owner "
                "WHERE j.state = 'QUEUED' AND j.model = ? GROUP BY j.owner", (model,)).fetchall()
        finally:
            conn.execute("COMMIT")
        mine = next((turn, head, o) for o, _n, head, turn in owners if o == owner)
        position = rank
        for o, n, head, turn in owners:
            if o != owner:
                position += min(n, rank) + (1 if n > rank and (turn, head, o) < mine else 0)
        return position

    def job_events(self, job_id: str, after: int = 0, limit: int = 1000) -> list[JobEvent]:
        rows = self._reader().execute(
            "SELECT seq, type, data FROM job_events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (job_id, int(after), int(limit))).fetchall()
        return [JobEvent(seq=seq, type=kind, data=json.loads(data)) for seq, kind, data in rows]

    def progress(self, worker_id: str, updates: dict[str, dict]) -> set[str]:
        if not updates:
            return set()

        def tx(conn: sqlite3.Connection) -> set[str]:
            now, held = time.time(), set()
            for job_id, data in updates.items():
                if conn.execute("SELECT 1 FROM jobs WHERE id = ? AND state = 'PROCESSING' AND worker_id = ?",
                                (job_id, worker_id)).fetchone():
                    held.add(job_id)
                    if data:
                        _event(conn, job_id, "progress", data, now)
            return held
        return self._write(tx)

    def append_chunk(self, job_id: str, worker_id: str, seq: int, data: bytes) -> bool:
        seq, data = int(seq), bytes(data)

        def tx(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT claims FROM jobs WHERE id = ? AND state = 'PROCESSING' AND worker_id = ?",
                               (job_id, worker_id)).fetchone()
            if row is None:
                return False
            attempt = row[0]
            (have,) = conn.execute("SELECT COUNT(*) FROM job_chunks WHERE job_id = ? AND attempt = ?",
                                   (job_id, attempt)).fetchone()
            if seq < have:
                (stored,) = conn.execute("SELECT data FROM job_chunks WHERE job_id = ? AND attempt = ? AND seq = ?",
                                         (job_id, attempt, seq)).fetchone()
                if bytes(stored) != data:
                    raise ValueError(f"chunk {seq} of this attempt is already stored with other data")
                return True
            if seq > have:
                raise ValueError(f"chunk {seq} would leave a gap: the next chunk of this attempt is {have}")
            conn.execute("INSERT INTO job_chunks (job_id, attempt, seq, data) VALUES (?, ?, ?, ?)",
                         (job_id, attempt, seq, sqlite3.Binary(data)))
            return True
        return self._write(tx)

    def read_chunks(self, job_id: str, after: int = -1, attempt: int | None = None,
                    limit: int = 100) -> ChunkRead | None:
        limit = max(1, int(limit))
        conn = self._reader()
        conn.execute("BEGIN")           # one snapshot: the state and the chunks
        try:
            row = conn.execute("SELECT state, claims, worker_id, finished_at FROM jobs WHERE id = ?",
                               (job_id,)).fetchone()
            if row is None:
                return None
            state, claims, worker_id, finished = JobState(row[0]), row[1], row[2], row[3]
            if finished is not None and finished < time.time() - self.retention_seconds:
                return None
            over = (state == JobState.QUEUED and claims > 0) or (state == JobState.PROCESSING and not worker_id)
            if attempt is not None and (attempt != claims or over):
                return ChunkRead(state=state, attempt=claims, chunks=[], restarted=True)
            if over:                    # what is left of an attempt that is over is nobody's to read
                return ChunkRead(state=state, attempt=claims, chunks=[])
            rows = conn.execute("SELECT seq, data FROM job_chunks WHERE job_id = ? AND attempt = ? AND seq > ? "
                                "ORDER BY seq LIMIT ?", (job_id, claims, int(after), limit + 1)).fetchall()
        finally:
            conn.execute("COMMIT")
        chunks = [AudioChunk(seq=seq, data=bytes(data)) for seq, data in rows[:limit]]
        return ChunkRead(state=state, attempt=claims, chunks=chunks, end=state.terminal and len(rows) <= limit)

    def claim_idempotency_key(self, owner: str, key: str, fingerprint: str, job_id: str, ttl: float,
                              stale_after: float = 30.0) -> IdempotencyRecord | None:
        def tx(conn: sqlite3.Connection) -> IdempotencyRecord | None:
            now = time.time()
            row = conn.execute("SELECT job_id, fingerprint, created_at, expires_at FROM idempotency_keys "
                               "WHERE owner = ? AND key = ?", (owner, key)).fetchone()
            if row is not None and row[3] > now:
                known = conn.execute("SELECT 1 FROM jobs WHERE id = ?", (row[0],)).fetchone()
                if known or now - row[2] < stale_after:
                    return IdempotencyRecord(job_id=row[0], fingerprint=row[1], created_at=row[2])
            conn.execute("INSERT OR REPLACE INTO idempotency_keys (owner, key, fingerprint, job_id, created_at, "
                         "expires_at) VALUES (?, ?, ?, ?, ?, ?)", (owner, key, fingerprint, job_id, now, now + ttl))
            return None
        return self._write(tx)

    def release_idempotency_key(self, owner: str, key: str, job_id: str) -> None:
        self._write(lambda conn: conn.execute(
            "DELETE FROM idempotency_keys WHERE owner = ? AND key = ? AND job_id = ?", (owner, key, job_id)))

    def claim_webhooks(self, claimer: str, limit: int, lease_seconds: float,
                       max_attempts: int) -> list[WebhookDelivery]:
        if limit <= 0:
            return []
        if not self._reader().execute("SELECT 1 FROM webhook_deliveries WHERE hook_state = 'pending' AND "
                                      "hook_due <= ? LIMIT 1", (time.time(),)).fetchone():
            return []                   # the usual answer of a poll, without taking the writer

        def tx(conn: sqlite3.Connection) -> list[WebhookDelivery]:
            now, out = time.time(), []
            for job_id, attempts in conn.execute(
                    "SELECT job_id, hook_attempts FROM webhook_deliveries WHERE hook_state = 'pending' "
                    "AND hook_due <= ? ORDER BY hook_due LIMIT ?", (now, limit)).fetchall():
                if attempts >= max_attempts:        # its last claimer died before reporting
                    conn.execute("UPDATE webhook_deliveries SET hook_state = 'failed', hook_claimer = NULL, "
                                 "hook_due = NULL, hook_error = COALESCE(hook_error, ?) WHERE job_id = ?",
                                 (LOST_ATTEMPT, job_id))
                    continue
                conn.execute("UPDATE webhook_deliveries SET hook_attempts = ?, hook_claimer = ?, hook_due = ? "
                             "WHERE job_id = ?", (attempts + 1, claimer, now + lease_seconds, job_id))
                out.append(WebhookDelivery(job_id=job_id, attempt=attempts + 1))
            return out
        return self._write(tx)

    def finish_webhook(self, job_id: str, claimer: str, attempt: int, outcome: str, status: int | None = None,
                       error: str | None = None, retry_in: float = 0.0) -> bool:
        state = {"delivered": "delivered", "failed": "failed", "retry": "pending"}[outcome]

        def tx(conn: sqlite3.Connection) -> bool:
            due = time.time() + max(0.0, retry_in) if state == "pending" else None
            return conn.execute(
                "UPDATE webhook_deliveries SET hook_state = ?, hook_status = ?, hook_error = ?, hook_claimer = NULL, "
                "hook_due = ? WHERE job_id = ? AND hook_state = 'pending' AND hook_claimer = ? AND hook_attempts = ?",
                (state, status, error, due, job_id, claimer, int(attempt))).rowcount == 1
        return self._write(tx)

    def writable(self) -> str | None:
        def probe(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO store_probe (id, at) VALUES (1, ?) ON CONFLICT(id) DO UPDATE SET at = excluded.at",
                         (time.time(),))
        try:
            self._write(probe)
        except (StoreUnavailable, sqlite3.Error) as e:
            cause = e.__cause__ if isinstance(e.__cause__, sqlite3.Error) else None
            return "the job database cannot be written" + (f" ({cause})" if cause is not None else "")
        problem = probe_directory(self.audio_dir)
        return None if problem is None else f"audio files cannot be written ({problem})"

    # --- maintenance ------------------------------------------------------------------------------------------
    def recover_expired(self, max_attempts: int) -> int:
        def tx(conn: sqlite3.Connection) -> int:
            now = time.time()
            giving_up = conn.execute(
                "SELECT id, COALESCE(retry_reason, 'the job was interrupted ' || attempts || "
                "' times (its worker stopped); giving up') FROM jobs "
                "WHERE state = 'PROCESSING' AND lease_until < ? AND attempts >= ?", (now, max_attempts)).fetchall()
            for job_id, reason in giving_up:
                conn.execute("UPDATE jobs SET state = 'FAILED', finished_at = ?, worker_id = NULL, lease_until = NULL, "
                             "error = ? WHERE id = ?", (now, reason, job_id))
                if self._billing is not None:
                    self._billing.release_in(conn, job_id, reason, now)
                _ended(conn, job_id, JobState.FAILED.value, now)
            requeued = [r[0] for r in conn.execute(
                "SELECT id FROM jobs WHERE state = 'PROCESSING' AND lease_until < ?", (now,))]
            conn.execute("UPDATE jobs SET state = 'QUEUED', worker_id = NULL, lease_until = NULL "
                         "WHERE state = 'PROCESSING' AND lease_until < ?", (now,))
            for job_id in requeued:
                _event(conn, job_id, "state", {"status": JobState.QUEUED.value}, now)
            return len(giving_up) + len(requeued)
        n = self._write(tx)
        if n:
            self._notify()
        return n

    def purge_expired(self, retention_seconds: float) -> int:
        now = time.time()
        cutoff = now - retention_seconds

        def tx(conn: sqlite3.Connection) -> list[str | None]:
            files = [r[0] for r in conn.execute("SELECT audio_file FROM jobs WHERE finished_at < ?", (cutoff,))]
            for table in ("job_events", "webhook_deliveries", "job_chunks"):
                conn.execute(f"DELETE FROM {table} WHERE job_id IN (SELECT id FROM jobs WHERE finished_at < ?)",
                             (cutoff,))
            conn.execute("DELETE FROM jobs WHERE finished_at < ?", (cutoff,))
            conn.execute("DELETE FROM idempotency_keys WHERE expires_at < ?", (now,))
            conn.execute("DELETE FROM workers WHERE seen < ?", (now - 24 * 3600,))
            conn.execute("DELETE FROM queue_turns WHERE NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.owner = "
                         "queue_turns.owner AND jobs.model = queue_turns.model)")
            return files
        files = self._write(tx)
        for name in files:
            if name:
                try:
                    (self.audio_dir / name).unlink(missing_ok=True)
                except OSError:     # the disk refuses now: an orphan, removed by a later sweep
                    pass
        self._remove_orphan_audio(now)
        return len(files)

    def _remove_orphan_audio(self, now: float) -> None:
        """Audio files no job refers to: left by a crash between writing the file and committing the job."""
        try:
            entries = list(os.scandir(self.audio_dir))
        except OSError:
            return
        old = [e for e in entries if e.is_file() and e.stat().st_mtime < now - ORPHAN_AUDIO_SECONDS]
        if not old:
            return
        known = {r[0] for r in self._reader().execute("SELECT audio_file FROM jobs WHERE audio_file IS NOT NULL")}
        for e in old:
            if e.name not in known:
                try:
                    Path(e.path).unlink(missing_ok=True)
                except OSError:
                    pass

    def close(self) -> None:
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            self._writer.close()
        with self._readers_lock:
            for conn in self._readers:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._readers.clear()
