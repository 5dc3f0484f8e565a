"""Accounts: API keys (stored hashed), credits (hold at submit, settle at completion, release on failure, with
a ledger), per-key submission rate limits. The store sits behind `AccountStore` (accounts/store.py): SQLite in
the job store's database file, Redis later.

Cheap to import: no FastAPI, no torch."""
from __future__ import annotations

from pathlib import Path

from .store import AccountStore

DB_FILENAME = "jobs.sqlite3"    # the SQLite job store's file (api/serve.py): one database per data dir


def open_account_store(data_dir: str | Path | None = None, url: str | None = None) -> AccountStore:
    """The account store for a data dir (SQLite, `<data-dir>/jobs.sqlite3`) or a store URL
    (`sqlite:///path/to/file.db`, `redis://...`)."""
    if url:
        if url.startswith("sqlite:///"):
            from .sqlite_store import SQLiteAccountStore
            return SQLiteAccountStore(url[len("sqlite:///"):])   # sqlite:///rel.db, sqlite:////abs/path.db
        if url.startswith(("redis://", "rediss://", "unix://")):
            try:
                from .redis_store import RedisAccountStore  # type: ignore[import-not-found]
            except ModuleNotFoundError as e:
                if e.name != f"{__name__}.redis_store":
                    raise
                raise ValueError("the Redis account store is not available in this version; use --data-dir") from None
            return RedisAccountStore(url)
        raise ValueError(f"unsupported store URL {url!r}: use sqlite:///PATH or redis://HOST:PORT/DB")
    if data_dir is None:
        raise ValueError("give a data dir or a store URL")
    from .sqlite_store import SQLiteAccountStore
    return SQLiteAccountStore(Path(data_dir) / DB_FILENAME)
