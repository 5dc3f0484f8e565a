"""Accounts as the API and the worker use them: keys, authentication, rate limits, holds/settle/release, repair.

Keys. `cbx_` + 43 characters of `secrets.token_urlsafe(32)` (256 random bits). Shown once at creation; only
their SHA-256 is stored. A plain (fast, unsalted) hash is the right tool here: slow salted KDFs (bcrypt,
argon2) exist to protect low-entropy passwords from guessing, and a 256-bit random key cannot be guessed
whatever the hash speed, while a slow KDF would cost tens of milliseconds of CPU on every request (a client
polls once a second per job). Lookup is by hash through a unique index, so nothing compares the secret byte
by byte (no timing oracle on the key). The first characters are kept (`key_prefix`) to recognise a key in
listings.

Credits. A request costs `max(minimum, ceil(audio_seconds * credits_per_second))`. At submit the service
HOLDS an estimate from the text length (conservative reading speed), and records its price with the hold;
nothing is queued unless the hold succeeds. The JOB STORE closes the hold with the job's terminal transition,
atomically (`JobStore.attach_billing(account_store)`, done by the service assembly): COMPLETED settles it at
the recorded price (whichever process completes the job), FAILED releases it (failed jobs are not billed). A
hold whose job was never queued (queue full) is given back with `cancel_hold`, which is not a failed job.
`reconcile` repairs what is left: holds whose job completed or failed in a store without billing attached, or
whose job vanished (a crash between hold and submit), matched against job states at start-up and periodically.
"""
from __future__ import annotations

import hashlib
import logging
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable

from .store import Account, AccountStore, InsufficientCredits, Usage, audio_seconds_of, charge_for

log = logging.getLogger(__name__)

KEY_PREFIX = "cbx_"
MAX_KEY_LENGTH = 200                  # anything longer is not one of our keys (and not worth hashing)
DEFAULT_RATE_PER_MIN = 60
BOOTSTRAP_ADMIN_CREDITS = 1_000_000   # the key a first `serve` makes: ~277 hours of audio at the default price


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_account_id() -> str:
    return "acc_" + secrets.token_hex(8)


def key_from_headers(x_api_key: str | None, authorization: str | None) -> str | None:
    """The key a request presents: `x-api-key: KEY`, or `Authorization: Bearer KEY`."""
    if x_api_key:
        return x_api_key.strip()
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return None


@dataclass(frozen=True)
class Pricing:
    credits_per_second: float = 1.0       # price of one second of audio
    minimum: int = 1                      # least a completed request costs
    # Hold estimate: speech runs ~12-18 characters/s in English; 10 is conservative so holds rarely fall short
    # (when one does, the settle charges the real cost as far as the balance allows, never below zero). Long
    # text is chunked by the engine, so the audio grows with the text: no fixed cap.
    hold_chars_per_second: float = 10.0
    hold_extra_seconds: float = 2.0

    def __post_init__(self) -> None:
        if not (self.credits_per_second >= 0 and self.minimum >= 0 and self.hold_chars_per_second > 0
                and self.hold_extra_seconds >= 0):
            raise ValueError("prices and the hold estimate must be non-negative")

    def cost(self, audio_seconds: float) -> int:
        return charge_for(audio_seconds, self.credits_per_second, self.minimum)

    def estimate(self, text: str, audio_seconds: float | None = None) -> int:
        """The hold for synthesising `text`; `audio_seconds`: the audio's length where it is known without text
        (voice conversion: its source's)."""
        seconds = len(text) / self.hold_chars_per_second if audio_seconds is None else audio_seconds
        return self.cost(seconds + self.hold_extra_seconds)


class AuthError(Exception):
    """401 (no key / unknown key) or 403 (revoked, or not an admin where one is required)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class RateLimited(Exception):
    def __init__(self, retry_after: float, rate_per_min: int):
        super().__init__(f"rate limit exceeded: {rate_per_min} submissions per minute for this key; "
                         f"retry in {math.ceil(retry_after)} s")
        self.retry_after = retry_after


class Accounts:
    def __init__(self, store: AccountStore, pricing: Pricing | None = None,
                 default_rate_per_min: int = DEFAULT_RATE_PER_MIN):
        self.store = store
        self.pricing = pricing or Pricing()
        self.default_rate_per_min = default_rate_per_min
        self._last_reconcile = float("-inf")

    # --- keys -----------------------------------------------------------------------------------------------
    def create_key(self, name: str = "", credits: int = 0, rate_per_min: int | None = None,
                   admin: bool = False) -> tuple[str, Account]:
        """Make a key. Returns (the key, shown only now; its account)."""
        if credits < 0:
            raise ValueError("credits must be >= 0")
        rate = self.default_rate_per_min if rate_per_min is None else rate_per_min
        if rate < 0:
            raise ValueError("rate must be >= 0 (0: unlimited)")
        key = generate_key()
        acc = Account(id=new_account_id(), name=name or "", key_hash=hash_key(key), key_prefix=key[:10],
                      admin=admin, rate_per_min=rate, balance=credits)
        return key, self.store.create(acc)

    def bootstrap_admin(self) -> str | None:
        """When no key exists at all, make one admin key and return it (to be shown once); else None."""
        if self.store.count() > 0:
            return None
        key, _ = self.create_key(name="admin (first start)", credits=BOOTSTRAP_ADMIN_CREDITS, admin=True)
        return key

    def resolve(self, key_or_id: str) -> Account | None:
        """An account from its key or its id (what the `keys` command and the admin API accept)."""
        if key_or_id.startswith(KEY_PREFIX):
            return self.store.get_by_key_hash(hash_key(key_or_id))
        return self.store.get(key_or_id)

    # --- per request ----------------------------------------------------------------------------------------
    def authenticate(self, key: str | None, admin: bool = False) -> Account:
        if not key:
            raise AuthError(401, "missing API key: send it in the x-api-key header (or Authorization: Bearer)")
        acc = None
        if len(key) <= MAX_KEY_LENGTH:
            acc = self.store.get_by_key_hash(hash_key(key))
        if acc is None:
            raise AuthError(401, "invalid API key")
        if acc.revoked:
            raise AuthError(403, "this API key has been revoked")
        if admin and not acc.admin:
            raise AuthError(403, "this endpoint needs an admin key")
        return acc

    def check_rate(self, acc: Account, now: float | None = None) -> None:
        """Count one submission against the key's rate; raise RateLimited when over it."""
        wait = self.store.take_token(acc.id, acc.rate_per_min, now)
        if wait > 0:
            raise RateLimited(wait, acc.rate_per_min)

    def hold_for(self, acc: Account, job_id: str, text: str, audio_seconds: float | None = None) -> Account:
        """Reserve the estimated cost of synthesising `text` (or of `audio_seconds` of audio, where that is known
        instead: voice conversion) for `job_id`, recording this service's price with the hold (the job is charged
        at it when it completes, wherever). Raises InsufficientCredits."""
        return self.store.hold(acc.id, job_id, self.pricing.estimate(text, audio_seconds),
                               per_second=self.pricing.credits_per_second, minimum=self.pricing.minimum)

    def settle(self, job_id: str, audio_seconds: float | None) -> Account | None:
        """Charge a completed job at the price recorded with its hold (not this service's: the submitter's).
        Unknown length (should not happen), or a hold without a recorded price: charge what was held."""
        return self.store.settle_job(job_id, audio_seconds)

    def release(self, job_id: str, reason: str = "") -> Account | None:
        """Give back the hold of a job that FAILED (counted as failed in `usage`)."""
        return self.store.release(job_id, note=reason[:200])

    def cancel_hold(self, job_id: str, reason: str = "") -> Account | None:
        """Give back the hold of a job that was never queued (the queue was full): not a failed job, so `usage`
        does not count it. Call it only when the job is known not to be stored (QueueFull); after an ambiguous
        store error leave the hold to `reconcile`, which settles it if the job exists after all. None when the
        job holds nothing."""
        return self.store.cancel(job_id, note=reason[:200])

    # --- repair ---------------------------------------------------------------------------------------------
    def reconcile(self, lookup_job: Callable[[str], Any], grace_seconds: float = 120.0,
                  now: float | None = None) -> dict[str, int]:
        """Close the holds whose job is over: settle COMPLETED jobs, release FAILED ones, and missing ones once
        older than `grace_seconds` (a younger one's job may be between the hold and store.submit).
        `lookup_job(job_id)` returns an object with `.state` (a JobState or its value) and `.metrics`, or
        None when the job is unknown or expired. Returns counts by action."""
        now = time.time() if now is None else now
        done = {"settled": 0, "released": 0, "open": 0}
        for hold in self.store.holds():
            job = lookup_job(hold.job_id)
            state = None if job is None else getattr(job.state, "value", job.state)
            if state == "COMPLETED":
                self.settle(hold.job_id, audio_seconds_of(job.metrics))
                done["settled"] += 1
            elif state == "FAILED" or (job is None and hold.created_at < now - grace_seconds):
                why = "job missing (expired, or never stored)" if job is None else (job.error or "failed")
                self.release(hold.job_id, f"reconciled: {why}")
                done["released"] += 1
            else:
                done["open"] += 1
        if done["settled"] or done["released"]:
            log.info("accounts: reconciled holds: %s", done)
        return done

    def maybe_reconcile(self, lookup_job: Callable[[str], Any], interval: float = 15.0,
                        grace_seconds: float = 120.0) -> dict[str, int] | None:
        """`reconcile` at most once per `interval` seconds (the first call runs at once: start-up repair).
        For a maintenance loop; never raises."""
        now = time.monotonic()
        if now - self._last_reconcile < interval:
            return None
        self._last_reconcile = now
        try:
            return self.reconcile(lookup_job, grace_seconds)
        except Exception:  # noqa: BLE001 - retried at the next interval
            log.exception("accounts: reconcile failed")
            return None

    # --- reporting ------------------------------------------------------------------------------------------
    def summary(self, acc: Account, since: float | None = None) -> dict:
        usage: Usage = self.store.usage(acc.id, since)
        body = acc.public()
        body["usage"] = vars(usage)
        body["pricing"] = {"credits_per_second": self.pricing.credits_per_second, "minimum": self.pricing.minimum}
        return body


__all__ = ["Accounts", "AuthError", "InsufficientCredits", "Pricing", "RateLimited", "KEY_PREFIX",
           "generate_key", "hash_key", "key_from_headers", "audio_seconds_of"]
