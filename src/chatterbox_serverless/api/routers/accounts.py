"""Accounts and admin: GET /v1/account (this key's balance, usage, ledger), GET /v1/account/webhook-secret and
POST /v1/account/webhook-secret/rotate (the secret this key's webhooks are signed with; with --no-auth, the
server's), and /v1/admin/keys... (admin keys only: create, list, show, revoke, add or remove credits)."""
from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...accounts.store import Account, InsufficientCredits
from ..auth import STATE_ACCOUNT, STATE_REMAINING, AccountGate
from ..context import ApiContext
from ..errors import ERROR_RESPONSES, ApiError, echo

log = logging.getLogger("chatterbox_serverless.api")


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


async def _parse(ctx: ApiContext, request: Request, model: type[BaseModel]) -> Any:
    raw = await ctx.read_json_body(request, limit=64 * 1024)
    try:
        data = json.loads(raw)
    except ValueError:
        raise ApiError(400, "the request body must be a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    # JSON has one number type: 25.0 is the integer 25 (as JSON Schema says); 25.5 stays invalid.
    data = {k: int(v) if isinstance(v, float) and v.is_integer() and abs(v) <= 2**53 else v for k, v in data.items()}
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        where = ".".join(str(x) for x in err.get("loc", ())) or "body"
        raise ApiError(400, f"parameter '{where}': {err.get('msg')}") from None


_ERRORS = {code: ERROR_RESPONSES[code] for code in (400, 401, 403, 404)}


def _secret_body(secret: str) -> dict:
    return {"secret": secret, "scheme": "Standard Webhooks v1: webhook-signature = 'v1,' + base64(HMAC-SHA256(key, "
                                        "webhook-id + '.' + webhook-timestamp + '.' + body)), key = base64-decoded "
                                        "secret after 'whsec_'"}


LEDGER_QUERY = Query(20, ge=0, le=1000, description="How many of the latest ledger entries to include.")
SINCE_QUERY = Query(None, description="Count usage from this Unix time on (default: since the key was made).")


def router(ctx: ApiContext) -> APIRouter:
    gate: AccountGate = ctx.gate
    router = APIRouter(tags=["accounts"], responses=_ERRORS)

    def _summary(acc: Account, ledger: int = 0, since: float | None = None) -> dict:
        assert gate.accounts is not None
        if since is not None and not math.isfinite(since):
            raise ApiError(400, "parameter 'since': must be a finite Unix time")
        body = gate.accounts.summary(acc, since)
        if ledger > 0:
            body["ledger"] = [vars(e) for e in gate.accounts.store.ledger(acc.id, ledger)]
        return body

    def _account_or_404(account_id: str) -> Account:
        assert gate.accounts is not None
        acc = gate.accounts.store.get(account_id)
        if acc is None:
            raise ApiError(404, f"no account {echo(account_id)!r}")
        return acc

    @router.get("/v1/account", summary="This key's balance, usage and latest ledger entries")
    def get_account(request: Request, ledger: int = LEDGER_QUERY, since: float | None = SINCE_QUERY,
                    _: str = Depends(gate.dependency)) -> dict:
        if gate.accounts is None:
            raise ApiError(404, "accounts are disabled on this server (--no-auth)")
        return _summary(getattr(request.state, STATE_ACCOUNT), ledger, since)

    @router.get("/v1/account/webhook-secret", summary="The secret this key's webhooks are signed with")
    def get_webhook_secret(owner: str = Depends(gate.dependency)) -> dict:
        return _secret_body(ctx.service.webhook_secret(owner))

    @router.post("/v1/account/webhook-secret/rotate", summary="Replace this key's webhook secret",
                 responses={409: {"description": "The secret is set by the server's environment"}})
    def rotate_webhook_secret(request: Request, owner: str = Depends(gate.dependency)) -> dict:
        if gate.accounts is None:        # --no-auth: the server's own secret
            from ...jobs.webhooks import ServerSecret
            try:
                secret = ServerSecret(ctx.settings.data_dir).rotate()
            except ValueError as e:
                raise ApiError(409, str(e)) from None
        else:
            secret = gate.accounts.store.rotate_webhook_secret(owner)
        log.info("webhook secret rotated", extra={"owner": owner or None})
        return _secret_body(secret)

    @router.get("/v1/admin/keys", summary="Admin: every key with its balance and usage")
    def list_keys(request: Request, since: float | None = SINCE_QUERY,
                  _: str = Depends(gate.admin_dependency)) -> list[dict]:
        assert gate.accounts is not None
        return [_summary(a, since=since) for a in gate.accounts.store.list()]

    @router.post("/v1/admin/keys", status_code=201, openapi_extra=_body_doc(CreateKeyBody),
                 summary="Admin: create a key (the key is in this answer only)")
    async def create_key(request: Request, _: str = Depends(gate.admin_dependency)) -> dict:
        body = await _parse(ctx, request, CreateKeyBody)
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
        body = await _parse(ctx, request, CreditsBody)
        acc = _account_or_404(account_id)
        assert gate.accounts is not None
        try:
            acc = gate.accounts.store.adjust(acc.id, body.amount, body.note or "admin API")
        except InsufficientCredits as e:
            raise ApiError(406, f"cannot remove {-body.amount} credits: {e.available} available") from None
        if acc.id == getattr(request.state, STATE_ACCOUNT).id:
            setattr(request.state, STATE_REMAINING, acc.available)
        return _summary(acc)

    return router
