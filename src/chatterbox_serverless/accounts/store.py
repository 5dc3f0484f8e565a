"""The account store interface. Implementations: SQLite (accounts/sqlite_store.py, same database file as the
job store) and Redis (later, same contract: tests/test_accounts.py is parametrised by backend).

Money model. Amounts are whole credits (int). An account has a `balance` (credits it owns) and `held` (the
sum of its open holds). `available = balance - held` is what a new request may reserve.

    grant/adjust   balance += delta                    (admin: `keys credits`, POST /v1/admin/keys/{id}/credits)
    hold           held += amount                      (submit; only if available >= amount, else refused)
    settle         held -= hold; balance -= charge     (job COMPLETED; charge <= available + hold, see below)
    release        held -= hold                        (job FAILED or lost: failed jobs are not billed)
    cancel         held -= hold                        (the job was never queued, e.g. the queue was full: not a
                                                        failed job, so `usage` does not count it)

Pricing travels with the hold: `hold` records the price in force where the job was submitted (credits per
second, minimum), and `settle_job` charges the job's audio seconds at that recorded price, whichever process
completes it. The job stores close holds in the same transaction (SQLite) or script (Redis) as the job's
terminal transition once `JobStore.attach_billing(account_store)` was called: see `settle_in`/`release_in` of
the SQLite store and `BILLING_LUA` of the Redis store.

Every change writes one ledger entry carrying `delta` (change of balance) and `hold_delta` (change of held),
so `balance == sum(delta)` and `held == sum(hold_delta)` over an account's ledger, always: every balance is
explainable. Each operation is atomic (one transaction / one script), so two submissions racing for the last
credits cannot both hold them, a hold is settled or released at most once, and balance never goes negative.

Rate limiting of submissions is part of the store so that every API instance sharing a backend shares the
buckets (`take_token`).

Webhook secrets: each account has one (`webhook_secret`, made on first use, `rotate_webhook_secret` replaces
it), kept beside the account so that every process delivering webhooks signs with the same one. Format: the
Standard Webhooks one, "whsec_" + base64 of 32 random bytes (jobs/webhooks.py signs with the decoded bytes).
"""
from __future__ import annotations

import base64
import math
import secrets
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field


@dataclass
class Account:
    id: str                                   # public, not secret: "acc_" + random hex
    name: str
    key_hash: str                             # sha256 hex of the key; the key itself is never stored
    key_prefix: str                           # first characters of the key, to recognise it in listings
    admin: bool = False
    revoked: bool = False
    rate_per_min: int = 60                    # submissions per minute (token bucket, burst = rate); 0: unlimited
    balance: int = 0                          # credits owned
    held: int = 0                             # credits reserved by open holds
    created_at: float = field(default_factory=time.time)

    @property
    def available(self) -> int:
        return self.balance - self.held

    def public(self) -> dict:
        """What may be shown to the key's owner or an admin (no hash)."""
        d = asdict(self)
        d.pop("key_hash")
        d["available"] = self.available
        return d


@dataclass
class Hold:
    job_id: str
    account_id: str
    amount: int
    created_at: float
    per_second: float | None = None           # the price recorded at hold time (None: a hold made before
    minimum: int | None = None                # prices were recorded; settled by charging `amount`)


@dataclass
class LedgerEntry:
    id: int
    account_id: str
    at: float
    kind: str                                 # "grant" | "adjust" | "hold" | "settle" | "release" | "cancel"
    delta: int                                # change of balance
    hold_delta: int                           # change of held
    balance_after: int
    held_after: int
    job_id: str | None = None
    seconds: float | None = None              # audio seconds billed (settle)
    note: str = ""


@dataclass
class Usage:
    completed: int = 0                        # settled requests
    failed: int = 0                           # released holds (failed jobs, not billed; cancelled holds of
                                              # jobs never queued are not counted)
    audio_seconds: float = 0.0
    credits_spent: int = 0
    open_holds: int = 0


def charge_for(audio_seconds: float, per_second: float, minimum: int) -> int:
    """What `audio_seconds` of audio cost at `per_second` credits a second, at least `minimum` (whole credits,
    rounded up; float noise below 1e-9 credit is not rounded up). `Pricing.cost` and both stores' settlement
    use this rule (the Redis store's Lua repeats it in the same double arithmetic)."""
    raw = max(0.0, audio_seconds) * per_second
    return max(int(minimum), math.ceil(raw - 1e-9))


def audio_seconds_of(metrics: dict | None) -> float | None:
    """Audio seconds a completed job produced, from its metrics (None when it did not say)."""
    value = (metrics or {}).get("audio_seconds")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    return None


UNKNOWN_LENGTH_NOTE = "audio length unknown: charged the hold"
UNPRICED_NOTE = "no price recorded with the hold: charged the hold"


def new_webhook_secret() -> str:
    """A fresh webhook signing secret: "whsec_" + base64 of 32 random bytes (Standard Webhooks)."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class InsufficientCredits(Exception):
    """Not enough available credits for a hold, or a debit below zero: the API answers 406."""

    def __init__(self, needed: int, available: int):
        super().__init__(f"insufficient credits: this request needs {needed}, {available} available")
        self.needed = needed
        self.available = available


class UnknownAccount(KeyError):
    pass


class DuplicateHold(Exception):
    """A hold for this job id already exists (a job is held once)."""


def check_hold(amount: int, per_second: float | None, minimum: int | None) -> None:
    """The arguments of `AccountStore.hold` every implementation refuses alike."""
    if amount < 0:
        raise ValueError("a hold is >= 0")
    if (per_second is None) != (minimum is None):
        raise ValueError("record both the price per second and the minimum, or neither")


class AccountStore(ABC):
    # --- keys -----------------------------------------------------------------------------------------------
    @abstractmethod
    def create(self, account: Account) -> Account:
        """Insert a new account. Its initial `balance` (if > 0) is written as a "grant" ledger entry; `held`
        must be 0. Returns the stored account."""

    @abstractmethod
    def get(self, account_id: str) -> Account | None: ...

    @abstractmethod
    def get_by_key_hash(self, key_hash: str) -> Account | None: ...

    @abstractmethod
    def list(self) -> list[Account]:
        """All accounts, oldest first."""

    @abstractmethod
    def count(self) -> int: ...

    @abstractmethod
    def set_revoked(self, account_id: str, revoked: bool = True) -> Account:
        """Raises UnknownAccount."""

    @abstractmethod
    def update_limits(self, account_id: str, *, rate_per_min: int | None = None, admin: bool | None = None,
                      name: str | None = None) -> Account:
        """Change the settings given (None: unchanged). Raises UnknownAccount."""

    # --- credits --------------------------------------------------------------------------------------------
    @abstractmethod
    def adjust(self, account_id: str, delta: int, note: str = "") -> Account:
        """Add (delta > 0, kind "grant") or remove (delta < 0, kind "adjust") credits. A removal may not take
        the balance below what open holds reserve: raises InsufficientCredits. Raises UnknownAccount."""

    @abstractmethod
    def hold(self, account_id: str, job_id: str, amount: int, now: float | None = None, *,
             per_second: float | None = None, minimum: int | None = None) -> Account:
        """Reserve `amount` credits for `job_id`, atomically, only if available >= amount; else raise
        InsufficientCredits (nothing changes). Raises DuplicateHold, UnknownAccount. `per_second` and `minimum`
        record the price the job will be charged at (`settle_job`); give both or neither."""

    @abstractmethod
    def settle(self, job_id: str, cost: int, seconds: float | None = None, note: str = "") -> Account | None:
        """Close the hold of `job_id` and charge `cost`, capped at what the account can pay without touching
        its other holds (available + this hold): the balance never goes negative. A capped charge says so in
        the entry's note. Returns the account, or None when the job holds nothing (already settled or
        released, or never held): settling twice charges once."""

    @abstractmethod
    def settle_job(self, job_id: str, audio_seconds: float | None, note: str = "") -> Account | None:
        """Close the hold of `job_id` charging `audio_seconds` at the price recorded with the hold
        (`charge_for`), capped as `settle` caps. A hold without a recorded price, or an unknown length (None),
        is charged the hold's amount. None when the job holds nothing: settling twice charges once."""

    @abstractmethod
    def release(self, job_id: str, note: str = "") -> Account | None:
        """Close the hold of `job_id` without charging (the job failed). None when the job holds nothing."""

    @abstractmethod
    def cancel(self, job_id: str, note: str = "") -> Account | None:
        """Close the hold of a job that was never queued (the queue was full, the submission was not stored),
        without charging, as a "cancel" entry: `usage` does not count it as a failed job. None when the job
        holds nothing."""

    @abstractmethod
    def holds(self, older_than: float | None = None) -> list[Hold]:
        """Open holds (created before `older_than`, a timestamp, when given), oldest first."""

    @abstractmethod
    def get_hold(self, job_id: str) -> Hold | None: ...

    # --- reporting ------------------------------------------------------------------------------------------
    @abstractmethod
    def ledger(self, account_id: str, limit: int = 100) -> list[LedgerEntry]:
        """The newest `limit` entries of an account, oldest first (limit <= 0: all)."""

    @abstractmethod
    def usage(self, account_id: str, since: float | None = None) -> Usage: ...

    # --- webhook secrets ------------------------------------------------------------------------------------
    @abstractmethod
    def webhook_secret(self, account_id: str) -> str:
        """The account's webhook signing secret, made (atomically: concurrent first calls agree) on first use.
        Raises UnknownAccount."""

    @abstractmethod
    def rotate_webhook_secret(self, account_id: str) -> str:
        """Replace the account's webhook secret with a new one and return it (deliveries from now on are
        signed with it). Raises UnknownAccount."""

    # --- rate limiting --------------------------------------------------------------------------------------
    @abstractmethod
    def take_token(self, account_id: str, rate_per_min: int, now: float | None = None) -> float:
        """Token bucket per account: capacity `rate_per_min`, refilled at `rate_per_min` per 60 s. Take one
        token and return 0.0, or, when empty, take nothing and return the seconds until one is available.
        `rate_per_min <= 0` means unlimited."""

    def close(self) -> None:
        pass
