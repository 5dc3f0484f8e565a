"""The service, assembled from `Settings`: job store, accounts, engine, worker, janitor.

`serve` (api/serve.py) builds one and puts the HTTP layer over it; `worker` (jobs/worker_main.py) builds one with
a worker and no HTTP; tests build them with engine doubles. Nothing here knows HTTP.

    service = build_service(settings, engine=engine)      # opens the store (and accounts unless no_auth)
    service.start()                                        # worker (or janitor) threads
    ...
    service.stop(); service.close()
"""
from __future__ import annotations

import ipaddress
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .accounts.service import Accounts, Pricing
from .jobs.policy import ContentPolicy
from .jobs.store import JobStore
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


@dataclass
class Service:
    settings: Settings
    store: JobStore
    accounts: Accounts | None = None
    engine: Any = None                      # engine.contract.Engine, or None (an API without a worker)
    worker: Any = None                      # jobs.worker.Worker running in this process, or None
    janitor: Any = None                     # jobs.worker.Janitor when no in-process worker maintains the store
    policy: ContentPolicy = field(default_factory=ContentPolicy)
    fetcher: Any = None                     # media.SafeFetcher: reference URLs
    voices: Any = None                      # voices.library.VoiceLibrary beside the store, or None
    webhooks: Any = None                    # jobs.webhooks.WebhookDispatcher: job results to their webhook_url
    model_name: str = ""
    owns_store: bool = True                 # close() closes the store (and the accounts it opened)
    owns_accounts: bool = False

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


def build_service(settings: Settings, *, engine: Any = None, store: JobStore | None = None,
                  accounts: Accounts | None | bool = True, fetcher: Any = None, with_worker: bool | None = None,
                  model_name: str = "") -> Service:
    """Assemble the service. `store`: an open store (default: the one `settings` names, closed with the service).
    `accounts`: True opens them beside the store (unless `settings.no_auth`), False/None runs without keys, or
    an `Accounts`. `with_worker`: run a worker in this process (default: when an engine is given and
    `settings.workers` > 0); otherwise a janitor maintains the store."""
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
        service = Service(settings=settings, store=store, accounts=accounts, engine=engine, policy=policy,
                          fetcher=fetcher, model_name=model_name, owns_store=own,
                          owns_accounts=owns_accounts and accounts is not None,
                          voices=open_voices(settings, store, engine))
        if with_worker is None:
            with_worker = engine is not None and settings.workers > 0
        if with_worker:
            service.worker = make_worker(service)
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


def make_worker(service: Service) -> Any:
    from .jobs.worker import Worker
    from .media import encode_audio, load_reference

    s, fetcher = service.settings, service.fetcher
    worker = Worker(service.store, service.engine, encode=encode_audio,
                    resolve_reference=lambda value: load_reference(value, fetcher), policy=service.policy,
                    resolve_voice=service.voices.load if service.voices is not None else None,
                    worker_id=s.worker_id, batch_size=s.batch_size, batch_wait=s.batch_wait,
                    lease_seconds=s.lease_seconds, max_attempts=s.max_attempts, retention_seconds=s.retention_seconds,
                    shutdown_grace=s.shutdown_grace, info={"model": service.model_name, "store": "redis" if s.is_redis else "sqlite"})
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
