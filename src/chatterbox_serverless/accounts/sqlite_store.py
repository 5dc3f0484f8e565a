"""SQLite account store: tables of its own in the job store's database file (`<data-dir>/jobs.sqlite3`), WAL.

Every write is one `BEGIN IMMEDIATE` transaction: SQLite takes the database write lock at BEGIN, so a read,
its check and its write cannot interleave with another connection's (another thread, the `keys` command, a
worker process). That is what makes holds race-free: two submissions for the last credits are serialised
and the second sees the first's hold.

Billing with the job's transition: `settle_in(db, ...)` / `release_in(db, ...)` run the same hold-closing SQL on
a connection the caller is already in a write transaction on: the SQLite job store calls them on its own
connection inside the transaction that marks a job COMPLETED or FAILED (`SQLiteJobStore.attach_billing`), so a
reader never sees a COMPLETED job whose hold is still open.

Migration: databases made before prices were recorded get the `account_holds.per_second`/`minimum` columns
added at open (NULL for the holds already there: `settle_job` charges those their hold).
"""
from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

from ..jobs.store import StoreUnavailable
from .store import (check_hold, UNKNOWN_LENGTH_NOTE, UNPRICED_NOTE, Account, AccountStore, DuplicateHold, Hold,
                    InsufficientCredits, LedgerEntry, UnknownAccount, Usage, audio_seconds_of, charge_for,
                    new_webhook_secret)

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    key_prefix TEXT NOT NULL,
    admin INTEGER NOT NULL DEFAULT 0,
    revoked INTEGER NOT NULL DEFAULT 0,
    rate_per_min INTEGER NOT NULL,
    balance INTEGER NOT NULL CHECK (balance >= 0),
    held INTEGER NOT NULL DEFAULT 0 CHECK (held >= 0 AND held <= balance),
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS account_holds (
    job_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    amount INTEGER NOT NULL CHECK (amount >= 0),
    created_at REAL NOT NULL,
    per_second REAL,
    minimum INTEGER
);
CREATE INDEX IF NOT EXISTS account_holds_created ON account_holds(created_at);
CREATE TABLE IF NOT EXISTS account_ledger (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id TEXT NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    delta INTEGER NOT NULL,
    hold_delta INTEGER NOT NULL,
    balance_after INTEGER NOT NULL,
    held_after INTEGER NOT NULL,
    job_id TEXT,
    seconds REAL,
    note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS account_ledger_account ON account_ledger(account_id, id);
CREATE TABLE IF NOT EXISTS account_buckets (
    account_id TEXT PRIMARY KEY,
    tokens REAL NOT NULL,
    updated REAL NOT NULL
);
"""

_ACCOUNT_COLUMNS = "id, name, key_hash, key_prefix, admin, revoked, rate_per_min, balance, held, created_at"
_HOLD_COLUMNS = "job_id, account_id, amount, created_at, per_second, minimum"
# columns added after the first release: (table, column, declaration), added at open when missing
_MIGRATIONS = (("account_holds", "per_second", "REAL"), ("account_holds", "minimum", "INTEGER"),
               ("accounts", "webhook_secret", "TEXT"))


def _account(row: tuple | None) -> Account | None:
    if row is None:
        return None
    id_, name, key_hash, key_prefix, admin, revoked, rate, balance, held, created_at = row
    return Account(id=id_, name=name, key_hash=key_hash, key_prefix=key_prefix, admin=bool(admin),
                   revoked=bool(revoked), rate_per_min=rate, balance=balance, held=held, created_at=created_at)


@contextmanager
def immediate_transaction(db: sqlite3.Connection, lock, what: str) -> Iterator[sqlite3.Connection]:
    """One BEGIN IMMEDIATE transaction on `db` under `lock`: committed, or rolled back on any error; a locked or
    unwritable database is StoreUnavailable naming `what` ("account", "voice") database."""
    with lock:
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:     # locked beyond busy_timeout, disk I/O error, ...
            raise StoreUnavailable(f"the {what} database is unavailable: {e}") from e
        try:
            yield db
            db.execute("COMMIT")
        except BaseException as e:
            with suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            if isinstance(e, sqlite3.OperationalError):   # e.g. a full disk: nothing was written
                raise StoreUnavailable(f"the {what} database could not be written: {e}") from e
            raise


class SQLiteAccountStore(AccountStore):
    def __init__(self, path: str | Path, busy_timeout: float = 10.0):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._busy_timeout = busy_timeout
        # Writes: one connection shared by this process's threads, serialised by a lock (isolation_level=None
        # lets us issue BEGIN IMMEDIATE ourselves). Reads (authentication on every request): one connection per
        # thread, so they never queue behind a write (WAL readers do not wait for the writer).
        self._lock = threading.RLock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._db = self._connect()
        with self._tx() as db:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            for table, column, decl in _MIGRATIONS:
                if column not in {r[1] for r in db.execute(f"PRAGMA table_info({table})")}:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), timeout=self._busy_timeout, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL under WAL: a commit survives a crash of the process (SIGKILL); only an OS crash or a power loss
        # can lose the last commits.
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    # --- plumbing -------------------------------------------------------------------------------------------
    def _tx(self):
        return immediate_transaction(self._db, self._lock, "account")

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        db = getattr(self._local, "db", None)
        try:
            if db is None:
                db = self._local.db = self._connect()
                with self._lock:
                    self._readers.append(db)
            return db.execute(sql, args).fetchall()
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"the account database is unavailable: {e}") from e

    @staticmethod
    def _get(db: sqlite3.Connection, account_id: str) -> Account:
        acc = _account(db.execute(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE id = ?", (account_id,)).fetchone())
        if acc is None:
            raise UnknownAccount(account_id)
        return acc

    @staticmethod
    def _apply(db: sqlite3.Connection, acc: Account, kind: str, delta: int, hold_delta: int, job_id: str | None = None,
               seconds: float | None = None, note: str = "", now: float | None = None) -> Account:
        """Change an account's balance/held and write the ledger entry explaining it (inside a transaction)."""
        acc.balance += delta
        acc.held += hold_delta
        db.execute("UPDATE accounts SET balance = ?, held = ? WHERE id = ?", (acc.balance, acc.held, acc.id))
        db.execute("INSERT INTO account_ledger (account_id, at, kind, delta, hold_delta, balance_after, held_after, "
                   "job_id, seconds, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (acc.id, time.time() if now is None else now, kind, delta, hold_delta, acc.balance, acc.held,
                    job_id, seconds, note))
        return acc

    # --- keys -----------------------------------------------------------------------------------------------
    def create(self, account: Account) -> Account:
        if account.held != 0 or account.balance < 0:
            raise ValueError("a new account starts with held = 0 and balance >= 0")
        initial = account.balance
        with self._tx() as db:
            db.execute(f"INSERT INTO accounts ({_ACCOUNT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (account.id, account.name, account.key_hash, account.key_prefix, int(account.admin),
                        int(account.revoked), account.rate_per_min, 0, 0, account.created_at))
            acc = self._get(db, account.id)
            if initial > 0:
                acc = self._apply(db, acc, "grant", initial, 0, note="initial credits")
        return acc

    def get(self, account_id: str) -> Account | None:
        rows = self._read(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE id = ?", (account_id,))
        return _account(rows[0]) if rows else None

    def get_by_key_hash(self, key_hash: str) -> Account | None:
        rows = self._read(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE key_hash = ?", (key_hash,))
        return _account(rows[0]) if rows else None

    def list(self) -> list[Account]:
        return [_account(r) for r in self._read(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts ORDER BY created_at, id")]

    def count(self) -> int:
        return self._read("SELECT COUNT(*) FROM accounts")[0][0]

    def set_revoked(self, account_id: str, revoked: bool = True) -> Account:
        with self._tx() as db:
            acc = self._get(db, account_id)
            db.execute("UPDATE accounts SET revoked = ? WHERE id = ?", (int(revoked), account_id))
            acc.revoked = revoked
        return acc

    def update_limits(self, account_id: str, *, rate_per_min: int | None = None, admin: bool | None = None,
                      name: str | None = None) -> Account:
        with self._tx() as db:
            acc = self._get(db, account_id)
            if rate_per_min is not None:
                acc.rate_per_min = rate_per_min
            if admin is not None:
                acc.admin = admin
            if name is not None:
                acc.name = name
            db.execute("UPDATE accounts SET rate_per_min = ?, admin = ?, name = ? WHERE id = ?",
                       (acc.rate_per_min, int(acc.admin), acc.name, account_id))
        return acc

    # --- credits --------------------------------------------------------------------------------------------
    def adjust(self, account_id: str, delta: int, note: str = "") -> Account:
        with self._tx() as db:
            acc = self._get(db, account_id)
            if delta < 0 and acc.available + delta < 0:
                raise InsufficientCredits(-delta, acc.available)
            return self._apply(db, acc, "grant" if delta >= 0 else "adjust", delta, 0, note=note)

    def hold(self, account_id: str, job_id: str, amount: int, now: float | None = None, *,
             per_second: float | None = None, minimum: int | None = None) -> Account:
        check_hold(amount, per_second, minimum)
        now = time.time() if now is None else now
        with self._tx() as db:
            acc = self._get(db, account_id)
            if db.execute("SELECT 1 FROM account_holds WHERE job_id = ?", (job_id,)).fetchone():
                raise DuplicateHold(job_id)
            if acc.available < amount:
                raise InsufficientCredits(amount, acc.available)
            db.execute(f"INSERT INTO account_holds ({_HOLD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                       (job_id, account_id, amount, now, None if per_second is None else float(per_second),
                        None if minimum is None else int(minimum)))
            return self._apply(db, acc, "hold", 0, amount, job_id=job_id, now=now)

    @classmethod
    def close_in(cls, db: sqlite3.Connection, job_id: str, mode: str, *, cost: int | None = None,
                 seconds: float | None = None, note: str = "", now: float | None = None) -> Account | None:
        """Close the hold of `job_id` on `db`, which the caller holds in a write transaction. `mode`: "settle"
        (charge `cost`, or, when None, `seconds` at the hold's recorded price), "release" or "cancel" (no
        charge). None when the job holds nothing."""
        row = db.execute("SELECT account_id, amount, per_second, minimum FROM account_holds WHERE job_id = ?",
                         (job_id,)).fetchone()
        if row is None:
            return None
        account_id, amount, per_second, minimum = row
        db.execute("DELETE FROM account_holds WHERE job_id = ?", (job_id,))
        acc = _account(db.execute(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE id = ?", (account_id,)).fetchone())
        if acc is None:     # cannot happen (accounts are never deleted); never block the job's transition on it
            return None
        if mode in ("release", "cancel"):
            return cls._apply(db, acc, mode, 0, -amount, job_id=job_id, note=note, now=now)
        if mode != "settle":
            raise ValueError(f"unknown mode {mode!r}")
        if cost is None:
            if seconds is None or per_second is None or minimum is None:
                cost = amount
                note = note or (UNKNOWN_LENGTH_NOTE if seconds is None else UNPRICED_NOTE)
            else:
                cost = charge_for(seconds, per_second, minimum)
        payable = acc.available + amount          # what it can pay without eating its other holds
        charged = max(0, min(cost, payable))
        if charged < cost:
            note = (note + "; " if note else "") + f"cost {cost} capped at the {charged} available"
        return cls._apply(db, acc, "settle", -charged, -amount, job_id=job_id, seconds=seconds, note=note, now=now)

    # The job store's billing hooks (`SQLiteJobStore.attach_billing`): called on ITS connection, inside ITS
    # transaction, with the job's terminal transition.
    def settle_in(self, db: sqlite3.Connection, job_id: str, metrics: dict | None,
                  now: float | None = None) -> Account | None:
        """Charge a job that is being marked COMPLETED: its metrics' `audio_seconds` at the hold's price."""
        return self.close_in(db, job_id, "settle", seconds=audio_seconds_of(metrics), now=now)

    def release_in(self, db: sqlite3.Connection, job_id: str, note: str = "",
                   now: float | None = None) -> Account | None:
        """Give back the hold of a job that is being marked FAILED."""
        return self.close_in(db, job_id, "release", note=note[:200], now=now)

    def _close_hold(self, job_id: str, mode: str, **kw) -> Account | None:
        with self._tx() as db:
            return self.close_in(db, job_id, mode, **kw)

    def settle(self, job_id: str, cost: int, seconds: float | None = None, note: str = "") -> Account | None:
        return self._close_hold(job_id, "settle", cost=int(cost), seconds=seconds, note=note)

    def settle_job(self, job_id: str, audio_seconds: float | None, note: str = "") -> Account | None:
        return self._close_hold(job_id, "settle", seconds=audio_seconds, note=note)

    def release(self, job_id: str, note: str = "") -> Account | None:
        return self._close_hold(job_id, "release", note=note)

    def cancel(self, job_id: str, note: str = "") -> Account | None:
        return self._close_hold(job_id, "cancel", note=note)

    def holds(self, older_than: float | None = None) -> list[Hold]:
        sql = f"SELECT {_HOLD_COLUMNS} FROM account_holds"
        args: tuple = ()
        if older_than is not None:
            sql += " WHERE created_at < ?"
            args = (older_than,)
        return [Hold(*r) for r in self._read(sql + " ORDER BY created_at", args)]

    def get_hold(self, job_id: str) -> Hold | None:
        rows = self._read(f"SELECT {_HOLD_COLUMNS} FROM account_holds WHERE job_id = ?", (job_id,))
        return Hold(*rows[0]) if rows else None

    # --- webhook secrets ------------------------------------------------------------------------------------
    def webhook_secret(self, account_id: str) -> str:
        rows = self._read("SELECT webhook_secret FROM accounts WHERE id = ?", (account_id,))
        if not rows:
            raise UnknownAccount(account_id)
        if rows[0][0]:
            return rows[0][0]
        with self._tx() as db:
            self._get(db, account_id)
            db.execute("UPDATE accounts SET webhook_secret = ? WHERE id = ? AND webhook_secret IS NULL",
                       (new_webhook_secret(), account_id))
            return db.execute("SELECT webhook_secret FROM accounts WHERE id = ?", (account_id,)).fetchone()[0]

    def rotate_webhook_secret(self, account_id: str) -> str:
        secret = new_webhook_secret()
        with self._tx() as db:
            self._get(db, account_id)
            db.execute("UPDATE accounts SET webhook_secret = ? WHERE id = ?", (secret, account_id))
        return secret

    # --- reporting ------------------------------------------------------------------------------------------
    def ledger(self, account_id: str, limit: int = 100) -> list[LedgerEntry]:
        sql = ("SELECT id, account_id, at, kind, delta, hold_delta, balance_after, held_after, job_id, seconds, note "
               "FROM account_ledger WHERE account_id = ? ORDER BY id DESC")
        args: tuple = (account_id,)
        if limit > 0:
            sql += " LIMIT ?"
            args += (limit,)
        return [LedgerEntry(*r) for r in reversed(self._read(sql, args))]

    def usage(self, account_id: str, since: float | None = None) -> Usage:
        since = 0.0 if since is None else since
        rows = self._read("SELECT kind, COUNT(*), COALESCE(SUM(seconds), 0), COALESCE(SUM(delta), 0) "
                          "FROM account_ledger WHERE account_id = ? AND at >= ? AND kind IN ('settle', 'release') "
                          "GROUP BY kind", (account_id, since))
        u = Usage()
        for kind, n, seconds, delta in rows:
            if kind == "settle":
                u.completed, u.audio_seconds, u.credits_spent = n, float(seconds), -int(delta)
            else:
                u.failed = n
        u.open_holds = self._read("SELECT COUNT(*) FROM account_holds WHERE account_id = ?", (account_id,))[0][0]
        return u

    # --- rate limiting --------------------------------------------------------------------------------------
    def take_token(self, account_id: str, rate_per_min: int, now: float | None = None) -> float:
        if rate_per_min <= 0:
            return 0.0
        now = time.time() if now is None else now
        capacity, per_second = float(rate_per_min), rate_per_min / 60.0
        with self._tx() as db:
            row = db.execute("SELECT tokens, updated FROM account_buckets WHERE account_id = ?",
                             (account_id,)).fetchone()
            if row is None:
                tokens = capacity
            else:
                tokens = min(capacity, row[0] + max(0.0, now - row[1]) * per_second)
            if tokens >= 1.0:
                tokens -= 1.0
                wait = 0.0
            else:
                wait = (1.0 - tokens) / per_second
            db.execute("INSERT INTO account_buckets (account_id, tokens, updated) VALUES (?, ?, ?) "
                       "ON CONFLICT(account_id) DO UPDATE SET tokens = excluded.tokens, updated = excluded.updated",
                       (account_id, tokens, now))
        return wait

    def close(self) -> None:
        with self._lock:
            for db in self._readers:
                db.close()
            self._readers.clear()
            self._db.close()
