"""Webhooks: a v2 job submitted with `webhook_url` has its result POSTed there once it is terminal, signed,
retried with backoff, durably.

What is sent: the result body, exactly as `GET /v2/requests/{id}` would answer it (status, output URL, metrics,
error, `cancelled`, the delivery's own state), as JSON.

Signing, Standard Webhooks style (https://www.standardwebhooks.com, so its libraries verify it):

    webhook-id:         the request id (the same on every attempt: a receiver can drop repeats)
    webhook-timestamp:  Unix seconds when this attempt was made
    webhook-signature:  "v1," + base64(HMAC-SHA256(key, f"{webhook-id}.{webhook-timestamp}.{body}"))

where `key` is the base64-decoded part of the secret after "whsec_". The secret is the submitting key's own
(`GET /v1/account/webhook-secret`, `POST /v1/account/webhook-secret/rotate`); with --no-auth, one per server
(`CHATTERBOX_WEBHOOK_SECRET`, else a random one kept in the data dir as `webhook-secret`, like `url-secret`).
`verify` below is the receiver's side.

Durable: the delivery is created by the job store in the same transaction / script as the job's terminal state
(`JobStore.claim_webhooks`/`finish_webhook`), so a server that dies after finishing a job, or between two
attempts, makes the delivery when it (or any other process on the store) runs again.

Retries: after a failed attempt (any answer but 2xx, or none within `--webhook-timeout`), attempt n+1 is due
`--webhook-backoff * 2**(n-1)` seconds later, up to `--webhook-attempts` attempts (defaults 8 and 25 s: the last
one ~53 minutes after the first), and never once the result has expired (`--retention`): the body's output
URL would be dead by then, and the job's record with it.

Where: every process built by `service.build_service` (an API replica, `serve` with its worker, a `worker`)
runs a `WebhookDispatcher`. It claims due deliveries under a lease (two processes never make the same attempt;
a process that dies mid-attempt loses its lease and the next attempt is someone else's), posts each on a small
thread pool with a per-attempt time limit, so a slow or dead receiver holds one thread for at most the
timeout: never a worker, never another job. The output URL in the body is signed with this process's URL
secret, so every process on a shared store needs the same `CHATTERBOX_URL_SECRET` (deploy/compose.yaml gives
every service the same one).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping

from ..media import MediaError
from .store import Job, JobStore, WebhookDelivery

log = logging.getLogger(__name__)

PARAM = "webhook_url"
SECRET_ENV = "CHATTERBOX_WEBHOOK_SECRET"
SECRET_FILE = "webhook-secret"
DEFAULT_ATTEMPTS = 8
DEFAULT_BACKOFF = 25.0              # seconds before the second attempt; doubling after each failure
DEFAULT_TIMEOUT = 10.0              # seconds one attempt may take (connect, send, answer)
POLL_INTERVAL = 0.25                # seconds between looks for due deliveries
CONCURRENCY = 8                     # attempts in flight per process
EXPIRED = "the result expired before it could be delivered"

Render = Callable[[Job], bytes]                       # a job -> the JSON body to send
SecretFor = Callable[[str], str]                      # an owner (account id, "" without auth) -> its secret
Post = Callable[[str, bytes, dict], int]              # (url, body, headers) -> HTTP status; raises MediaError
                                                      # (FetchError) with a reason for the URL's owner


class WebhookUrlError(ValueError):
    """A `webhook_url` the server will not call (the message names the parameter): a 400 at submit."""


def check_webhook_url(value: object, allow_hosts: Any) -> str:
    """The URL, if the server may POST to it: http(s), and the same destination rules as `reference_audio`
    URLs (`media.reference`: no loopback, private, link-local or metadata address written in the URL, in any
    notation, unless `allow_hosts`, the --allow-fetch-hosts list, admits it; names are checked again when
    resolved, at every attempt). Raises WebhookUrlError."""
    from ..media.fetch import AllowList
    from ..media.reference import PARAM as REFERENCE, ReferenceAudioError, _check_url
    allow = allow_hosts if isinstance(allow_hosts, AllowList) else AllowList(allow_hosts or ())
    if not isinstance(value, str) or not value.strip():
        raise WebhookUrlError(f"{PARAM}: must be an http(s) URL")
    url = value.strip()
    if url.split(":", 1)[0].lower() not in ("http", "https"):
        raise WebhookUrlError(f"{PARAM}: must be an http(s) URL")
    try:
        return _check_url(url, allow)
    except ReferenceAudioError as e:     # the same checks, worded for this parameter
        raise WebhookUrlError(f"{PARAM}: {str(e).removeprefix(REFERENCE + ': ')}") from None


# --- signatures ------------------------------------------------------------------------------------------------
def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one attempt."""
    mac = hmac.new(_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(secret: str, headers: Mapping[str, str], body: bytes, tolerance: float = 300.0,
           now: float | None = None) -> bool:
    """The receiver's check: the signature is the secret's, and the timestamp within `tolerance` seconds."""
    try:
        msg_id, timestamp = headers["webhook-id"], int(headers["webhook-timestamp"])
        given = headers["webhook-signature"].split()
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, msg_id, timestamp, body)
    return any(hmac.compare_digest(expected, s) for s in given)


class ServerSecret:
    """The webhook secret of a server without keys (--no-auth): $CHATTERBOX_WEBHOOK_SECRET, else a random one
    made once and kept in the data dir (`webhook-secret`, 0600). Read at every use, so a rotation by one process
    is seen by the others on the same data dir."""

    def __init__(self, data_dir: str | os.PathLike):
        self.path = Path(data_dir) / SECRET_FILE

    @property
    def from_environment(self) -> bool:
        return bool(os.environ.get(SECRET_ENV))

    def get(self) -> str:
        env = os.environ.get(SECRET_ENV)
        if env:
            return env if env.startswith("whsec_") else "whsec_" + base64.b64encode(env.encode()).decode()
        try:
            return self.path.read_text().strip()
        except FileNotFoundError:
            pass
        self._write(_new_secret(), replace=False)
        return self.path.read_text().strip()

    def rotate(self) -> str:
        """A new secret (ValueError when it comes from the environment: change it there)."""
        if self.from_environment:
            raise ValueError(f"the webhook secret is set by {SECRET_ENV}; change it there")
        self._write(_new_secret(), replace=True)
        return self.path.read_text().strip()

    def _write(self, secret: str, replace: bool) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secret)
                f.flush()
                os.fsync(f.fileno())
            if replace:
                os.replace(tmp, self.path)
            else:
                try:
                    os.link(tmp, self.path)      # never replaces a secret another process made meanwhile
                except FileExistsError:
                    pass
        finally:
            tmp.unlink(missing_ok=True)


def _new_secret() -> str:
    from ..accounts.store import new_webhook_secret
    return new_webhook_secret()


def retry_delay(attempt: int, backoff: float) -> float:
    """Seconds from failed attempt `attempt` (1 = the first) to the next one."""
    return backoff * 2 ** max(0, attempt - 1)


# --- the dispatcher --------------------------------------------------------------------------------------------
class WebhookDispatcher:
    """Makes the due deliveries of a job store (see the module docstring). `render(job)`: the body;
    `secret_for(owner)`: the signing secret; `post(url, body, headers)`: the HTTP status (raises on failure:
    refused address, connection error, timeout)."""

    def __init__(self, store: JobStore, *, render: Render, secret_for: SecretFor, post: Post,
                 attempts: int = DEFAULT_ATTEMPTS, backoff: float = DEFAULT_BACKOFF, timeout: float = DEFAULT_TIMEOUT,
                 retention_seconds: float = 3600.0, concurrency: int = CONCURRENCY,
                 poll_interval: float = POLL_INTERVAL, claimer_id: str | None = None):
        if attempts < 1:
            raise ValueError("webhook attempts must be at least 1")
        self.store, self.render, self.secret_for, self.post = store, render, secret_for, post
        self.attempts, self.backoff, self.timeout = attempts, backoff, timeout
        self.retention_seconds = retention_seconds
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.claimer_id = claimer_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.lease_seconds = timeout + 30.0          # an attempt not reported by then was lost with its process
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None
        self._in_flight = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        self._stop.clear()
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="webhook")
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """A job ended in this process: look for due deliveries now."""
        self._wake.set()

    def stop(self) -> None:
        """Stop claiming. Attempts in flight go on in their (daemon) threads until their timeout; one cut short
        by the process's exit is claimed again after its lease, by this or another process."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.dispatch()
            except Exception:   # the store is away: try again at the next poll
                log.exception("webhook dispatch failed")
            self._wake.wait(self.poll_interval)
            self._wake.clear()

    def dispatch(self) -> int:
        """Claim what is due (up to the free threads) and start those attempts. Returns how many."""
        with self._lock:
            free = self.concurrency - self._in_flight
        if free <= 0 or self._pool is None:
            return 0
        deliveries = self.store.claim_webhooks(self.claimer_id, free, self.lease_seconds, self.attempts)
        for d in deliveries:
            with self._lock:
                self._in_flight += 1
            self._pool.submit(self._attempt_safely, d)
        return len(deliveries)

    def _attempt_safely(self, d: WebhookDelivery) -> None:
        try:
            self.attempt(d)
        except Exception:     # the outcome could not be recorded: the lease runs out and it is tried again
            log.exception("webhook delivery of %s failed", d.job_id, extra={"request_id": d.job_id})
        finally:
            with self._lock:
                self._in_flight -= 1

    def attempt(self, d: WebhookDelivery) -> str:
        """Make one claimed attempt and record it; returns the outcome ("delivered", "retry", "failed")."""
        job = self.store.get(d.job_id)
        if job is None or not job.webhook_url:
            self.store.finish_webhook(d.job_id, self.claimer_id, d.attempt, "failed", None, EXPIRED)
            return "failed"
        status, error = None, None
        try:
            body = self.render(job)
            timestamp = int(time.time())
            headers = {"webhook-id": job.id, "webhook-timestamp": str(timestamp),
                       "webhook-signature": sign(self.secret_for(job.owner), job.id, timestamp, body)}
        except Exception:   # noqa: BLE001 - the server's problem (its store, its secret): logged, not shown
            log.exception("could not prepare the webhook of %s", job.id, extra={"request_id": job.id})
            error = "the server could not prepare this attempt"
        else:
            try:
                status = self.post(job.webhook_url, body, headers)
            except MediaError as e:      # refused, unreachable, timed out: written for the owner of the URL
                error = str(e)[:300] or type(e).__name__
            except Exception:   # noqa: BLE001 - anything else is ours: logged, not shown
                log.exception("webhook attempt of %s failed", job.id, extra={"request_id": job.id})
                error = "the request could not be made"
        if status is not None and 200 <= status < 300:
            outcome, delay = "delivered", 0.0
        else:
            delay = retry_delay(d.attempt, self.backoff)
            expires = (job.finished_at or time.time()) + self.retention_seconds
            outcome = "retry" if d.attempt < self.attempts and time.time() + delay < expires else "failed"
        if not self.store.finish_webhook(job.id, self.claimer_id, d.attempt, outcome, status, error, delay):
            log.warning("webhook attempt %d of %s was reported too late (its lease ran out)", d.attempt, job.id,
                        extra={"request_id": job.id})
        log.info("webhook %s", outcome, extra={"request_id": job.id, "attempt": d.attempt, "status": status,
                                               "error": error})
        return outcome
