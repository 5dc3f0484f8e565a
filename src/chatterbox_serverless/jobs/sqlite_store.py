"""The embedded job store: one SQLite database (WAL) in the data dir, audio files beside it.

Durability: every state change is one transaction (`synchronous=FULL` by default: an accepted job survives a
crash of the process and of the machine). Audio is written atomically (tmp file, fsync, rename, fsync of the
directory) before the job is marked COMPLETED, under a name unique to the writing attempt, so a worker that lost
its lease never overwrites nor deletes the winner's file.

Threads: one writer connection behind a lock; each reading thread has its own connection (WAL readers never wait
for the writer), so status polls stay fast while jobs are being written.

Fairness: `claim` serves owners round-robin (the owner served least recently first, `owner_turns`), oldest job
first within one owner.

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

from .files import write_atomically
from .store import Job, JobState, JobStore, QueueFull, StoreStats, StoreUnavailable, probe_directory

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
CREATE TABLE IF NOT EXISTS owner_turns (owner TEXT PRIMARY KEY, turn INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS workers (id TEXT PRIMARY KEY, info TEXT NOT NULL, seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS store_probe (id INTEGER PRIMARY KEY CHECK (id = 1), at REAL NOT NULL);
"""
# columns added after the first release, added at open when missing: (column, declaration)
_JOB_MIGRATIONS = (("retry_reason", "TEXT"),)   # why the job was handed back by `retry_later` (its FAILED
                                                # reason if it runs out of attempts); cleared at the next claim

_COLUMNS = ("id, owner, params, state, created_at, started_at, finished_at, attempts, error, metrics, "
            "media_type, worker_id, lease_until")

_EXTENSIONS = {"audio/mpeg": "mp3", "audio/wav": "wav", "audio/x-wav": "wav", "audio/flac": "flac",
               "audio/ogg": "ogg"}


def _row_to_job(row: tuple) -> Job:
    (id_, owner, params, state, created, started, finished, attempts, error, metrics, media_type, worker_id,
     lease_until) = row
    return Job(id=id_, owner=owner, params=json.loads(params), state=JobState(state), created_at=created,
               started_at=started, finished_at=finished, attempts=attempts, error=error,
               metrics=json.loads(metrics) if metrics else {}, media_type=media_type, worker_id=worker_id,
               lease_until=lease_until)


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
    def submit(self, job: Job, max_queued: int) -> None:
        """Group commit: concurrent submissions that queue up behind the writer lock are inserted by whichever
        thread gets it first, in one transaction (one fsync for all); each returns once its row is committed."""
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
            (queued,) = conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'QUEUED'").fetchone()
            for e in group:
                if queued >= e.max_queued:
                    e.error = QueueFull(f"{queued} jobs are waiting (the limit is {e.max_queued})")
                    continue
                j = e.job
                try:
                    conn.execute("INSERT INTO jobs (id, owner, params, state, created_at, attempts, metrics) "
                                 "VALUES (?,?,?,?,?,?,?)",
                                 (j.id, j.owner, json.dumps(j.params), JobState.QUEUED.value, j.created_at, 0,
                                  json.dumps(j.metrics or {})))
                except sqlite3.IntegrityError as ie:     # a duplicate id fails alone
                    e.error = ie
                    continue
                queued += 1

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
        row = self._reader().execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
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
        return StoreStats(by_state=by_state, oldest_queued_age=max(0.0, now - oldest) if oldest else 0.0,
                          workers=workers)

    # --- worker side ------------------------------------------------------------------------------------------
    def claim(self, worker_id: str, limit: int, lease_seconds: float) -> list[Job]:
        if limit <= 0:
            return []

        def tx(conn: sqlite3.Connection) -> list[Job]:
            now = time.time()
            picked = conn.execute(
                """WITH ranked AS (
                       SELECT id, owner, created_at,
                              ROW_NUMBER() OVER (PARTITION BY owner ORDER BY created_at, rowid) AS rn
                       FROM jobs WHERE state = 'QUEUED')
                   SELECT r.id, r.owner FROM ranked r LEFT JOIN owner_turns t ON t.owner = r.owner
                   WHERE r.rn <= ? ORDER BY r.rn, COALESCE(t.turn, 0), r.created_at LIMIT ?""",
                (limit, limit)).fetchall()
            if not picked:
                return []
            (turn,) = conn.execute("SELECT COALESCE(MAX(turn), 0) FROM owner_turns").fetchone()
            for job_id, owner in picked:
                turn += 1
                conn.execute("INSERT INTO owner_turns (owner, turn) VALUES (?, ?) "
                             "ON CONFLICT(owner) DO UPDATE SET turn = excluded.turn", (owner, turn))
                conn.execute(
                    "UPDATE jobs SET state = 'PROCESSING', worker_id = ?, lease_until = ?, attempts = attempts + 1, "
                    "started_at = COALESCE(started_at, ?), retry_reason = NULL WHERE id = ?",
                    (worker_id, now + lease_seconds, now, job_id))
            marks = ",".join("?" * len(picked))
            rows = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id IN ({marks})", [p[0] for p in picked])
            jobs = {r[0]: _row_to_job(r) for r in rows}
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
            return True
        done = self._write(tx)
        if done:
            self._notify()
        return done

    def release(self, job_id: str, worker_id: str) -> bool:
        def tx(conn: sqlite3.Connection) -> bool:
            return conn.execute(
                "UPDATE jobs SET state = 'QUEUED', worker_id = NULL, lease_until = NULL, "
                "attempts = MAX(attempts - 1, 0), started_at = CASE WHEN attempts <= 1 THEN NULL ELSE started_at END "
                "WHERE id = ? AND state = 'PROCESSING' AND worker_id = ?", (job_id, worker_id)).rowcount == 1
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
            requeued = conn.execute(
                "UPDATE jobs SET state = 'QUEUED', worker_id = NULL, lease_until = NULL "
                "WHERE state = 'PROCESSING' AND lease_until < ?", (now,)).rowcount
            return len(giving_up) + requeued
        n = self._write(tx)
        if n:
            self._notify()
        return n

    def purge_expired(self, retention_seconds: float) -> int:
        now = time.time()
        cutoff = now - retention_seconds

        def tx(conn: sqlite3.Connection) -> list[str | None]:
            files = [r[0] for r in conn.execute("SELECT audio_file FROM jobs WHERE finished_at < ?", (cutoff,))]
            conn.execute("DELETE FROM jobs WHERE finished_at < ?", (cutoff,))
            conn.execute("DELETE FROM workers WHERE seen < ?", (now - 24 * 3600,))
            conn.execute("DELETE FROM owner_turns WHERE owner NOT IN (SELECT owner FROM jobs)")
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
