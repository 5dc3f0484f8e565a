"""Redis account store: keys, credits and rate limits shared by every API replica of a Redis deployment.

Each write is one Lua script, atomic on the Redis server: the availability check and the hold it allows cannot
interleave with another replica's, so two replicas racing for the last credits cannot both win (no double
spend), and a hold is settled or released at most once. Keys live beside the job store's (same prefix):

    acct:<id>          hash    the account (balance, held, settings)
    acctkey:<sha256>   string  account id by key hash (authentication)
    accts              zset    account ids by created_at (listing)
    hold:<job id>      hash    an open hold (account_id, amount, created_at; per_second and minimum: the price
                               recorded at hold time, absent on holds made before prices were recorded)
    holds              zset    open holds by created_at
    acctholds:<id>     set     an account's open holds
    ledger:<id>        list    the account's ledger entries (JSON), oldest first
    ledger-seq         counter ledger entry ids
    bucket:<id>        hash    the submission token bucket (tokens, updated)

Billing with the job's transition: `BILLING_LUA` (the hold-closing functions, `billing_settle` and
`billing_release`) is composed into the job store's complete/fail/recover scripts by
`RedisJobStore.attach_billing(account_store)`, so closing a job's hold is part of the same atomic script as
its terminal transition: a reader never sees a COMPLETED job whose hold is still open.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import redis

from ..jobs.store import StoreUnavailable
from .store import (check_hold, UNKNOWN_LENGTH_NOTE, UNPRICED_NOTE, Account, AccountStore, DuplicateHold, Hold,
                    InsufficientCredits, LedgerEntry, UnknownAccount, Usage, new_webhook_secret)

# The accounts' functions, for the scripts below and for the job store's scripts (`BILLING_LUA`): they need
# `P` (the key prefix) defined before them.
_FUNCS = r"""
local function acct_fields(k)
  return redis.call('HGETALL', k)
end
-- change balance/held of an account and append the ledger entry that explains it
local function acct_apply(id, kind, delta, hold_delta, job_id, seconds, note, at)
  local k = P .. 'acct:' .. id
  local balance = redis.call('HINCRBY', k, 'balance', delta)
  local held = redis.call('HINCRBY', k, 'held', hold_delta)
  local seq = redis.call('INCR', P .. 'ledger-seq')
  redis.call('RPUSH', P .. 'ledger:' .. id, cjson.encode({
    id = seq, account_id = id, at = at, kind = kind, delta = delta, hold_delta = hold_delta,
    balance_after = balance, held_after = held, job_id = job_id, seconds = seconds, note = note}))
  return acct_fields(k)
end
local function acct_account(id)
  local k = P .. 'acct:' .. id
  if redis.call('EXISTS', k) == 0 then return nil end
  local h = redis.call('HMGET', k, 'balance', 'held')
  return k, tonumber(h[1]), tonumber(h[2])
end
-- Close the hold of job_id; nil when there is none, else the account's fields. mode: 'release' | 'cancel' (no
-- charge) | 'settle': charge `cost`, or, when cost is nil, `seconds` (nil: unknown) at the price recorded with
-- the hold (a hold without one, or an unknown length, is charged its amount). Same rule as charge_for().
local function acct_close(job_id, mode, cost, seconds, note, at)
  local hk = P .. 'hold:' .. job_id
  local h = redis.call('HMGET', hk, 'account_id', 'amount', 'per_second', 'minimum')
  if not h[1] then return nil end
  local id, amount = h[1], tonumber(h[2])
  redis.call('DEL', hk)
  redis.call('ZREM', P .. 'holds', job_id)
  redis.call('SREM', P .. 'acctholds:' .. id, job_id)
  local k, balance, held = acct_account(id)
  if not k then return nil end
  -- `0 - x`, not `-x`: -0 would reach HINCRBY as "-0", which it refuses
  if mode ~= 'settle' then return acct_apply(id, mode, 0, 0 - amount, job_id, '', note, at) end
  if cost == nil then
    if seconds == nil or not h[3] or not h[4] then
      cost = amount
      if note == '' then
        if seconds == nil then note = '__UNKNOWN__' else note = '__UNPRICED__' end
      end
    else
      local raw = math.max(0, seconds) * tonumber(h[3])
      cost = math.max(tonumber(h[4]), math.ceil(raw - 1e-9))
    end
  end
  local payable = balance - held + amount
  local charged = math.max(0, math.min(cost, payable)) + 0     -- + 0: never -0
  if charged < cost then
    if note ~= '' then note = note .. '; ' end
    note = note .. 'cost ' .. cost .. ' capped at the ' .. charged .. ' available'
  end
  local s = ''
  if seconds ~= nil then s = string.format('%.17g', seconds) end
  return acct_apply(id, 'settle', 0 - charged, 0 - amount, job_id, s, note, at)
end
""".replace("__UNKNOWN__", UNKNOWN_LENGTH_NOTE).replace("__UNPRICED__", UNPRICED_NOTE)

# What a job store's scripts compose in (RedisJobStore.attach_billing), after their own `local P = ARGV[1]`:
#   billing_settle(job_id, metrics_json, at)   the job is being marked COMPLETED: charge its metrics'
#                                              audio_seconds at the hold's recorded price
#   billing_release(job_id, note, at)          the job is being marked FAILED: give the hold back
# `at`: the ledger time (a string). Both do nothing when the job holds nothing.
BILLING_LUA = _FUNCS + r"""
local function billing_settle(job_id, metrics_json, at)
  local seconds = nil
  local ok, m = pcall(cjson.decode, metrics_json)
  if ok and type(m) == 'table' then
    local v = m['audio_seconds']
    if type(v) == 'number' and v >= 0 and v < math.huge then seconds = v end
  end
  acct_close(job_id, 'settle', nil, seconds, '', at)
end
local function billing_release(job_id, note, at)
  acct_close(job_id, 'release', nil, nil, note, at)
end
"""

_COMMON = "local P = ARGV[1]\n" + _FUNCS + r"""
local fields, apply, account = acct_fields, acct_apply, acct_account
"""

# ARGV: P, id, key_hash, initial, at, field, value, ...
_CREATE = _COMMON + r"""
local id, key_hash, initial, at = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local k = P .. 'acct:' .. id
if redis.call('EXISTS', k) == 1 then return {'err', 'an account with this id exists'} end
if redis.call('EXISTS', P .. 'acctkey:' .. key_hash) == 1 then return {'err', 'this key hash is in use'} end
redis.call('HSET', k, 'balance', 0, 'held', 0, unpack(ARGV, 6))
redis.call('SET', P .. 'acctkey:' .. key_hash, id)
redis.call('ZADD', P .. 'accts', redis.call('HGET', k, 'created_at'), id)
if initial > 0 then return {'ok', apply(id, 'grant', initial, 0, '', '', 'initial credits', at)} end
return {'ok', fields(k)}
"""

# ARGV: P, id, field, value, ...
_UPDATE = _COMMON + r"""
local k = account(ARGV[2])
if not k then return {'unknown'} end
redis.call('HSET', k, unpack(ARGV, 3))
return {'ok', fields(k)}
"""

# ARGV: P, id, delta, note, at
_ADJUST = _COMMON + r"""
local id, delta = ARGV[2], tonumber(ARGV[3])
local k, balance, held = account(id)
if not k then return {'unknown'} end
if delta < 0 and balance - held + delta < 0 then return {'insufficient', tostring(-delta), tostring(balance - held)} end
local kind = 'grant'
if delta < 0 then kind = 'adjust' end
return {'ok', apply(id, kind, delta, 0, '', '', ARGV[4], ARGV[5])}
"""

# ARGV: P, id, job_id, amount, at, per_second ('' = not recorded), minimum
_HOLD = _COMMON + r"""
local id, job_id, amount, at = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local k, balance, held = account(id)
if not k then return {'unknown'} end
if redis.call('EXISTS', P .. 'hold:' .. job_id) == 1 then return {'duplicate'} end
if balance - held < amount then return {'insufficient', tostring(amount), tostring(balance - held)} end
local hk = P .. 'hold:' .. job_id
redis.call('HSET', hk, 'job_id', job_id, 'account_id', id, 'amount', amount, 'created_at', at)
if ARGV[6] ~= '' then redis.call('HSET', hk, 'per_second', ARGV[6], 'minimum', ARGV[7]) end
redis.call('ZADD', P .. 'holds', at, job_id)
redis.call('SADD', P .. 'acctholds:' .. id, job_id)
return {'ok', apply(id, 'hold', 0, amount, job_id, '', '', at)}
"""

# ARGV: P, job_id, mode ('settle' | 'release' | 'cancel'), cost ('' = by the recorded price), seconds ('' =
# unknown), note, at
_CLOSE = _COMMON + r"""
local cost, seconds = nil, nil
if ARGV[4] ~= '' then cost = tonumber(ARGV[4]) end
if ARGV[5] ~= '' then seconds = tonumber(ARGV[5]) end
local f = acct_close(ARGV[2], ARGV[3], cost, seconds, ARGV[6], ARGV[7])
if not f then return {'none'} end
return {'ok', f}
"""

# ARGV: P, id, secret, replace ('1': rotate, '0': only when the account has none)  -> the secret, or nil when
# the account is unknown
_WEBHOOK_SECRET = _COMMON + r"""
local k = P .. 'acct:' .. ARGV[2]
if redis.call('EXISTS', k) == 0 then return false end
if ARGV[4] == '1' then
  redis.call('HSET', k, 'webhook_secret', ARGV[3])
else
  redis.call('HSETNX', k, 'webhook_secret', ARGV[3])
end
return redis.call('HGET', k, 'webhook_secret')
"""

# ARGV: P, id, rate_per_min, now  -> seconds to wait, as a string ("0" when a token was taken)
_TAKE = _COMMON + r"""
local id, rate, now = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local k = P .. 'bucket:' .. id
local capacity, per_second = rate, rate / 60.0
local b = redis.call('HMGET', k, 'tokens', 'updated')
local tokens = capacity
if b[1] then tokens = math.min(capacity, tonumber(b[1]) + math.max(0, now - tonumber(b[2])) * per_second) end
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / per_second end
redis.call('HSET', k, 'tokens', string.format('%.17g', tokens), 'updated', ARGV[4])
redis.call('EXPIRE', k, math.ceil(capacity / per_second) + 60)
return string.format('%.17g', wait)
"""


def _account(raw: Any) -> Account | None:
    if not raw:
        return None
    if isinstance(raw, list):
        raw = dict(zip(raw[0::2], raw[1::2]))
    h = {k.decode(): v.decode() for k, v in raw.items()}
    return Account(id=h["id"], name=h["name"], key_hash=h["key_hash"], key_prefix=h["key_prefix"],
                   admin=h["admin"] == "1", revoked=h["revoked"] == "1", rate_per_min=int(h["rate_per_min"]),
                   balance=int(h["balance"]), held=int(h["held"]), created_at=float(h["created_at"]))


def _hold(raw: dict) -> Hold | None:
    if not raw:
        return None
    h = {k.decode(): v.decode() for k, v in raw.items()}
    return Hold(job_id=h["job_id"], account_id=h["account_id"], amount=int(h["amount"]),
                created_at=float(h["created_at"]),
                per_second=float(h["per_second"]) if h.get("per_second") else None,
                minimum=int(h["minimum"]) if h.get("minimum") else None)


def _entry(raw: bytes) -> LedgerEntry:
    d = json.loads(raw)
    return LedgerEntry(id=int(d["id"]), account_id=d["account_id"], at=float(d["at"]), kind=d["kind"],
                       delta=int(d["delta"]), hold_delta=int(d["hold_delta"]), balance_after=int(d["balance_after"]),
                       held_after=int(d["held_after"]), job_id=d.get("job_id") or None,
                       seconds=float(d["seconds"]) if d.get("seconds") not in (None, "") else None,
                       note=d.get("note") or "")


class RedisAccountStore(AccountStore):
    """`RedisAccountStore(url, prefix)`; `RedisAccountStore.beside(job_store)` shares a RedisJobStore's server,
    prefix and connection pool."""

    billing_lua = BILLING_LUA       # for RedisJobStore.attach_billing

    def __init__(self, url: str | None = None, prefix: str | None = None, client: redis.Redis | None = None,
                 timeout: float = 5.0):
        # The `keys` command opens the store by URL alone: it takes the deployment's prefix from the environment
        # as `serve --redis-prefix` does.
        prefix = prefix if prefix is not None else os.environ.get("CHATTERBOX_REDIS_PREFIX", "cbx:")
        if client is None:
            if url is None:
                raise ValueError("give a Redis URL or a client")
            client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=min(2.0, timeout))
            self._own_client = True
        else:
            self._own_client = False
        self.r = client
        self.prefix = prefix
        self._scripts = {name: client.register_script(src) for name, src in (
            ("create", _CREATE), ("update", _UPDATE), ("adjust", _ADJUST), ("hold", _HOLD), ("close", _CLOSE),
            ("take", _TAKE), ("webhook_secret", _WEBHOOK_SECRET))}

    @classmethod
    def beside(cls, job_store: Any) -> "RedisAccountStore":
        return cls(prefix=job_store.prefix, client=job_store.r)

    # --- plumbing -------------------------------------------------------------------------------------------
    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _call(self, fn, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise StoreUnavailable(f"the account store (Redis) is unavailable: {e}") from e

    def _run(self, name: str, *args: Any) -> list:
        reply = self._call(self._scripts[name], args=[self.prefix, *args])
        status = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
        return [status, *reply[1:]]

    def _ok(self, reply: list, account_id: str = "") -> Account:
        status = reply[0]
        if status == "unknown":
            raise UnknownAccount(account_id)
        if status == "insufficient":
            raise InsufficientCredits(int(reply[1]), int(reply[2]))
        if status == "duplicate":
            raise DuplicateHold(account_id)
        if status == "err":
            raise ValueError(reply[1].decode())
        return _account(reply[1])

    # --- keys -----------------------------------------------------------------------------------------------
    def create(self, account: Account) -> Account:
        if account.held != 0 or account.balance < 0:
            raise ValueError("a new account starts with held = 0 and balance >= 0")
        fields = ["id", account.id, "name", account.name, "key_hash", account.key_hash,
                  "key_prefix", account.key_prefix, "admin", int(account.admin), "revoked", int(account.revoked),
                  "rate_per_min", int(account.rate_per_min), "created_at", repr(float(account.created_at))]
        return self._ok(self._run("create", account.id, account.key_hash, int(account.balance), repr(time.time()),
                                  *fields), account.id)

    def get(self, account_id: str) -> Account | None:
        return _account(self._call(self.r.hgetall, self._k("acct", account_id)))

    def get_by_key_hash(self, key_hash: str) -> Account | None:
        account_id = self._call(self.r.get, self._k("acctkey", key_hash))
        return self.get(account_id.decode()) if account_id else None

    def list(self) -> list[Account]:
        ids = self._call(self.r.zrange, self._k("accts"), 0, -1)
        pipe = self.r.pipeline(transaction=False)
        for i in ids:
            pipe.hgetall(self._k("acct", i.decode()))
        return [a for a in (_account(h) for h in self._call(pipe.execute)) if a is not None]

    def count(self) -> int:
        return int(self._call(self.r.zcard, self._k("accts")))

    def set_revoked(self, account_id: str, revoked: bool = True) -> Account:
        return self._ok(self._run("update", account_id, "revoked", int(revoked)), account_id)

    def update_limits(self, account_id: str, *, rate_per_min: int | None = None, admin: bool | None = None,
                      name: str | None = None) -> Account:
        changes: list[Any] = []
        if rate_per_min is not None:
            changes += ["rate_per_min", int(rate_per_min)]
        if admin is not None:
            changes += ["admin", int(admin)]
        if name is not None:
            changes += ["name", name]
        if not changes:
            acc = self.get(account_id)
            if acc is None:
                raise UnknownAccount(account_id)
            return acc
        return self._ok(self._run("update", account_id, *changes), account_id)

    # --- credits --------------------------------------------------------------------------------------------
    def adjust(self, account_id: str, delta: int, note: str = "") -> Account:
        return self._ok(self._run("adjust", account_id, int(delta), note, repr(time.time())), account_id)

    def hold(self, account_id: str, job_id: str, amount: int, now: float | None = None, *,
             per_second: float | None = None, minimum: int | None = None) -> Account:
        check_hold(amount, per_second, minimum)
        at = time.time() if now is None else float(now)
        price = ("", "") if per_second is None else (repr(float(per_second)), int(minimum))
        reply = self._run("hold", account_id, job_id, int(amount), repr(at), *price)
        if reply[0] == "duplicate":
            raise DuplicateHold(job_id)
        return self._ok(reply, account_id)

    def _close(self, job_id: str, mode: str, cost: int | None, seconds: float | None, note: str) -> Account | None:
        reply = self._run("close", job_id, mode, "" if cost is None else int(cost),
                          "" if seconds is None else repr(float(seconds)), note, repr(time.time()))
        return None if reply[0] == "none" else self._ok(reply)

    def settle(self, job_id: str, cost: int, seconds: float | None = None, note: str = "") -> Account | None:
        return self._close(job_id, "settle", int(cost), seconds, note)

    def settle_job(self, job_id: str, audio_seconds: float | None, note: str = "") -> Account | None:
        return self._close(job_id, "settle", None, audio_seconds, note)

    def release(self, job_id: str, note: str = "") -> Account | None:
        return self._close(job_id, "release", None, None, note)

    def cancel(self, job_id: str, note: str = "") -> Account | None:
        return self._close(job_id, "cancel", None, None, note)

    def holds(self, older_than: float | None = None) -> list[Hold]:
        upper = "+inf" if older_than is None else f"({older_than!r}"
        ids = self._call(self.r.zrangebyscore, self._k("holds"), "-inf", upper)
        pipe = self.r.pipeline(transaction=False)
        for i in ids:
            pipe.hgetall(self._k("hold", i.decode()))
        return [h for h in (_hold(raw) for raw in self._call(pipe.execute)) if h is not None]

    def get_hold(self, job_id: str) -> Hold | None:
        return _hold(self._call(self.r.hgetall, self._k("hold", job_id)))

    # --- webhook secrets ------------------------------------------------------------------------------------
    def _webhook_secret(self, account_id: str, rotate: bool) -> str:
        secret = self._call(self._scripts["webhook_secret"],
                            args=[self.prefix, account_id, new_webhook_secret(), "1" if rotate else "0"])
        if secret is None:
            raise UnknownAccount(account_id)
        return secret.decode()

    def webhook_secret(self, account_id: str) -> str:
        secret = self._call(self.r.hget, self._k("acct", account_id), "webhook_secret")
        return secret.decode() if secret else self._webhook_secret(account_id, rotate=False)

    def rotate_webhook_secret(self, account_id: str) -> str:
        return self._webhook_secret(account_id, rotate=True)

    # --- reporting ------------------------------------------------------------------------------------------
    def ledger(self, account_id: str, limit: int = 100) -> list[LedgerEntry]:
        start = 0 if limit <= 0 else -limit
        return [_entry(e) for e in self._call(self.r.lrange, self._k("ledger", account_id), start, -1)]

    def usage(self, account_id: str, since: float | None = None) -> Usage:
        since = 0.0 if since is None else since
        u = Usage()
        for e in self.ledger(account_id, limit=0):
            if e.at < since:
                continue
            if e.kind == "settle":
                u.completed += 1
                u.audio_seconds += e.seconds or 0.0
                u.credits_spent += -e.delta
            elif e.kind == "release":
                u.failed += 1
        u.open_holds = int(self._call(self.r.scard, self._k("acctholds", account_id)))
        return u

    # --- rate limiting --------------------------------------------------------------------------------------
    def take_token(self, account_id: str, rate_per_min: int, now: float | None = None) -> float:
        if rate_per_min <= 0:
            return 0.0
        at = time.time() if now is None else float(now)
        return float(self._call(self._scripts["take"], args=[self.prefix, account_id, int(rate_per_min), repr(at)]))

    def close(self) -> None:
        if self._own_client:
            self.r.close()
