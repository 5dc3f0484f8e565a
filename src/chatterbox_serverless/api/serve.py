"""`chatterbox-serverless serve`: the API and (by default) an in-process worker on one machine.

Jobs live in SQLite under --data-dir (jobs.sqlite3, audio/), so a restart loses nothing that was accepted; or,
with `--store redis://HOST:PORT/DB`, in Redis shared by several API replicas and `worker` processes (scale-out).
SIGTERM (or Ctrl-C) stops accepting connections, lets in-flight requests and the batch in hand finish within the
grace time, and hands unfinished jobs back to the queue.
"""
from __future__ import annotations

import argparse
import os
import sys
from ..engine.options import add_engine_arguments, engine_from_args


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"CHATTERBOX_{name}", default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--host", default=_env("HOST", "127.0.0.1"), help="address to listen on (default 127.0.0.1)")
    a("--port", type=int, default=int(_env("PORT", "8000")), help="port (default 8000)")
    a("--data-dir", default=_env("DATA_DIR", "./data"), help="jobs database, audio and secrets (default ./data)")
    add_engine_arguments(parser)
    a("--workers", type=int, choices=(0, 1), default=1,
      help="in-process workers: 1 (default) or 0 (API only, workers run elsewhere)")
    a("--retention", type=float, default=3600.0, help="seconds results and audio are kept (default 3600)")
    a("--max-queue", type=int, default=1000, help="queued jobs before submissions get 429 (default 1000)")
    a("--batch-size", type=int, default=8, help="jobs per engine batch (default 8)")
    a("--batch-wait", type=float, default=0.02, help="seconds to wait to fill a batch (default 0.02)")
    a("--sync-timeout", type=float, default=25.0,
      help="seconds a /v1 call waits before answering 504 with the request id (default 25)")
    a("--max-text-chars", type=int, default=5000, help="longest accepted text (default 5000)")
    a("--lease-seconds", type=float, default=30.0,
      help="a job whose worker went silent this long is retried (default 30)")
    a("--max-attempts", type=int, default=3, help="runs of one job before it FAILs (default 3)")
    a("--public-url", default=_env("PUBLIC_URL"),
      help="base URL clients see (behind a proxy), e.g. https://tts.example.com; default: the request's host")
    a("--allow-fetch-hosts", default=_env("ALLOW_FETCH_HOSTS", ""),
      help="comma-separated hosts reference_audio URLs may reach even on private addresses")
    a("--blocked-terms", default=_env("BLOCKED_TERMS"),
      help="file of blocked terms, one per line: matching jobs end FAILED (content policy)")
    a("--shutdown-grace", type=float, default=30.0, help="seconds to finish in-flight jobs on SIGTERM")
    a("--log-format", choices=("json", "plain"), default=_env("LOG_FORMAT", "json"))
    a("--log-level", default=_env("LOG_LEVEL", "info"))
    from ..jobs.worker_main import add_store_arguments   # --store redis://... (scale-out), --redis-prefix, ...
    add_store_arguments(parser)
    a("--no-auth", action="store_true", default=_env("NO_AUTH", "") in ("1", "true", "yes"),
      help="no API keys: anyone who reaches the server may use it (local setups only; warns beyond loopback)")
    a("--price-per-second", type=float, default=float(_env("PRICE_PER_SECOND", "1")),
      help="credits one second of produced audio costs (default 1)")
    a("--min-price", type=int, default=int(_env("MIN_PRICE", "1")),
      help="credits a completed request costs at least (default 1)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..engine.checkpoint import CheckpointError
    from ..jobs.worker_main import open_store
    from ..settings import Settings
    from .logs import configure_logging

    configure_logging(json_lines=args.log_format == "json", level=args.log_level)
    try:
        settings = Settings(
            data_dir=Path(args.data_dir), public_url=args.public_url, retention_seconds=args.retention,
            max_queue=args.max_queue, max_text_chars=args.max_text_chars, sync_timeout=args.sync_timeout,
            batch_size=args.batch_size, batch_wait=args.batch_wait, lease_seconds=args.lease_seconds,
            max_attempts=args.max_attempts, shutdown_grace=args.shutdown_grace,
            allow_fetch_hosts=tuple(h.strip() for h in (args.allow_fetch_hosts or "").split(",") if h.strip()),
            blocked_terms_file=Path(args.blocked_terms) if args.blocked_terms else None,
            log_json=args.log_format == "json")
    except ValueError as e:
        print(f"chatterbox-serverless serve: {e}", file=sys.stderr)
        return 2
    if settings.blocked_terms_file and not settings.blocked_terms_file.is_file():
        print(f"chatterbox-serverless serve: --blocked-terms {settings.blocked_terms_file} is not a file",
              file=sys.stderr)
        return 2

    engine = None
    if args.workers > 0:
        engine = engine_from_args(args, settings.data_dir, "serve")
        if engine is None:
            return 2

    store = open_store(args.store, settings.data_dir, settings.retention_seconds, args.redis_prefix,
                       args.audio_dir, args.audio_inline_max)
    try:
        gate = open_accounts(args, store)
        if gate is None:
            return 2
        serve_app(settings, store, engine, workers=args.workers, host=args.host, port=args.port,
                  model_name=args.model, accounts=gate)
    finally:
        store.close()
    return 0


def open_accounts(args: argparse.Namespace, store):
    """API keys, credits and rate limits in the job store's backend (an AccountGate), or a disabled gate with
    --no-auth; None (after saying why) when they cannot be had. A first start with no key makes an admin key."""
    from ..accounts import account_store_for
    from ..accounts.service import Accounts, Pricing
    from ..accounts.web import AccountGate, prepare

    if args.no_auth:
        prepare(None, args.host)
        return AccountGate(None)
    try:
        pricing = Pricing(credits_per_second=args.price_per_second, minimum=args.min_price)
    except ValueError as e:
        print(f"chatterbox-serverless serve: {e}", file=sys.stderr)
        return None
    account_store = account_store_for(store)
    if account_store is None:
        print("chatterbox-serverless serve: API keys are not available with this store yet; run with --no-auth "
              "(behind your own authentication) or use the SQLite store", file=sys.stderr)
        return None
    accounts = Accounts(account_store, pricing)
    prepare(accounts, args.host, f"--store {args.store}" if args.store else f"--data-dir {args.data_dir}")
    return AccountGate(accounts)


def serve_app(settings, store, engine, *, workers: int, host: str, port: int, model_name: str = "",
              sockets=None, **app_kwargs) -> None:
    """Build the app and run uvicorn until SIGTERM/SIGINT (blocking). Used by `run` and by test servers."""
    import uvicorn

    from .app import create_app

    app = create_app(settings, store, engine, workers=workers, model_name=model_name, **app_kwargs)
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, proxy_headers=True,
                            server_header=False, timeout_graceful_shutdown=max(1, int(settings.sync_timeout) + 5),
                            timeout_keep_alive=30)
    uvicorn.Server(config).run(sockets=sockets)
