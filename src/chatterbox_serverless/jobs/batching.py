"""Claims queued jobs in batches, nothing more (which jobs come first is the store's `claim`): up to `batch_size`
at once and, when fewer were waiting, waits up to `batch_wait` seconds for more to arrive, so concurrent clients
share one pass of the model.

Store-agnostic: everything goes through `JobStore.claim`, for the worker's `models` only (None: any model). In-process submitters call `notify()` so an idle
worker starts at once instead of at its next poll.
"""
from __future__ import annotations

import threading
import time
from typing import Sequence

from .store import Job, JobStore


class BatchClaimer:
    def __init__(self, store: JobStore, worker_id: str, *, batch_size: int = 8, batch_wait: float = 0.02,
                 lease_seconds: float = 30.0, poll_interval: float = 0.1, models: Sequence[str] | None = None):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.store = store
        self.worker_id = worker_id
        self.batch_size = batch_size
        self.batch_wait = batch_wait
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self.models = None if models is None else tuple(models)
        self._wake = threading.Event()

    def notify(self) -> None:
        """A job was queued: wake an idle `next_batch`."""
        self._wake.set()

    def _sleep(self, seconds: float) -> None:
        if seconds > 0 and self._wake.wait(seconds):
            self._wake.clear()

    def claim(self, limit: int) -> list[Job]:
        """Up to `limit` jobs of this claimer's models, now, without waiting."""
        return self.store.claim(self.worker_id, limit, self.lease_seconds, models=self.models)

    def next_batch(self, stop: threading.Event | None = None, limit: int | None = None) -> list[Job]:
        """Claimed jobs (now PROCESSING under this worker's lease), or [] after an idle poll interval."""
        limit = min(limit or self.batch_size, self.batch_size)
        self._wake.clear()
        jobs = self.claim(limit)
        if not jobs:
            self._sleep(self.poll_interval)
            return []
        deadline = time.monotonic() + self.batch_wait
        while len(jobs) < limit and not (stop is not None and stop.is_set()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._sleep(remaining)
            jobs += self.claim(limit - len(jobs))
        return jobs
