"""Accounts over HTTP: the gate the API calls per request, the `x-remaining-credits` header, the account and
admin endpoints, and start-up (first admin key, --no-auth warning).

The API uses it in three places:
  - every endpoint: `gate.authenticate(request)` -> owner id ("" when auth is off); 401/403 otherwise
  - submit (v1 and v2): `gate.charge_submission(request, job_id, text)` before the job is stored (429 over the
    key's rate, 406 when the hold cannot be paid), and `gate.refund_submission(job_id)` if storing then fails
  - the worker: `accounts.finish(...)` settles/releases; its maintenance calls `accounts.maybe_reconcile(...)`
    (so does the API's Janitor when workers run in other processes: they do not bill, the API does, at its own
    prices, within ~20 s of the job's end)

Errors are `AccountsHTTPError(status, message, headers)`, rendered as `{"error": message}` by the handler
`install()` registers.
"""
from __future__ import annotations

import ipaddress
import logging
import sys
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Security
from fastapi.security import APIKeyHeader, HTTPBearer
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .service import Accounts, AuthError, RateLimited, key_from_headers
from .store import Account, InsufficientCredits, UnknownAccount

log = logging.getLogger(__name__)

STATE_ACCOUNT = "account"                 # request.state.account: the authenticated Account
STATE_REMAINING = "remaining_credits"     # request.state.remaining_credits: what x-remaining-credits says
API_KEY_HEADER = APIKeyHeader(name="x-api-key", auto_error=False, scheme_name="ApiKey",
                              description="The API key (`chatterbox-serverless keys create`, or printed at first start).")
BEARER = HTTPBearer(auto_error=False, scheme_name="Bearer", description="The API key as a Bearer token.")


class AccountsHTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def error_response(e: AccountsHTTPError) -> JSONResponse:
    return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)


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
        """The owner id of the request's key. Raises AccountsHTTPError 401/403 (and 404 for the admin API
        when auth is off: there are no accounts to administer)."""
        if self.accounts is None:
            if admin:
                raise AccountsHTTPError(404, "accounts are disabled on this server (--no-auth)")
            return ""
        key = key_from_headers(request.headers.get("x-api-key"), request.headers.get("authorization"))
        try:
            acc = self.accounts.authenticate(key, admin=admin)
        except AuthError as e:
            headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
            raise AccountsHTTPError(e.status, e.message, headers) from None
        setattr(request.state, STATE_ACCOUNT, acc)
        setattr(request.state, STATE_REMAINING, acc.available)
        return acc.id

    def charge_submission(self, request: Request, job_id: str, text: str) -> None:
        """Count the submission against the key's rate, then hold the request's estimated cost. Call after
        the parameters are validated and before the job is stored."""
        if self.accounts is None:
            return
        acc: Account = getattr(request.state, STATE_ACCOUNT)
        try:
            self.accounts.check_rate(acc)
        except RateLimited as e:
            retry = max(1, int(e.retry_after + 0.999))
            raise AccountsHTTPError(429, str(e), {"Retry-After": str(retry)}) from None
        try:
            acc = self.accounts.hold_for(acc, job_id, text)
        except InsufficientCredits as e:
            setattr(request.state, STATE_REMAINING, e.available)
            raise AccountsHTTPError(406, f"{e}; add credits to this key "
                                         "(`chatterbox-serverless keys credits KEY +N`, or the admin API)") from None
        except UnknownAccount:   # deleted between authenticate and now
            raise AccountsHTTPError(401, "invalid API key") from None
        setattr(request.state, STATE_ACCOUNT, acc)
        setattr(request.state, STATE_REMAINING, acc.available)

    def refund_submission(self, request: Request | None, job_id: str, reason: str = "not queued") -> None:
        """The job was held for but not stored (queue full, store error): give the hold back."""
        if self.accounts is None:
            return
        try:
            acc = self.accounts.release(job_id, reason)
        except Exception:  # noqa: BLE001 - reconcile releases it later (the job does not exist)
            log.exception("accounts: could not release the hold of %s (reconcile will)", job_id)
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


# --- the account and admin endpoints -------------------------------------------------------------------------
class CreateKeyBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field("", max_length=200, description="A label for the key.")
    credits: int = Field(0, ge=0, le=10**15, description="Initial credits.")
    rate_per_min: int | None = Field(None, ge=0, le=10**9,
                                     description="Submissions per minute (0: unlimited; omitted: the default).")
    admin: bool = Field(False, description="May call the admin API.")


class CreditsBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    amount: int = Field(description="Credits to add (> 0) or remove (< 0).", ge=-10**15, le=10**15)
    note: str = Field("", max_length=500, description="Why (kept in the ledger).")


def _body_doc(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": model.model_json_schema()}}}}


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    try:
        data = await request.json()
    except Exception:  # noqa: BLE001 - any undecodable body is the client's error
        raise AccountsHTTPError(400, "the request body must be a JSON object") from None
    if not isinstance(data, dict):
        raise AccountsHTTPError(400, "the request body must be a JSON object")
    # JSON has one number type: 25.0 is the integer 25 (as JSON Schema says); 25.5 stays invalid.
    data = {k: int(v) if isinstance(v, float) and v.is_integer() and abs(v) <= 2**53 else v for k, v in data.items()}
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        where = ".".join(str(x) for x in err.get("loc", ())) or "body"
        raise AccountsHTTPError(400, f"parameter '{where}': {err.get('msg')}") from None


_ERRORS = {status: {"description": text, "content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}}}}
    for status, text in [(400, "Invalid parameters"), (401, "Missing or invalid API key"),
                         (403, "Revoked key, or not an admin"), (404, "Unknown account")]}


LEDGER_QUERY = Query(20, ge=0, le=1000, description="How many of the latest ledger entries to include.")
SINCE_QUERY = Query(None, description="Count usage from this Unix time on (default: since the key was made).")


def make_router(gate: AccountGate) -> APIRouter:
    router = APIRouter(tags=["accounts"], responses=_ERRORS)

    def _summary(acc: Account, ledger: int = 0, since: float | None = None) -> dict:
        assert gate.accounts is not None
        body = gate.accounts.summary(acc, since)
        if ledger > 0:
            body["ledger"] = [vars(e) for e in gate.accounts.store.ledger(acc.id, ledger)]
        return body

    def _account_or_404(account_id: str) -> Account:
        assert gate.accounts is not None
        acc = gate.accounts.store.get(account_id)
        if acc is None:
            raise AccountsHTTPError(404, f"no account {account_id[:64]!r}")
        return acc

    @router.get("/v1/account", summary="This key's balance, usage and latest ledger entries")
    def get_account(request: Request, ledger: int = LEDGER_QUERY, since: float | None = SINCE_QUERY,
                    _: str = Depends(gate.dependency)) -> dict:
        if gate.accounts is None:
            raise AccountsHTTPError(404, "accounts are disabled on this server (--no-auth)")
        return _summary(getattr(request.state, STATE_ACCOUNT), ledger, since)

    @router.get("/v1/admin/keys", summary="Admin: every key with its balance and usage")
    def list_keys(request: Request, since: float | None = SINCE_QUERY,
                  _: str = Depends(gate.admin_dependency)) -> list[dict]:
        assert gate.accounts is not None
        return [_summary(a, since=since) for a in gate.accounts.store.list()]

    @router.post("/v1/admin/keys", status_code=201, openapi_extra=_body_doc(CreateKeyBody),
                 summary="Admin: create a key (the key is in this answer only)")
    async def create_key(request: Request, _: str = Depends(gate.admin_dependency)) -> dict:
        body = await _parse(request, CreateKeyBody)
        assert gate.accounts is not None
        key, acc = gate.accounts.create_key(body.name, body.credits, body.rate_per_min, body.admin)
        log.info("admin %s created key %s (%s)", getattr(request.state, STATE_ACCOUNT).id, acc.id, acc.name)
        return {"key": key, "account": _summary(acc)}

    @router.get("/v1/admin/keys/{account_id}", summary="Admin: one key's balance, usage and ledger")
    def get_key(request: Request, account_id: str, ledger: int = LEDGER_QUERY, since: float | None = SINCE_QUERY,
                _: str = Depends(gate.admin_dependency)) -> dict:
        return _summary(_account_or_404(account_id), ledger, since)

    @router.post("/v1/admin/keys/{account_id}/revoke", summary="Admin: revoke a key")
    def revoke_key(request: Request, account_id: str, _: str = Depends(gate.admin_dependency)) -> dict:
        assert gate.accounts is not None
        acc = gate.accounts.store.set_revoked(_account_or_404(account_id).id, True)
        log.info("admin %s revoked key %s", getattr(request.state, STATE_ACCOUNT).id, acc.id)
        return _summary(acc)

    @router.post("/v1/admin/keys/{account_id}/credits", openapi_extra=_body_doc(CreditsBody),
                 summary="Admin: add or remove credits", responses={406: {"description": "Not enough credits"}})
    async def add_credits(request: Request, account_id: str, _: str = Depends(gate.admin_dependency)) -> dict:
        body = await _parse(request, CreditsBody)
        acc = _account_or_404(account_id)
        assert gate.accounts is not None
        try:
            acc = gate.accounts.store.adjust(acc.id, body.amount, body.note or "admin API")
        except InsufficientCredits as e:
            raise AccountsHTTPError(406, f"cannot remove {-body.amount} credits: {e.available} available") from None
        if acc.id == getattr(request.state, STATE_ACCOUNT).id:
            setattr(request.state, STATE_REMAINING, acc.available)
        return _summary(acc)

    return router


def install(app: FastAPI, gate: AccountGate) -> None:
    """Register the error handler, the x-remaining-credits middleware and the account/admin routes."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, AccountsHTTPError)
        return error_response(exc)

    app.add_exception_handler(AccountsHTTPError, handle)
    app.add_middleware(RemainingCreditsMiddleware)
    app.include_router(make_router(gate))


# --- start-up -------------------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class StartupNotice:
    admin_key: str | None = None              # created now: to be shown once


def prepare(accounts: Accounts | None, host: str, keys_where: str = "", out: Any = None) -> StartupNotice:
    """At `serve` start: warn when auth is off beyond loopback; with auth on and no key at all, make one admin
    key and print it once (to `out`, stderr by default; never into the logs), with how to make more.
    `keys_where`: the `keys` command's store option matching this server, e.g. "--data-dir ./data"."""
    out = out or sys.stderr
    if accounts is None:
        if not is_loopback(host):
            log.warning("authentication is OFF (--no-auth) and the server listens on %s: anyone who can reach "
                        "it can use it. Use --no-auth only on a trusted network, or drop it.", host)
        return StartupNotice()
    key = accounts.bootstrap_admin()
    if key:
        print("\n" + "=" * 78 + "\n"
              "No API key existed, so an admin key was created. It is shown only now: store it.\n\n"
              f"    {key}\n\n"
              "Send it as the x-api-key header, e.g.\n"
              f"    curl -H 'x-api-key: {key}' http://HOST:PORT/v1/account\n"
              f"More keys: chatterbox-serverless keys create {keys_where + ' ' if keys_where else ''}"
              "--credits 1000 --name app\n"
              "      (or POST /v1/admin/keys with this admin key).\n" + "=" * 78 + "\n", file=out, flush=True)
        log.warning("no API key existed: created one admin key (printed once on stderr); make more with "
                    "`chatterbox-serverless keys create`")
    else:
        n = accounts.store.count()
        log.info("authentication on: %d key(s) in the store", n)
    return StartupNotice(admin_key=key)
