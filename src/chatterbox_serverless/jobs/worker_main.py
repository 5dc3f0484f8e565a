"""`chatterbox-serverless worker`: a worker process on any host, sharing a job store with the API replicas.

    chatterbox-serverless worker --store redis://redis:6379/0 --model ResembleAI/chatterbox --device cuda

It claims batches from the shared queue, runs the engine, stores each result (audio included) in the store, and
advertises itself (heartbeat with a TTL) so the API's /ready and /metrics show the fleet. SIGTERM: stop
claiming, finish the batch in hand within the grace time, hand the rest back to the queue. A worker that dies
without that (SIGKILL, lost host) loses its leases after --lease-seconds and its jobs are retried elsewhere.

Also here: `add_store_arguments` / `open_store`, the `--store` option shared with `serve`.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from ..engine.options import add_engine_arguments, engine_from_args


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"CHATTERBOX_{name}", default)


# --- the store option (serve and worker) -------------------------------------------------------------------------

def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--store", default=_env("STORE", ""),
      help="job store: redis://[:PASSWORD@]HOST:PORT/DB (rediss:// for TLS) to share jobs between API replicas "
           "and workers, or a SQLite file path (default: jobs.sqlite3 in --data-dir)")
    a("--redis-prefix", default=_env("REDIS_PREFIX", "cbx:"),
      help="prefix of every Redis key (several deployments can share one Redis; default cbx:)")
    a("--audio-dir", default=_env("AUDIO_DIR"),
      help="Redis store: a directory every API replica and worker mounts (NFS, a ReadWriteMany volume) for "
           "outputs larger than --audio-inline-max; default: all audio in Redis")
    a("--audio-inline-max", type=int, default=int(_env("AUDIO_INLINE_MAX", str(1 << 20))),
      help="Redis store with --audio-dir: outputs up to this many bytes stay in Redis (default 1048576)")


def open_store(store: str, data_dir: Path, retention_seconds: float, redis_prefix: str = "cbx:",
               audio_dir: str | None = None, audio_inline_max: int = 1 << 20):
    """The job store named by `--store`: Redis for a redis://, rediss:// or unix:// URL, else SQLite."""
    if store.startswith(("redis://", "rediss://", "unix://")):
        from .redis_store import RedisJobStore
        return RedisJobStore(store, prefix=redis_prefix, retention=retention_seconds, audio_dir=audio_dir,
                             inline_max_bytes=audio_inline_max)
    from .sqlite_store import SQLiteJobStore
    path = Path(store.removeprefix("sqlite://")) if store else Path(data_dir) / "jobs.sqlite3"
    return SQLiteJobStore(path, retention_seconds=retention_seconds)


def describe_store(store: str) -> str:
    """The store's URL without its password, for logs."""
    if "@" in store and "://" in store:
        scheme, rest = store.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return store or "sqlite (data dir)"


# --- the worker command ------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    add_store_arguments(parser)
    add_engine_arguments(parser)
    a("--data-dir", default=_env("DATA_DIR", "./data"), help="model cache and local files (default ./data)")
    a("--worker-id", default=_env("WORKER_ID"), help="name shown in /ready (default HOST-PID-random)")
    a("--batch-size", type=int, default=8, help="jobs per engine batch (default 8)")
    a("--batch-wait", type=float, default=0.02, help="seconds to wait to fill a batch (default 0.02)")
    a("--lease-seconds", type=float, default=30.0,
      help="a job whose worker went silent this long is retried elsewhere (default 30)")
    a("--max-attempts", type=int, default=3, help="runs of one job before it FAILs (default 3)")
    a("--retention", type=float, default=3600.0, help="seconds results and audio are kept (default 3600)")
    a("--allow-fetch-hosts", default=_env("ALLOW_FETCH_HOSTS", ""),
      help="comma-separated hosts reference_audio URLs may reach even on private addresses")
    a("--blocked-terms", default=_env("BLOCKED_TERMS"),
      help="file of blocked terms, one per line: matching jobs end FAILED (content policy)")
    a("--shutdown-grace", type=float, default=30.0, help="seconds to finish the batch in hand on SIGTERM")
    a("--metrics-port", type=int, default=int(_env("WORKER_METRICS_PORT", "0")),
      help="serve this worker's Prometheus metrics on this port (default 0: off)")
    a("--metrics-host", default=_env("WORKER_METRICS_HOST", "127.0.0.1"),
      help="address of the metrics listener (default 127.0.0.1)")
    a("--log-format", choices=("json", "plain"), default=_env("LOG_FORMAT", "json"))
    a("--log-level", default=_env("LOG_LEVEL", "info"))


def run(args: argparse.Namespace) -> int:
    from ..api.logs import configure_logging

    configure_logging(json_lines=args.log_format == "json", level=args.log_level)
    problems = [f"--{name.replace('_', '-')} must be at least 1" for name in ("batch_size", "max_attempts")
                if getattr(args, name) < 1]
    problems += [f"--{name.replace('_', '-')} must be positive" for name in ("lease_seconds", "retention")
                 if getattr(args, name) <= 0]
    if args.blocked_terms and not Path(args.blocked_terms).is_file():
        problems.append(f"--blocked-terms {args.blocked_terms} is not a file")
    if problems:
        print(f"chatterbox-serverless worker: {'; '.join(problems)}", file=sys.stderr)
        return 2
    engine = engine_from_args(args, args.data_dir, "worker")
    if engine is None:
        return 2
    store = open_store(args.store, Path(args.data_dir), args.retention, args.redis_prefix, args.audio_dir,
                       args.audio_inline_max)
    try:
        run_worker(store, engine, args, model_name=args.model)
    finally:
        store.close()
    return 0


def run_worker(store: Any, engine: Any, args: argparse.Namespace, *, model_name: str = "",
               stop: threading.Event | None = None) -> None:
    """Run one Worker over `store` until SIGTERM/SIGINT (or `stop` is set); blocking. Used by `run` and by
    test processes that supply an engine double."""
    import logging

    from ..media import SafeFetcher, encode_audio, load_reference
    from .policy import ContentPolicy
    from .worker import Worker

    log = logging.getLogger("chatterbox_serverless.worker")
    fetch = SafeFetcher(allow_hosts=tuple(h.strip() for h in (args.allow_fetch_hosts or "").split(",")
                                          if h.strip()))
    policy = ContentPolicy.from_file(Path(args.blocked_terms)) if args.blocked_terms else None
    worker = Worker(store, engine, encode=encode_audio, resolve_reference=lambda value: load_reference(value, fetch),
                    policy=policy, worker_id=args.worker_id, batch_size=args.batch_size,
                    batch_wait=args.batch_wait, lease_seconds=args.lease_seconds, max_attempts=args.max_attempts,
                    retention_seconds=args.retention, shutdown_grace=args.shutdown_grace,
                    info={"model": model_name, "store": describe_store(args.store)})
    if args.metrics_port:
        from prometheus_client import start_http_server
        start_http_server(args.metrics_port, addr=args.metrics_host, registry=worker.metrics.registry)
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    log.info("worker %s serving %s", worker.worker_id, describe_store(args.store),
             extra={"batch_size": args.batch_size, "lease_seconds": args.lease_seconds})
    worker.start()
    watch = getattr(store, "watch_new_work", None)     # Redis: wake on submissions instead of polling
    if watch is not None:
        watch(worker.notify)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        log.info("stopping worker %s (grace %.0f s)", worker.worker_id, args.shutdown_grace)
        worker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
