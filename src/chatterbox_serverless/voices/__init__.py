"""Voice library: named voices per key (`POST /v1/audio/voices`), usable as `voice` on every route. The store
sits behind `VoiceStore` (voices/store.py) in the job store's backend: SQLite tables in the job store's database
file, or Redis keys on the job store's server under its prefix; `VoiceLibrary` (voices/library.py) is what the
API and the worker do with it. Cheap to import: no FastAPI, no torch."""
from __future__ import annotations

from .store import DuplicateVoiceName, Voice, VoiceLimitReached, VoiceStore, VoiceStoreError


def voice_store_for(job_store: object) -> VoiceStore | None:
    """The voice store living beside a job store, in the same backend (the SQLite job store's database file, or
    the Redis store's server, prefix and connection pool); None for another kind of store."""
    from ..jobs.sqlite_store import SQLiteJobStore
    if isinstance(job_store, SQLiteJobStore):
        from .sqlite_store import SQLiteVoiceStore
        return SQLiteVoiceStore(job_store.path)
    from ..jobs.redis_store import RedisJobStore
    if not isinstance(job_store, RedisJobStore):
        return None
    from .redis_store import RedisVoiceStore
    return RedisVoiceStore.beside(job_store)


__all__ = ["DuplicateVoiceName", "Voice", "VoiceLimitReached", "VoiceStore", "VoiceStoreError", "voice_store_for"]
