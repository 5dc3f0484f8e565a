"""The service, assembled from `Settings`: job store, accounts, engines, workers, janitor.

`serve` (api/serve.py) builds one and puts the HTTP layer over it; `worker` (jobs/worker_main.py) builds one with
workers and no HTTP; tests build them with engine doubles. Nothing here knows HTTP.

    service = build_service(settings, engine=engine)      # opens the store (and accounts unless no_auth)
    service = build_service(settings, engines=[original, turbo])   # several models, the first the default
    service.start()                                        # worker (or janitor) threads
    ...
    service.stop(); service.close()

Several models: one engine per API model (`engine.model`), one in-process `Worker` per engine, each claiming
only its engine's model from the shared store. `served_models` names them, default first: the HTTP layer
offers those models' routes. An API without engines (`--workers 0`) serves the models it is told
(`served_models=`, from the `--model` specs through engine/catalog.py) and workers elsewhere run them.
`service.worker` is the one worker, or a `WorkerGroup` over several that reads like one (alive, notify,
metrics), so /ready and /metrics need not know how many there are.
"""
from __future__ import annotations

import ipaddress
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TextIO

from .accounts.service import Accounts, Pricing
from .jobs.policy import ContentPolicy
from .jobs.store import DEFAULT_MODEL, JobStore
from .settings import Settings

log = logging.getLogger("chatterbox_serverless.service")


class ServiceError(Exception):
    """The service cannot be built from these settings; the message is one sentence for the operator."""


def open_store(settings: Settings) -> JobStore:
    """The job store `settings.store` names: Redis for a redis://, rediss:// or unix:// URL, else SQLite (a file
    path, or jobs.sqlite3 in the data dir). Raises ServiceError with one sentence when it cannot be opened."""
    import sqlite3

    from .jobs.store import StoreUnavailable
    try:
        if settings.is_redis:
            from .jobs.redis_store import RedisJobStore
            return RedisJobStore(settings.store, prefix=settings.redis_prefix, retention=settings.retention_seconds,
                                 audio_dir=settings.audio_dir, inline_max_bytes=settings.audio_inline_max)
        from .jobs.sqlite_store import SQLiteJobStore
        path = Path(settings.store.removeprefix("sqlite://")) if settings.store else settings.data_dir / "jobs.sqlite3"
        return SQLiteJobStore(path, retention_seconds=settings.retention_seconds)
    except (StoreUnavailable, sqlite3.Error) as e:
        raise ServiceError(f"cannot open the job store {settings.describe_store()}: {_first_line(e)}; "
                           "if the database file is damaged, move it aside (accepted jobs in it are lost) "
                           "or restore a backup") from None
    except OSError as e:
        raise ServiceError(f"cannot open the job store {settings.describe_store()}: {e.strerror or e}") from None


def open_accounts(settings: Settings, store: JobStore) -> Accounts | None:
    """API keys, credits and rate limits in the job store's backend; None with `no_auth`."""
    if settings.no_auth:
        return None
    from .accounts import account_store_for
    try:
        pricing = Pricing(credits_per_second=settings.price_per_second, minimum=settings.min_price)
    except ValueError as e:
        raise ServiceError(str(e)) from None
    account_store = account_store_for(store)
    if account_store is None:
        raise ServiceError("API keys are not available with this store; run with --no-auth (behind your own "
                           "authentication) or use the SQLite or Redis store")
    return Accounts(account_store, pricing)


def open_voices(settings: Settings, store: JobStore, engine: Any) -> Any:
    """The voice library in the job store's backend (None for a store without one). `engine`: the one in this
    process, which computes a new voice's conditionals at creation (None: the first worker needing them does)."""
    from .voices import voice_store_for
    from .voices.library import VoiceLibrary, parse_voice_map
    voice_store = voice_store_for(store)
    if voice_store is None:
        return None
    return VoiceLibrary(voice_store, engine, max_voices=settings.max_voices, max_bytes=settings.max_voice_bytes,
                        voice_map=parse_voice_map(settings.openai_voices))


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def engine_model(engine: Any) -> str:
    """The API model an engine serves (contract.Engine.model; engines written before models: the original)."""
    return str(getattr(engine, "model", None) or DEFAULT_MODEL)


class WorkerGroup:
    """Several in-process workers (one per engine) seen as one by the HTTP layer: alive when all are, `notify`
    wakes them all, one metrics registry (they share one `WorkerMetrics`: the process's figures)."""

    def __init__(self, workers: Sequence[Any]):
        self.workers = tuple(workers)
        self.metrics = self.workers[0].metrics

    @property
    def worker_id(self) -> str:
        return ",".join(w.worker_id for w in self.workers)

    @property
    def alive(self) -> bool:
        return all(w.alive for w in self.workers)

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(m for w in self.workers for m in w.models)

    def notify(self) -> None:
        for w in self.workers:
            w.notify()

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def stop(self, grace: float | None = None) -> None:
        """Stop them all at once (each finishes or hands back what it holds within the grace time)."""
        import threading
        threads = [threading.Thread(target=w.stop, args=(grace,), name=f"stop-{w.worker_id}") for w in self.workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


@dataclass
class Service:
    settings: Settings
    store: JobStore
    accounts: Accounts | None = None
    engine: Any = None                      # the default model's engine.contract.Engine, or None (no worker here)
    engines: tuple = ()                     # every engine in this process, the default first
    served_models: tuple[str, ...] = (DEFAULT_MODEL,)   # API model names served, the default first
    workers: tuple = ()                     # jobs.worker.Worker per engine running in this process
    worker: Any = None                      # the one Worker, a WorkerGroup over several, or None
    janitor: Any = None                     # jobs.worker.Janitor when no in-process worker maintains the store
    policy: ContentPolicy = field(default_factory=ContentPolicy)
    fetcher: Any = None                     # media.SafeFetcher: reference URLs
    voices: Any = None                      # voices.library.VoiceLibrary beside the store, or None
    webhooks: Any = None                    # jobs.webhooks.WebhookDispatcher: job results to their webhook_url
    model_name: str = ""
    owns_store: bool = True                 # close() closes the store (and the accounts it opened)
    owns_accounts: bool = False

    @property
    def default_model(self) -> str:
        return self.served_models[0]

    def engine_for(self, model: str) -> Any:
        """The engine of `model` in this process, or None."""
        return next((e for e in self.engines if engine_model(e) == model), None)

    def start(self) -> None:
        if self.worker is not None:
            self.worker.start()
            watch = getattr(self.store, "watch_new_work", None)   # Redis: wake on submissions instead of polling
            if watch is not None:
                watch(self.worker.notify)
        if self.janitor is not None:
            self.janitor.start()
        if self.webhooks is not None:
            self.webhooks.start()

    def webhook_secret(self, owner: str) -> str:
        """The secret webhooks of `owner`'s jobs are signed with: the key's own, or the server's without keys."""
        if owner and self.accounts is not None:
            return self.accounts.store.webhook_secret(owner)
        from .jobs.webhooks import ServerSecret
        return ServerSecret(self.settings.data_dir).get()

    def stop(self) -> None:
        """Stop the worker (in-flight jobs finish within the grace time, the rest go back to the queue)."""
        if self.worker is not None:
            log.info("stopping the worker (grace %.0f s)", self.settings.shutdown_grace)
            self.worker.stop()
        if self.janitor is not None:
            self.janitor.stop()
        if self.webhooks is not None:
            self.webhooks.stop()

    def close(self) -> None:
        if self.voices is not None:
            self.voices.store.close()
        if self.owns_accounts and self.accounts is not None:
            self.accounts.store.close()
        if self.owns_store:
            self.store.close()


def served_models_of(engines: Sequence[Any], served_models: Sequence[str] | None = None) -> tuple[str, ...]:
    """The API models a service serves: its engines' (in order), else `served_models`, else the original.
    ServiceError (one sentence) when two engines serve one model, or `served_models` disagrees with them."""
    if engines:
        models = tuple(engine_model(e) for e in engines)
        twice = sorted({m for m in models if models.count(m) > 1})
        if twice:
            raise ServiceError(f"two --model options serve {twice[0]}; give one checkpoint per model")
        if served_models and tuple(served_models) != models:
            raise ServiceError(f"the engines serve {', '.join(models)}, not {', '.join(served_models)}")
        return models
    if served_models:
        models = tuple(served_models)
        twice = sorted({m for m in models if models.count(m) > 1})
        if twice:
            raise ServiceError(f"two --model options serve {twice[0]}; give one checkpoint per model")
        return models
    return (DEFAULT_MODEL,)


def build_service(settings: Settings, *, engine: Any = None, engines: Sequence[Any] | None = None,
                  served_models: Sequence[str] | None = None, store: JobStore | None = None,
                  accounts: Accounts | None | bool = True, fetcher: Any = None, with_worker: bool | None = None,
                  model_name: str = "") -> Service:
    """Assemble the service. `engine`: one engine; `engines`: several, one per API model (the first is the
    default model); not both. `served_models`: the API models served when no engine is given (an API whose
    workers run elsewhere; default: the original). `store`: an open store (default: the one `settings` names,
    closed with the service). `accounts`: True opens them beside the store (unless `settings.no_auth`),
    False/None runs without keys, or an `Accounts`. `with_worker`: run a worker per engine in this process
    (default: when an engine is given and `settings.workers` > 0); otherwise a janitor maintains the store."""
    if engine is not None and engines:
        raise ValueError("build_service takes engine= or engines=, not both")
    engines = tuple(engines) if engines else ((engine,) if engine is not None else ())
    engine = engines[0] if engines else None
    models = served_models_of(engines, served_models)
    own = store is None
    store = store if store is not None else open_store(settings)
    try:
        owns_accounts = accounts is True
        if accounts is True:
            accounts = open_accounts(settings, store)
        elif accounts is False:
            accounts = None
        if accounts is not None:
            attach = getattr(store, "attach_billing", None)
            if attach is not None:
                attach(accounts.store)
        policy = ContentPolicy.from_file(settings.blocked_terms_file) if settings.blocked_terms_file else ContentPolicy()
        if fetcher is None:
            from .media import SafeFetcher
            fetcher = SafeFetcher(allow_hosts=settings.allow_fetch_hosts)
        service = Service(settings=settings, store=store, accounts=accounts, engine=engine, engines=engines,
                          served_models=models, policy=policy, fetcher=fetcher, model_name=model_name,
                          owns_store=own, owns_accounts=owns_accounts and accounts is not None,
                          voices=open_voices(settings, store, engine))
        if with_worker is None:
            with_worker = engine is not None and settings.workers > 0
        if with_worker:
            if not engines:
                raise ValueError("a worker needs an engine")
            if len(engines) == 1:
                service.workers = (make_worker(service),)
                service.worker = service.workers[0]
            else:
                from .jobs.worker import WorkerMetrics
                shared = WorkerMetrics()
                base = settings.worker_id or default_worker_id()
                service.workers = tuple(make_worker(service, e, worker_id=f"{base}-{engine_model(e)}", metrics=shared)
                                        for e in engines)
                service.worker = WorkerGroup(service.workers)
        else:
            from .jobs.worker import Janitor
            service.janitor = Janitor(store, max_attempts=settings.max_attempts,
                                      retention_seconds=settings.retention_seconds, accounts=accounts)
        service.webhooks = make_webhooks(service)
        return service
    except BaseException:
        if own:
            store.close()
        raise


def default_worker_id() -> str:
    import os
    import socket
    import uuid
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def make_worker(service: Service, engine: Any = None, *, worker_id: str | None = None, metrics: Any = None) -> Any:
    """The worker of `engine` (default: the service's engine), claiming only its model's jobs."""
    import copy

    from .jobs.worker import Worker
    from .media import encode_audio, load_reference

    s, fetcher = service.settings, service.fetcher
    engine = service.engine if engine is None else engine
    voices = service.voices
    if voices is not None and voices.engine is not engine:     # the library as this engine sees it (its variant)
        voices = copy.copy(voices)
        voices.engine = engine
    worker = Worker(service.store, engine, encode=encode_audio,
                    resolve_reference=lambda value: load_reference(value, fetcher), policy=service.policy,
                    resolve_voice=voices.load if voices is not None else None,
                    worker_id=worker_id or s.worker_id, batch_size=s.batch_size, batch_wait=s.batch_wait,
                    lease_seconds=s.lease_seconds, max_attempts=s.max_attempts, retention_seconds=s.retention_seconds,
                    shutdown_grace=s.shutdown_grace, metrics=metrics,
                    info={"model": service.model_name, "store": "redis" if s.is_redis else "sqlite"})
    worker.reconcile_with(service.accounts)      # repair of holds left open; billing itself is the store's
    return worker


def make_webhooks(service: Service) -> Any:
    """The webhook dispatcher of every process on the store (jobs/webhooks.py): bodies as GET /v2/requests/{id}
    answers them (URLs under the base the job was submitted at), POSTed by a SafeFetcher under the reference
    URLs' address rules (--allow-fetch-hosts), no redirects followed."""
    import json

    from .api.bodies import JobBodies
    from .api.signing import UrlSigner
    from .jobs.webhooks import WebhookDispatcher
    from .media import SafeFetcher

    s = service.settings
    bodies = JobBodies(UrlSigner(s.load_url_secret()), s.retention_seconds)
    poster = SafeFetcher(allow_hosts=s.allow_fetch_hosts, timeout=s.webhook_timeout, max_redirects=0)

    def render(job) -> bytes:
        body, _ = bodies.body(job.base_url or s.public_url or "", job, with_output=True)
        return json.dumps(body).encode()
    return WebhookDispatcher(service.store, render=render, secret_for=service.webhook_secret, post=poster.post,
                             attempts=s.webhook_attempts, backoff=s.webhook_backoff, timeout=s.webhook_timeout,
                             retention_seconds=s.retention_seconds)


# --- start-up notices ----------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def announce_auth(service: Service, out: TextIO | None = None) -> str | None:
    """At `serve` start, once the server can take requests: warn when auth is off beyond loopback; with auth on
    and no key at all, make one admin key and print it once (to `out`, stderr by default; never into the logs).
    Returns the key made, if any."""
    settings, accounts = service.settings, service.accounts
    out = out or sys.stderr
    if accounts is None:
        if not is_loopback(settings.host):
            log.warning("authentication is OFF (--no-auth) and the server listens on %s: anyone who can reach "
                        "it can use it. Use --no-auth only on a trusted network, or drop it.", settings.host)
        return None
    key = accounts.bootstrap_admin()
    if key:
        print("\n" + "=" * 78 + "\n"
              "No API key existed, so an admin key was created. It is shown only now: store it.\n\n"
              f"    {key}\n\n"
              "Send it as the x-api-key header, e.g.\n"
              f"    curl -H 'x-api-key: {key}' http://HOST:PORT/v1/account\n"
              f"More keys: chatterbox-serverless keys create {settings.keys_command_where()} "
              "--credits 1000 --name app\n"
              "      (or POST /v1/admin/keys with this admin key).\n" + "=" * 78 + "\n", file=out, flush=True)
        log.warning("no API key existed: created one admin key (printed once on stderr); make more with "
                    "`chatterbox-serverless keys create`")
    else:
        log.info("authentication on: %d key(s) in the store", accounts.store.count())
    return key
