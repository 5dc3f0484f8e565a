"""Keys and credits as the HTTP layer uses them: the `AccountGate` (authentication dependency, rate limit and
credit hold at submit) and the `x-remaining-credits` header.

  - every endpoint: `Depends(gate.dependency)` -> owner id ("" when auth is off); 401/403 otherwise
  - submit: `gate.charge_submission(request, job_id, text)` before the job is stored (429 over the key's rate,
    406 when the hold cannot be paid), and `gate.cancel_submission(request, job_id)` if storing then fails
  - settlement is the job store's (atomic with the job's terminal transition), not the HTTP layer's.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPBearer

from ..accounts.service import Accounts, AuthError, RateLimited, key_from_headers
from ..accounts.store import Account, InsufficientCredits, UnknownAccount
from .errors import ApiError

log = logging.getLogger("chatterbox_serverless.api")

STATE_ACCOUNT = "account"                 # request.state.account: the authenticated Account
STATE_REMAINING = "remaining_credits"     # request.state.remaining_credits: what x-remaining-credits says
API_KEY_HEADER = APIKeyHeader(name="x-api-key", auto_error=False, scheme_name="ApiKey",
                              description="The API key (`chatterbox-serverless keys create`, or printed at first start).")
BEARER = HTTPBearer(auto_error=False, scheme_name="Bearer", description="The API key as a Bearer token.")


class AccountGate:
    """What the API asks of accounts. `accounts=None`: auth is off (--no-auth), everyone is owner ""."""

    def __init__(self, accounts: Accounts | None):
        self.accounts = accounts

    @property
    def enabled(self) -> bool:
        return self.accounts is not None

    @property
    def dependency(self):
        """`authenticate` as a FastAPI dependency: `owner: str = Depends(gate.dependency)`. The two security
        declarations only document the key in the OpenAPI spec (the docs page gets an Authorize button);
        the headers are read by `authenticate`."""
        def authenticate(request: Request, _key: Any = Security(API_KEY_HEADER),
                         _bearer: Any = Security(BEARER)) -> str:
            return self.authenticate(request)
        return authenticate

    @property
    def admin_dependency(self):
        """Like `dependency`, for admin endpoints (403 for a non-admin key)."""
        def authenticate_admin(request: Request, _key: Any = Security(API_KEY_HEADER),
                               _bearer: Any = Security(BEARER)) -> str:
            return self.authenticate(request, admin=True)
        return authenticate_admin

    def authenticate(self, request: Request, admin: bool = False) -> str:
        """The owner id of the request's key. Raises ApiError 401/403 (and 404 for the admin API when auth is
        off: there are no accounts to administer)."""
        if self.accounts is None:
            if admin:
                raise ApiError(404, "accounts are disabled on this server (--no-auth)")
            return ""
        key = key_from_headers(request.headers.get("x-api-key"), request.headers.get("authorization"))
        try:
            acc = self.accounts.authenticate(key, admin=admin)
        except AuthError as e:
            headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
            raise ApiError(e.status, e.message, headers) from None
        setattr(request.state, STATE_ACCOUNT, acc)
        setattr(request.state, STATE_REMAINING, acc.available)
        return acc.id

    def charge_submission(self, request: Request, job_id: str, text: str, audio_seconds: float | None = None) -> None:
        """Count the submission against the key's rate, then hold the request's estimated cost (from `text`, or
        `audio_seconds` where the audio's length is known instead). Call after the parameters are validated and
        before the job is stored."""
        if self.accounts is None:
            return
        acc: Account = getattr(request.state, STATE_ACCOUNT)
        try:
            self.accounts.check_rate(acc)
        except RateLimited as e:
            retry = max(1, int(e.retry_after + 0.999))
            raise ApiError(429, str(e), {"Retry-After": str(retry)}) from None
        try:
            acc = self.accounts.hold_for(acc, job_id, text, audio_seconds)
        except InsufficientCredits as e:
            setattr(request.state, STATE_REMAINING, e.available)
            raise ApiError(406, f"{e}; add credits to this key "
                                "(`chatterbox-serverless keys credits KEY +N`, or the admin API)") from None
        except UnknownAccount:   # deleted between authenticate and now
            raise ApiError(401, "invalid API key") from None
        setattr(request.state, STATE_ACCOUNT, acc)
        setattr(request.state, STATE_REMAINING, acc.available)

    def cancel_submission(self, request: Request | None, job_id: str, reason: str = "not queued") -> None:
        """The job was held for but never stored (queue full, store error): give the hold back. Not a failed job:
        it does not count in the key's usage."""
        if self.accounts is None:
            return
        try:
            acc = self.accounts.cancel_hold(job_id, reason)
        except Exception:  # noqa: BLE001 - reconcile releases it later (the job does not exist)
            log.exception("accounts: could not give back the hold of %s (reconcile will)", job_id)
            return
        if acc is not None and request is not None:
            setattr(request.state, STATE_REMAINING, acc.available)


class RemainingCreditsMiddleware:
    """Adds `x-remaining-credits` (the key's available credits) to every response of an authenticated request.
    Pure ASGI (no body buffering): it reads request.state, which lives in scope["state"]."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})

        async def send_with_credits(message: dict) -> None:
            if message["type"] == "http.response.start":
                remaining = scope["state"].get(STATE_REMAINING)
                if remaining is not None:
                    headers = list(message.get("headers", []))
                    headers.append((b"x-remaining-credits", str(remaining).encode()))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_credits)
