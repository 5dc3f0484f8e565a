"""Accounts: API keys (stored hashed), credits (hold at submit, settle at completion, release on failure, with
a ledger), per-key submission rate limits. The store sits behind `AccountStore` (accounts/store.py): SQLite in
the job store's database file, or Redis on the job store's server under its prefix.

Billing is done by the job store, with each job's terminal transition, once the assembly attached the account
store living beside it:

    account_store = account_store_for(job_store)
    job_store.attach_billing(account_store)        # every process that completes or fails jobs, workers too
    accounts = Accounts(account_store, pricing)    # API side: keys, holds (recording `pricing`), repair

Cheap to import: no FastAPI, no torch."""
from __future__ import annotations

from pathlib import Path

from .store import AccountStore

DB_FILENAME = "jobs.sqlite3"    # the SQLite job store's file (service.open_store): one database per data dir


def open_account_store(data_dir: str | Path | None = None, url: str | None = None,
                       redis_prefix: str | None = None) -> AccountStore:
    """The account store for a data dir (SQLite, `<data-dir>/jobs.sqlite3`) or for `--store` as `serve` and
    `worker` take it: a SQLite file path (`sqlite://PATH` too) or a `redis://` URL (with `--redis-prefix`;
    None: $CHATTERBOX_REDIS_PREFIX or the default, as `serve`)."""
    if url:
        if url.startswith(("redis://", "rediss://", "unix://")):
            from .redis_store import RedisAccountStore
            return RedisAccountStore(url, prefix=redis_prefix)
        from .sqlite_store import SQLiteAccountStore
        return SQLiteAccountStore(Path(url.removeprefix("sqlite://")))
    if data_dir is None:
        raise ValueError("give a data dir or a store URL")
    from .sqlite_store import SQLiteAccountStore
    return SQLiteAccountStore(Path(data_dir) / DB_FILENAME)


def account_store_for(job_store: object) -> AccountStore | None:
    """The account store living beside a job store, in the same backend: the SQLite job store's database file,
    or the Redis store's server, prefix and connection pool. None when there is none for this store. This is
    the one `job_store.attach_billing` accepts."""
    from ..jobs.sqlite_store import SQLiteJobStore
    if isinstance(job_store, SQLiteJobStore):
        from .sqlite_store import SQLiteAccountStore
        return SQLiteAccountStore(job_store.path)
    from ..jobs.redis_store import RedisJobStore
    if not isinstance(job_store, RedisJobStore):
        return None
    from .redis_store import RedisAccountStore
    return RedisAccountStore.beside(job_store)
