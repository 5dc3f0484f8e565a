"""SQLite voice store: tables of its own in the job store's database file (WAL). Writes are `BEGIN IMMEDIATE`
transactions (the count limit and the name check cannot race another process's creation)."""
from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from ..accounts.sqlite_store import immediate_transaction
from ..jobs.store import StoreUnavailable
from .store import DuplicateVoiceName, Voice, VoiceLimitReached, VoiceStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS voices (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at REAL NOT NULL,
    audio BLOB NOT NULL,
    audio_bytes INTEGER NOT NULL,
    seconds REAL NOT NULL,
    sample_rate INTEGER NOT NULL,
    format TEXT NOT NULL,
    UNIQUE (owner, name)
);
CREATE INDEX IF NOT EXISTS voices_owner ON voices(owner, created_at);
CREATE TABLE IF NOT EXISTS voice_conditionals (
    voice_id TEXT NOT NULL,
    variant TEXT NOT NULL,
    data BLOB NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (voice_id, variant)
);
"""
_COLUMNS = "id, owner, name, created_at, audio_bytes, seconds, sample_rate, format"


def _voice(row: tuple | None) -> Voice | None:
    if row is None:
        return None
    return Voice(id=row[0], owner=row[1], name=row[2], created_at=float(row[3]), audio_bytes=int(row[4]),
                 seconds=float(row[5]), sample_rate=int(row[6]), format=row[7])


class SQLiteVoiceStore(VoiceStore):
    def __init__(self, path: str | Path, busy_timeout: float = 10.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), timeout=busy_timeout, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._tx() as db:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

    def _tx(self):
        return immediate_transaction(self._db, self._lock, "voice")

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.OperationalError as e:
                raise StoreUnavailable(f"the voice database is unavailable: {e}") from e

    def create(self, voice: Voice, audio: bytes, *, max_per_owner: int,
               conditionals: dict[str, bytes] | None = None) -> Voice:
        with self._tx() as db:
            (n,) = db.execute("SELECT COUNT(*) FROM voices WHERE owner = ?", (voice.owner,)).fetchone()
            if n >= max_per_owner:
                raise VoiceLimitReached(f"this key has {n} voices, the most this server keeps per key "
                                        f"({max_per_owner}); delete one first")
            if db.execute("SELECT 1 FROM voices WHERE owner = ? AND name = ?", (voice.owner, voice.name)).fetchone():
                raise DuplicateVoiceName(f"this key already has a voice named {voice.name!r}")
            db.execute(f"INSERT INTO voices ({_COLUMNS}, audio) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (voice.id, voice.owner, voice.name, voice.created_at, voice.audio_bytes, voice.seconds,
                        voice.sample_rate, voice.format, sqlite3.Binary(audio)))
            for variant, data in (conditionals or {}).items():
                db.execute("INSERT INTO voice_conditionals VALUES (?, ?, ?, ?)",
                           (voice.id, variant, sqlite3.Binary(data), time.time()))
        return voice

    def get(self, voice_id: str) -> Voice | None:
        rows = self._read(f"SELECT {_COLUMNS} FROM voices WHERE id = ?", (voice_id,))
        return _voice(rows[0] if rows else None)

    def get_by_name(self, owner: str, name: str) -> Voice | None:
        rows = self._read(f"SELECT {_COLUMNS} FROM voices WHERE owner = ? AND name = ?", (owner, name))
        return _voice(rows[0] if rows else None)

    def list(self, owner: str) -> list[Voice]:
        rows = self._read(f"SELECT {_COLUMNS} FROM voices WHERE owner = ? ORDER BY created_at, id", (owner,))
        return [_voice(r) for r in rows]

    def count(self, owner: str) -> int:
        return int(self._read("SELECT COUNT(*) FROM voices WHERE owner = ?", (owner,))[0][0])

    def delete(self, owner: str, voice_id: str) -> bool:
        with self._tx() as db:
            gone = db.execute("DELETE FROM voices WHERE id = ? AND owner = ?", (voice_id, owner)).rowcount
            if gone:
                db.execute("DELETE FROM voice_conditionals WHERE voice_id = ?", (voice_id,))
        return bool(gone)

    def audio(self, voice_id: str) -> bytes | None:
        rows = self._read("SELECT audio FROM voices WHERE id = ?", (voice_id,))
        return bytes(rows[0][0]) if rows else None

    def conditionals(self, voice_id: str, variant: str) -> bytes | None:
        rows = self._read("SELECT data FROM voice_conditionals WHERE voice_id = ? AND variant = ?",
                          (voice_id, variant))
        return bytes(rows[0][0]) if rows else None

    def put_conditionals(self, voice_id: str, variant: str, data: bytes) -> bool:
        with self._tx() as db:
            if not db.execute("SELECT 1 FROM voices WHERE id = ?", (voice_id,)).fetchone():
                return False
            db.execute("INSERT OR IGNORE INTO voice_conditionals VALUES (?, ?, ?, ?)",
                       (voice_id, variant, sqlite3.Binary(data), time.time()))
        return True

    def close(self) -> None:
        with self._lock:
            self._db.close()
