"""The Redis job store: N stateless API replicas and M workers sharing one Redis (scale-out).

Every state transition is one Lua script, so it is atomic on the server: no job is claimed by two workers or
completed twice, whichever replicas race. Times that matter across hosts (leases, finish times) come from the
Redis server's clock (TIME), so clock skew between hosts cannot expire a lease early.

Keys (all under `prefix`, default "cbx:"; use a hash tag such as "{cbx}:" on Redis Cluster):

    job:<id>      hash    the job's fields; a TTL of `retention` once it is terminal (retention by Redis)
    audio:<id>    string  the audio of a COMPLETED job, same TTL (or a file in `audio_dir`, see below)
    q:<owner>     zset    the owner's QUEUED job ids of the default model (chatterbox-tts), scored by
                          created_at (oldest first within an owner); q@<model>:<owner> for another model
    owners        zset    owners with queued jobs of the default model, scored by when they were last served:
                          claims take the least recently served owner first, i.e. round-robin across tenants,
                          so one key's burst never starves the others; owners@<model> for another model
    rr            counter the round-robin clock (one for all models: scores compare across their queues)
    queued        zset    every QUEUED id by created_at (oldest queued age, the default model's queue size)
    mq:<model>    zset    QUEUED ids of a model other than the default, by created_at (its queue size)
    models        set     models that have had queued jobs since their queue last emptied (claims of any model)
    leases        zset    every PROCESSING id by lease deadline; `recover_expired` takes the overdue ones
    done:<state>  zset    terminal ids by finished_at (counting live results, purging, deleting audio files)
    worker:<id>   string  a worker's advertised info, with a TTL: the worker is alive while the key exists
    workers       set     worker ids that have advertised (entries whose key expired are pruned)
    events        stream  one entry per terminal transition (job, state, worker), capped: `wait` blocks on
                          it with XREAD, and it is an audit trail showing each job completed once
    new-work      channel a message (the job's model) whenever a job is queued (or re-queued): idle workers
                          claim at once instead of at their next poll (`watch_new_work`)
    ev:<id>       list    the job's events (JSON), numbered by position (1 = first): RPUSHed by the script of
                          each transition, with the job's TTL once it is terminal
    hooks         zset    jobs whose webhook delivery is pending, by when it is due; a claimed delivery is
                          re-scored to the end of its lease, so no other dispatcher takes the same attempt
                          (the state, attempts and last answer are `wh_*` fields of the job's hash)
    idem:<owner>:<sha256 of the key>  string  an idempotency key's reservation (JSON: job id, fingerprint,
                          time), SET with the retention as its TTL
    chunks:<id>   stream  the chunk channel: a streamed job's pieces, entry id <attempt>-<seq + 1> (so XADD
                          refuses a piece out of order); deleted by the claim that starts a new attempt (the
                          job's `claims` field, counting every claim), the job's TTL once it is terminal

Models: a queue per model (the keys above), so a claim for some models reads only their queues: per job
claimed, the head of each named model's `owners` zset (one ZRANGE each), the least recently served owner among
them first. The default model keeps the key names of the single-model store, so jobs queued before models
existed (hashes without a `model` field: the default) are claimed as before. Queue bounds and positions are per
model.

Queue position: claims serve owners in `owners` order (score = when last served, ties by owner id), one job
each per round, so a job's position is exact at the moment it is read: its rank in its owner's queue, plus, for
every other owner, min(queued, rank) jobs of earlier rounds and one more if that owner comes first in the
job's round (`_POSITION`, one read-only script). A new owner's first job joins the current round and can go
ahead of it, on SQLite too.

Why sorted sets and leases rather than a Streams consumer group for the queue: a consumer group re-delivers a
dead consumer's entry by its idle time (XAUTOCLAIM), one threshold for all, and cannot put an entry back in
the queue at its original position; here each claim has its own lease that heartbeats extend, a reclaimed job
goes back in front of newer ones, and fairness across tenants is one ZRANGE. It is the same reliable pattern
(claimed work is recorded atomically with its holder until acknowledged, and reclaimed when the holder goes
silent), with the properties this interface asks for. Streams carry the completion events.

Audio: stored in Redis by default (every replica can serve it, and it expires with the job through the TTL).
Outputs larger than `inline_max_bytes` go to `audio_dir` when one is configured: a directory every API replica
and worker mounts (NFS, a Kubernetes ReadWriteMany volume), which keeps Redis's memory bounded when results are
large or retention is long. Files are named `<id>.<nonce>` so that two workers that both synthesised a
reclaimed job never write the same file; only the one whose completion wins is referenced.

Redis unreachable (or still loading its data after a restart): every method raises `StoreUnavailable`, and the
next call after Redis returns works again (connections are re-established by the pool). `writable()` probes a
write (a key with a TTL, and a file in `audio_dir` when there is one) for /ready.

Billing (`attach_billing(account_store)`): the account store's `BILLING_LUA` (same server, same prefix) is
composed into the complete/fail/recover scripts, so a job's credit hold is closed by the same atomic script as
its terminal transition. Without it, the scripts carry no-op billing functions.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .files import write_atomically
from .store import (CANCELLED_REASON, DEFAULT_MODEL, LOST_ATTEMPT, AudioChunk, ChunkRead, IdempotencyRecord, Job, JobEvent,
                    JobState, JobStore, QueueFull, StoreStats, StoreUnavailable, WebhookDelivery, probe_directory)

log = logging.getLogger(__name__)

EVENTS_MAXLEN = 100_000       # approximate cap of the events stream
BATCH = 500                   # jobs handled per maintenance script call

# --- Lua ----------------------------------------------------------------------------------------------------
# Every script gets the key prefix as ARGV[1] and builds its keys from it (all keys share the prefix, so a
# hash-tagged prefix keeps them in one Redis Cluster slot).

_LUA_COMMON = r"""
local P = ARGV[1]
local DEFAULT_MODEL = '""" + DEFAULT_MODEL + r"""'
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function model_of(m)
  if not m or m == '' then return DEFAULT_MODEL end
  return m
end
local function owners_key(model)
  if model == DEFAULT_MODEL then return P .. 'owners' end
  return P .. 'owners@' .. model
end
local function queue_key(model, owner)
  if model == DEFAULT_MODEL then return P .. 'q:' .. owner end
  return P .. 'q@' .. model .. ':' .. owner
end
local function queued_count(model)
  if model ~= DEFAULT_MODEL then return redis.call('ZCARD', P .. 'mq:' .. model) end
  local n = redis.call('ZCARD', P .. 'queued')
  for _, m in ipairs(redis.call('SMEMBERS', P .. 'models')) do
    if m ~= DEFAULT_MODEL then n = n - redis.call('ZCARD', P .. 'mq:' .. m) end
  end
  return n
end
local function enqueue(id, owner, created, model)
  redis.call('ZADD', P .. 'queued', created, id)
  if model ~= DEFAULT_MODEL then redis.call('ZADD', P .. 'mq:' .. model, created, id) end
  redis.call('SADD', P .. 'models', model)
  redis.call('ZADD', queue_key(model, owner), created, id)
  redis.call('ZADD', owners_key(model), 'NX', tonumber(redis.call('GET', P .. 'rr') or '0'), owner)
  redis.call('PUBLISH', P .. 'new-work', model)
end
local function unqueued(id, owner, model)
  -- `id` left the model's queue (its owner's zset already updated): drop what points at it
  redis.call('ZREM', P .. 'queued', id)
  redis.call('ZREM', P .. 'mq:' .. model, id)
  if redis.call('ZCARD', queue_key(model, owner)) == 0 then
    redis.call('ZREM', owners_key(model), owner)
    if redis.call('ZCARD', owners_key(model)) == 0 then redis.call('SREM', P .. 'models', model) end
  end
end
local function dequeue(id, owner, model)
  redis.call('ZREM', queue_key(model, owner), id)
  unqueued(id, owner, model)
end
local function fmt_time(t)
  return string.format('%.6f', t)
end
local function push_event(id, kind, data, t)
  data['type'] = kind
  data['at'] = tonumber(string.format('%.6f', t))
  redis.call('RPUSH', P .. 'ev:' .. id, cjson.encode(data))
end
local function finish(id, k, state, t, retention_ms, worker)
  redis.call('HSET', k, 'state', state, 'finished_at', string.format('%.6f', t), 'lease_until', '')
  redis.call('ZREM', P .. 'leases', id)
  redis.call('ZADD', P .. 'done:' .. state, t, id)
  local data = {status = state}
  if redis.call('HGET', k, 'cancelled') == '1' then data['cancelled'] = true end
  push_event(id, 'state', data, t)
  if (redis.call('HGET', k, 'webhook_url') or '') ~= '' then
    redis.call('HSET', k, 'wh_state', 'pending')
    redis.call('ZADD', P .. 'hooks', t, id)
  end
  redis.call('PEXPIRE', k, retention_ms)
  redis.call('PEXPIRE', P .. 'ev:' .. id, retention_ms)
  redis.call('PEXPIRE', P .. 'chunks:' .. id, retention_ms)
  redis.call('XADD', P .. 'events', 'MAXLEN', '~', ARGV[2], '*', 'job', id, 'state', state, 'worker', worker)
end
"""

# ARGV: P, maxlen, id, owner, created_at, max_queued, model, field, value, ...
_SUBMIT = _LUA_COMMON + r"""
local id, owner, created, maxq, model = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7]
local k = P .. 'job:' .. id
if redis.call('EXISTS', k) == 1 then return redis.error_reply('job id already exists: ' .. id) end
if queued_count(model) >= maxq then return 0 end
redis.call('HSET', k, unpack(ARGV, 8))
enqueue(id, owner, created, model)
push_event(id, 'state', {status = 'QUEUED'}, now())
return 1
"""

# ARGV: P, maxlen, worker, limit, lease_seconds, '*' (any model) or '', model...  -> list of HGETALL replies
_CLAIM = _LUA_COMMON + r"""
local worker, limit, lease = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local models = {}
if ARGV[6] == '*' then
  models = redis.call('SMEMBERS', P .. 'models')
  local listed = false
  for _, m in ipairs(models) do if m == DEFAULT_MODEL then listed = true end end
  if not listed then models[#models + 1] = DEFAULT_MODEL end   -- jobs queued before models were recorded
else
  for i = 7, #ARGV do models[#models + 1] = ARGV[i] end
end
local t = now()
local until_ = string.format('%.6f', t + lease)
local out = {}
local guard = 0
while #out < limit and guard < limit + 1000 do
  guard = guard + 1
  local model, owner, score = nil, nil, nil
  for _, m in ipairs(models) do      -- the least recently served owner at the head of these models' queues
    local o = redis.call('ZRANGE', owners_key(m), 0, 0, 'WITHSCORES')
    if #o > 0 then
      local s = tonumber(o[2])
      if owner == nil or s < score or (s == score and o[1] < owner) then model, owner, score = m, o[1], s end
    end
  end
  if owner == nil then break end
  local q = queue_key(model, owner)
  local popped = redis.call('ZPOPMIN', q)
  if #popped == 0 then
    redis.call('ZREM', owners_key(model), owner)
  else
    local id = popped[1]
    if redis.call('ZCARD', q) > 0 then
      redis.call('ZADD', owners_key(model), redis.call('INCR', P .. 'rr'), owner)
    end
    unqueued(id, owner, model)
    local k = P .. 'job:' .. id
    if redis.call('HGET', k, 'state') == 'QUEUED' then
      redis.call('HSET', k, 'state', 'PROCESSING', 'worker_id', worker, 'lease_until', until_, 'retry_reason', '')
      redis.call('HINCRBY', k, 'attempts', 1)
      redis.call('HINCRBY', k, 'claims', 1)
      redis.call('DEL', P .. 'chunks:' .. id)
      if (redis.call('HGET', k, 'started_at') or '') == '' then
        redis.call('HSET', k, 'started_at', string.format('%.6f', t))
      end
      redis.call('ZADD', P .. 'leases', t + lease, id)
      push_event(id, 'state', {status = 'PROCESSING', attempt = tonumber(redis.call('HGET', k, 'attempts'))}, t)
      out[#out + 1] = redis.call('HGETALL', k)
    end
  end
end
return out
"""

# ARGV: P, maxlen, worker, lease_seconds, info_json, worker_ttl_ms, id...
_HEARTBEAT = _LUA_COMMON + r"""
local worker, lease = ARGV[3], tonumber(ARGV[4])
local t = now()
local n = 0
for i = 7, #ARGV do
  local id = ARGV[i]
  local k = P .. 'job:' .. id
  local h = redis.call('HMGET', k, 'state', 'worker_id')
  if h[1] == 'PROCESSING' and h[2] == worker then
    redis.call('HSET', k, 'lease_until', string.format('%.6f', t + lease))
    redis.call('ZADD', P .. 'leases', 'XX', t + lease, id)
    n = n + 1
  end
end
redis.call('SET', P .. 'worker:' .. worker, ARGV[5], 'PX', ARGV[6])
redis.call('SADD', P .. 'workers', worker)
return n
"""

# ARGV: P, maxlen, id, worker, media_type, metrics_json, retention_ms, where ('inline'|'file'), audio|path
_COMPLETE = _LUA_COMMON + r"""
local id, worker = ARGV[3], ARGV[4]
local k = P .. 'job:' .. id
local h = redis.call('HMGET', k, 'state', 'worker_id')
if h[1] ~= 'PROCESSING' or h[2] ~= worker then return 0 end
local retention_ms = ARGV[7]
redis.call('HSET', k, 'media_type', ARGV[5], 'metrics', ARGV[6])
if ARGV[8] == 'file' then
  redis.call('HSET', k, 'audio_path', ARGV[9])
else
  redis.call('SET', P .. 'audio:' .. id, ARGV[9], 'PX', retention_ms)
end
local t = now()
redis.call('HSET', k, 'retry_reason', '')
finish(id, k, 'COMPLETED', t, retention_ms, worker)
billing_settle(id, ARGV[6], fmt_time(t))
return 1
"""

# ARGV: P, maxlen, id, worker ('' = any), error, metrics_json ('' = keep), retention_ms, billing note
_FAIL = _LUA_COMMON + r"""
local id, worker = ARGV[3], ARGV[4]
local k = P .. 'job:' .. id
local h = redis.call('HMGET', k, 'state', 'worker_id', 'owner', 'model')
if h[1] ~= 'QUEUED' and h[1] ~= 'PROCESSING' then return 0 end
if worker ~= '' and (h[1] ~= 'PROCESSING' or h[2] ~= worker) then return 0 end
if h[1] == 'QUEUED' then dequeue(id, h[3], model_of(h[4])) end
redis.call('HSET', k, 'error', ARGV[5])
if ARGV[6] ~= '' then redis.call('HSET', k, 'metrics', ARGV[6]) end
local t = now()
finish(id, k, 'FAILED', t, ARGV[7], worker)
billing_release(id, ARGV[8], fmt_time(t))
return 1
"""

# ARGV: P, maxlen, id, worker
_RELEASE = _LUA_COMMON + r"""
local id, worker = ARGV[3], ARGV[4]
local k = P .. 'job:' .. id
local h = redis.call('HMGET', k, 'state', 'worker_id', 'owner', 'created_at', 'attempts', 'model')
if h[1] ~= 'PROCESSING' or h[2] ~= worker then return 0 end
local attempts = math.max(0, (tonumber(h[5]) or 1) - 1)
redis.call('HSET', k, 'state', 'QUEUED', 'worker_id', '', 'lease_until', '', 'attempts', attempts)
if attempts == 0 then redis.call('HSET', k, 'started_at', '') end
redis.call('ZREM', P .. 'leases', id)
enqueue(id, h[3], h[4], model_of(h[6]))
push_event(id, 'state', {status = 'QUEUED'}, now())
return 1
"""

# ARGV: P, maxlen, id, worker, delay_seconds, reason
_RETRY_LATER = _LUA_COMMON + r"""
local id, worker = ARGV[3], ARGV[4]
local k = P .. 'job:' .. id
local h = redis.call('HMGET', k, 'state', 'worker_id')
if h[1] ~= 'PROCESSING' or h[2] ~= worker then return 0 end
local until_ = now() + math.max(0, tonumber(ARGV[5]))
redis.call('HSET', k, 'worker_id', '', 'lease_until', fmt_time(until_), 'retry_reason', ARGV[6])
redis.call('ZADD', P .. 'leases', until_, id)
return 1
"""

# ARGV: P, maxlen, max_attempts, retention_ms, batch
_RECOVER = _LUA_COMMON + r"""
local max_attempts = tonumber(ARGV[3])
local t = now()
local ids = redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', t, 'LIMIT', 0, tonumber(ARGV[5]))
local n = 0
for _, id in ipairs(ids) do
  local k = P .. 'job:' .. id
  local h = redis.call('HMGET', k, 'state', 'worker_id', 'owner', 'created_at', 'attempts', 'model')
  if h[1] ~= 'PROCESSING' then
    redis.call('ZREM', P .. 'leases', id)
  else
    local attempts = tonumber(h[5]) or 0
    if attempts >= max_attempts then
      local reason = redis.call('HGET', k, 'retry_reason')
      if not reason or reason == '' then
        reason = 'the worker processing this job stopped responding (lease expired) ' .. attempts .. ' times; giving up'
      end
      redis.call('HSET', k, 'error', reason)
      finish(id, k, 'FAILED', t, ARGV[4], '')
      billing_release(id, reason, fmt_time(t))
    else
      redis.call('HSET', k, 'state', 'QUEUED', 'worker_id', '', 'lease_until', '')
      redis.call('ZREM', P .. 'leases', id)
      enqueue(id, h[3], h[4], model_of(h[6]))
      push_event(id, 'state', {status = 'QUEUED'}, t)
    end
    n = n + 1
  end
end
return n
"""

# ARGV: P, maxlen, retention_seconds, batch  -> ids removed (their audio files are deleted by the caller)
_PURGE = _LUA_COMMON + r"""
local cutoff = now() - tonumber(ARGV[3])
local out = {}
for _, state in ipairs({'COMPLETED', 'FAILED'}) do
  local z = P .. 'done:' .. state
  local ids = redis.call('ZRANGEBYSCORE', z, '-inf', cutoff, 'LIMIT', 0, tonumber(ARGV[4]))
  for _, id in ipairs(ids) do
    local k = P .. 'job:' .. id
    local s = redis.call('HGET', k, 'state')
    if s == false or s == state then
      redis.call('DEL', k, P .. 'audio:' .. id, P .. 'ev:' .. id, P .. 'chunks:' .. id)
      redis.call('ZREM', P .. 'hooks', id)
    end
    redis.call('ZREM', z, id)
    out[#out + 1] = id
  end
end
return out
"""

# ARGV: P, maxlen, id, error, retention_ms  -> 1 when cancelled now
_CANCEL = _LUA_COMMON + r"""
local id = ARGV[3]
local k = P .. 'job:' .. id
local h = redis.call('HMGET', k, 'state', 'owner', 'model')
if h[1] ~= 'QUEUED' and h[1] ~= 'PROCESSING' then return 0 end
if h[1] == 'QUEUED' then dequeue(id, h[2], model_of(h[3])) end
redis.call('HSET', k, 'error', ARGV[4], 'cancelled', '1', 'worker_id', '', 'retry_reason', '')
local t = now()
finish(id, k, 'FAILED', t, ARGV[5], '')
billing_release(id, ARGV[4], fmt_time(t))
return 1
"""

# ARGV: P, maxlen, id  -> the position, or -1 when the job is not QUEUED (read-only)
_POSITION = _LUA_COMMON + r"""
local id = ARGV[3]
local h = redis.call('HMGET', P .. 'job:' .. id, 'state', 'owner', 'model')
if h[1] ~= 'QUEUED' then return -1 end
local owner, model = h[2], model_of(h[3])
local rank = redis.call('ZRANK', queue_key(model, owner), id)
local mine = redis.call('ZSCORE', owners_key(model), owner)
if not rank or not mine then return -1 end
mine = tonumber(mine)
local position = rank
local all = redis.call('ZRANGE', owners_key(model), 0, -1, 'WITHSCORES')
for i = 1, #all, 2 do
  local other, score = all[i], tonumber(all[i + 1])
  if other ~= owner then
    local n = redis.call('ZCARD', queue_key(model, other))
    position = position + math.min(n, rank)
    if n > rank and (score < mine or (score == mine and other < owner)) then position = position + 1 end
  end
end
return position
"""

# ARGV: P, maxlen, worker, id, data_json ('' = none), id, data_json, ...  -> the ids the worker still holds
_PROGRESS = _LUA_COMMON + r"""
local worker = ARGV[3]
local out = {}
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  local h = redis.call('HMGET', P .. 'job:' .. id, 'state', 'worker_id')
  if h[1] == 'PROCESSING' and h[2] == worker then
    if ARGV[i + 1] ~= '' then redis.call('RPUSH', P .. 'ev:' .. id, ARGV[i + 1]) end
    out[#out + 1] = id
  end
end
return out
"""

# ARGV: P, maxlen, owner, key_hash, fingerprint, job_id, ttl_ms, stale_after  -> nil (reserved) or the record
_IDEMPOTENCY = _LUA_COMMON + r"""
local ik = P .. 'idem:' .. ARGV[3] .. ':' .. ARGV[4]
local t = now()
local current = redis.call('GET', ik)
if current then
  local rec = cjson.decode(current)
  if redis.call('EXISTS', P .. 'job:' .. rec['job_id']) == 1 or t - rec['at'] < tonumber(ARGV[8]) then
    return current
  end
end
redis.call('SET', ik, cjson.encode({job_id = ARGV[6], fingerprint = ARGV[5], at = tonumber(fmt_time(t))}), 'PX', ARGV[7])
return false
"""

# ARGV: P, maxlen, owner, key_hash, job_id
_IDEMPOTENCY_RELEASE = _LUA_COMMON + r"""
local ik = P .. 'idem:' .. ARGV[3] .. ':' .. ARGV[4]
local current = redis.call('GET', ik)
if current and cjson.decode(current)['job_id'] == ARGV[5] then redis.call('DEL', ik) end
return 1
"""

# ARGV: P, maxlen, claimer, limit, lease_seconds, max_attempts, lost_note  -> {id, attempt, id, attempt, ...}
_CLAIM_WEBHOOKS = _LUA_COMMON + r"""
local claimer, lease, max_attempts = ARGV[3], tonumber(ARGV[5]), tonumber(ARGV[6])
local t = now()
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'hooks', '-inf', t, 'LIMIT', 0, tonumber(ARGV[4]))) do
  local k = P .. 'job:' .. id
  local h = redis.call('HMGET', k, 'wh_state', 'wh_attempts', 'wh_error')
  if h[1] ~= 'pending' then
    redis.call('ZREM', P .. 'hooks', id)          -- the job expired, or its delivery is over
  else
    local attempts = tonumber(h[2] or '0') or 0
    if attempts >= max_attempts then
      if (h[3] or '') == '' then redis.call('HSET', k, 'wh_error', ARGV[7]) end
      redis.call('HSET', k, 'wh_state', 'failed', 'wh_claimer', '')
      redis.call('ZREM', P .. 'hooks', id)
    else
      redis.call('HSET', k, 'wh_attempts', attempts + 1, 'wh_claimer', claimer)
      redis.call('ZADD', P .. 'hooks', t + lease, id)
      out[#out + 1] = id
      out[#out + 1] = attempts + 1
    end
  end
end
return out
"""

# ARGV: P, maxlen, id, claimer, attempt, state ('delivered'|'failed'|'pending'), status, error, retry_in
_FINISH_WEBHOOK = _LUA_COMMON + r"""
local id = ARGV[3]
local k = P .. 'job:' .. id
local h = redis.call('HMGET', k, 'wh_state', 'wh_claimer', 'wh_attempts')
if h[1] ~= 'pending' or h[2] ~= ARGV[4] or h[3] ~= ARGV[5] then return 0 end
redis.call('HSET', k, 'wh_state', ARGV[6], 'wh_status', ARGV[7], 'wh_error', ARGV[8], 'wh_claimer', '')
if ARGV[6] == 'pending' then
  redis.call('ZADD', P .. 'hooks', now() + tonumber(ARGV[9]), id)
else
  redis.call('ZREM', P .. 'hooks', id)
end
return 1
"""

# ARGV: P, maxlen, id, worker, seq, data  -> 1 appended (or already there, same bytes), 0 not held; errors
_APPEND_CHUNK = _LUA_COMMON + r"""
local id, worker, seq = ARGV[3], ARGV[4], tonumber(ARGV[5])
local k = P .. 'job:' .. id
local h = redis.call('HMGET', k, 'state', 'worker_id', 'claims')
if h[1] ~= 'PROCESSING' or h[2] ~= worker then return 0 end
local attempt = tonumber(h[3] or '0') or 0
local s = P .. 'chunks:' .. id
local have = 0
local last = redis.call('XREVRANGE', s, '+', '-', 'COUNT', 1)
if #last > 0 then
  local a, n = string.match(last[1][1], '^(%d+)-(%d+)$')
  if tonumber(a) == attempt then have = tonumber(n) end
end
if seq < have then
  local e = redis.call('XRANGE', s, attempt .. '-' .. (seq + 1), attempt .. '-' .. (seq + 1))
  if #e == 1 and e[1][2][2] == ARGV[6] then return 1 end
  return redis.error_reply('chunk ' .. seq .. ' of this attempt is already stored with other data')
end
if seq > have then
  return redis.error_reply('chunk ' .. seq .. ' would leave a gap: the next chunk of this attempt is ' .. have)
end
redis.call('XADD', s, attempt .. '-' .. (seq + 1), 'd', ARGV[6])
return 1
"""

# ARGV: P, maxlen, id, attempt ('' = current), after, limit  -> false (unknown) or
#   {state, attempt, restarted (0|1), more (0|1), seq, data, seq, data, ...}   (read-only)
_READ_CHUNKS = _LUA_COMMON + r"""
local id = ARGV[3]
local h = redis.call('HMGET', P .. 'job:' .. id, 'state', 'claims', 'worker_id')
if not h[1] then return false end
local state, claims = h[1], tonumber(h[2] or '0') or 0
local over = (state == 'QUEUED' and claims > 0) or (state == 'PROCESSING' and (h[3] or '') == '')
if ARGV[4] ~= '' and (tonumber(ARGV[4]) ~= claims or over) then return {state, claims, 1, 0} end
if over then return {state, claims, 0, 0} end       -- what is left of an attempt that is over: nobody's to read
local limit = tonumber(ARGV[6])
local entries = redis.call('XRANGE', P .. 'chunks:' .. id, claims .. '-' .. (tonumber(ARGV[5]) + 2),
                           claims .. '-18446744073709551615', 'COUNT', limit + 1)
local out = {state, claims, 0, (#entries > limit) and 1 or 0}
for i = 1, math.min(#entries, limit) do
  local _, n = string.match(entries[i][1], '^(%d+)-(%d+)$')
  out[#out + 1] = tonumber(n) - 1
  out[#out + 1] = entries[i][2][2]
end
return out
"""

# What the scripts carry when no billing is attached (RedisJobStore.attach_billing composes the account store's
# BILLING_LUA in its place).
_NO_BILLING = r"""
local function billing_settle(job_id, metrics_json, at) end
local function billing_release(job_id, note, at) end
"""

_ERROR_CODES = {redis.exceptions.OutOfMemoryError: "OOM", redis.exceptions.ReadOnlyError: "READONLY",
                redis.exceptions.NoPermissionError: "NOPERM"}   # redis-py strips these codes from the message

# --- (de)serialisation ---------------------------------------------------------------------------------------

def _num(v: str) -> float | None:
    return float(v) if v else None


def _job_fields(job: Job) -> list[str]:
    def s(v: Any) -> str:
        return "" if v is None else (f"{v:.6f}" if isinstance(v, float) else str(v))
    # A submitted job starts afresh: QUEUED, no attempts, whatever the object said.
    return ["id", job.id, "owner", job.owner, "params", json.dumps(job.params), "state", JobState.QUEUED.value,
            "created_at", s(float(job.created_at)), "started_at", "", "finished_at", "", "attempts", "0",
            "error", "", "metrics", json.dumps(job.metrics or {}), "media_type", "", "worker_id", "",
            "lease_until", "", "audio_path", "", "retry_reason", "", "webhook_url", job.webhook_url or "",
            "base_url", job.base_url or "", "cancelled", "", "wh_state", "", "wh_attempts", "0", "wh_status", "",
            "wh_error", "", "wh_claimer", "", "claims", "0", "model", job.model or DEFAULT_MODEL]


def _job_from_hash(h: dict[str, str]) -> Job:
    webhook = None
    if h.get("webhook_url"):
        status = h.get("wh_status") or ""
        webhook = {"state": h.get("wh_state") or "pending", "attempts": int(h.get("wh_attempts") or 0),
                   "last_status": int(status) if status.isdigit() else None, "last_error": h.get("wh_error") or None}
    return Job(id=h["id"], owner=h.get("owner", ""), params=json.loads(h.get("params") or "{}"),
               state=JobState(h["state"]), created_at=float(h["created_at"]),
               started_at=_num(h.get("started_at", "")), finished_at=_num(h.get("finished_at", "")),
               attempts=int(h.get("attempts") or 0), error=h.get("error") or None,
               metrics=json.loads(h.get("metrics") or "{}"), media_type=h.get("media_type") or None,
               worker_id=h.get("worker_id") or None, lease_until=_num(h.get("lease_until", "")),
               webhook_url=h.get("webhook_url") or None, base_url=h.get("base_url") or None,
               cancelled=h.get("cancelled") == "1", webhook=webhook, model=h.get("model") or DEFAULT_MODEL)


def _decode(raw: dict | list) -> dict[str, str]:
    if isinstance(raw, list):  # a Lua HGETALL reply: [k1, v1, k2, v2, ...]
        raw = dict(zip(raw[0::2], raw[1::2]))
    return {k.decode(): v.decode() for k, v in raw.items()}


class RedisJobStore(JobStore):
    """The job store on Redis. `url`: redis://[user:password@]host:port/db (rediss:// for TLS, unix://).

    retention: seconds terminal jobs and their audio live (a Redis TTL set when the job finishes).
    audio_dir: a directory shared by every replica and worker for outputs over `inline_max_bytes`
    (None: all audio in Redis). timeout: seconds before an unresponsive Redis counts as unavailable."""

    def __init__(self, url: str, prefix: str = "cbx:", retention: float = 3600.0, audio_dir: str | None = None,
                 inline_max_bytes: int = 1 << 20, timeout: float = 5.0) -> None:
        self.url = url
        self.prefix = prefix
        self.retention = float(retention)
        self.audio_dir = Path(audio_dir) if audio_dir else None
        self.inline_max_bytes = inline_max_bytes
        if self.audio_dir is not None:
            self.audio_dir.mkdir(parents=True, exist_ok=True)
        common = dict(socket_connect_timeout=min(2.0, timeout), health_check_interval=15,
                      retry=Retry(ExponentialBackoff(cap=0.25, base=0.02), 2))
        self.r = redis.Redis.from_url(url, socket_timeout=timeout, **common)
        # Blocking reads (`wait`) get their own connections, with a read timeout longer than the block time.
        self._blocking = redis.Redis.from_url(url, socket_timeout=timeout + 5.0, **common)
        self._register_scripts(None)
        self._waiters: dict[str, list[threading.Event]] = {}
        self._waiters_lock = threading.Lock()
        self._listener_lock = threading.Lock()
        self._listener: threading.Thread | None = None
        self._closed = threading.Event()

    # --- plumbing -----------------------------------------------------------------------------------------
    def _register_scripts(self, billing_lua: str | None) -> None:
        billing = _NO_BILLING if billing_lua is None else billing_lua

        def compose(src: str) -> str:
            assert src.startswith(_LUA_COMMON)
            return _LUA_COMMON + billing + src[len(_LUA_COMMON):]
        self._scripts = {name: self.r.register_script(compose(src)) for name, src in (
            ("submit", _SUBMIT), ("claim", _CLAIM), ("heartbeat", _HEARTBEAT), ("complete", _COMPLETE),
            ("fail", _FAIL), ("release", _RELEASE), ("retry_later", _RETRY_LATER), ("recover", _RECOVER),
            ("purge", _PURGE), ("cancel", _CANCEL), ("position", _POSITION), ("progress", _PROGRESS),
            ("idempotency", _IDEMPOTENCY), ("idempotency_release", _IDEMPOTENCY_RELEASE),
            ("claim_webhooks", _CLAIM_WEBHOOKS), ("finish_webhook", _FINISH_WEBHOOK),
            ("append_chunk", _APPEND_CHUNK), ("read_chunks", _READ_CHUNKS))}

    def attach_billing(self, account_store) -> None:
        """Bill jobs with their terminal transitions: `account_store` is the Redis account store on this server
        under this prefix (accounts.account_store_for(store)); its BILLING_LUA joins our scripts."""
        if account_store is None:
            self._register_scripts(None)
            return
        lua = getattr(account_store, "billing_lua", None)
        if not isinstance(lua, str):
            raise ValueError("Redis jobs are billed by the Redis account store beside them")
        if getattr(account_store, "prefix", None) != self.prefix:
            raise ValueError(f"the account store's prefix {account_store.prefix!r} is not the job store's "
                             f"{self.prefix!r}")
        if not self._same_server(getattr(account_store, "r", None)):
            raise ValueError("the account store is not on the job store's Redis server and database")
        self._register_scripts(lua)

    def _same_server(self, client: Any) -> bool:
        if client is self.r:
            return True
        if client is None or not hasattr(client, "connection_pool"):
            return False
        keys = ("host", "port", "db", "path", "username")
        mine, theirs = self.r.connection_pool.connection_kwargs, client.connection_pool.connection_kwargs
        return all(mine.get(k) == theirs.get(k) for k in keys)

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _run(self, name: str, *args: Any) -> Any:
        return self._call(self._scripts[name], args=[self.prefix, EVENTS_MAXLEN, *args])

    def _call(self, fn, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError) as e:
            raise StoreUnavailable(f"the job store (Redis at {self._where()}) is unavailable: {e}") from e
        except redis.ResponseError as e:
            if str(e).startswith(("LOADING", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN")):
                raise StoreUnavailable(f"the job store (Redis at {self._where()}) is unavailable: {e}") from e
            raise

    def _where(self) -> str:
        kw = self.r.connection_pool.connection_kwargs
        if "path" in kw:
            return kw["path"]
        return f"{kw.get('host', '?')}:{kw.get('port', '?')}"

    def _ms(self, seconds: float) -> int:
        return max(1, int(seconds * 1000))

    def ping(self) -> bool:
        return bool(self._call(self.r.ping))

    # --- API side -----------------------------------------------------------------------------------------
    def submit(self, job: Job, max_queued: int, model: str | None = None) -> None:
        if model is not None:
            job.model = model
        job.model = job.model or DEFAULT_MODEL
        ok = self._run("submit", job.id, job.owner, f"{float(job.created_at):.6f}", int(max_queued), job.model,
                       *_job_fields(job))
        if not ok:
            raise QueueFull(f"the queue is full ({max_queued} jobs waiting)")

    def get(self, job_id: str) -> Job | None:
        h = self._call(self.r.hgetall, self._k("job", job_id))
        return _job_from_hash(_decode(h)) if h else None

    def get_audio(self, job_id: str) -> tuple[bytes, str] | None:
        pipe = self.r.pipeline(transaction=False)
        pipe.hmget(self._k("job", job_id), "state", "media_type", "audio_path")
        pipe.get(self._k("audio", job_id))
        (state, media_type, path), data = self._call(pipe.execute)
        if state != b"COMPLETED" or not media_type:
            return None
        if path:
            try:
                data = Path(path.decode()).read_bytes()
            except FileNotFoundError:
                return None
        if data is None:
            return None
        return data, media_type.decode()

    def wait(self, job_id: str, timeout: float) -> Job | None:
        deadline = time.monotonic() + max(0.0, timeout)
        event = threading.Event()
        with self._waiters_lock:
            self._waiters.setdefault(job_id, []).append(event)
        try:
            self._ensure_listener()
            while True:
                job = self.get(job_id)
                if job is None or job.state.terminal:
                    return job
                left = deadline - time.monotonic()
                if left <= 0:
                    return job
                # Woken by the events listener; the periodic re-check covers a listener that is reconnecting.
                event.wait(min(left, 1.0))
                event.clear()
        finally:
            with self._waiters_lock:
                events = self._waiters.get(job_id, [])
                if event in events:
                    events.remove(event)
                if not events:
                    self._waiters.pop(job_id, None)

    def _ensure_listener(self) -> None:
        if self._listener is not None and self._listener.is_alive():
            return
        with self._listener_lock:
            if self._listener is None or not self._listener.is_alive():
                # Position the listener before any waiter re-checks its job, so no completion falls between.
                key = self._k("events")
                info = self._call(self._events_position, key)
                self._listener = threading.Thread(target=self._listen, args=(key, info), daemon=True,
                                                  name="redis-job-events")
                self._listener.start()

    def _events_position(self, key: str) -> bytes:
        try:
            return self.r.xinfo_stream(key)["last-generated-id"]
        except redis.ResponseError:  # no such key yet
            return b"0-0"

    def _listen(self, key: str, last: bytes) -> None:
        while not self._closed.is_set():
            try:
                reply = self._blocking.xread({key: last}, count=1000, block=1000)
            except Exception as e:  # Redis away: keep the position and retry; waiters re-check meanwhile
                log.debug("events listener: %s", e)
                self._closed.wait(0.5)
                continue
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    job_id = fields.get(b"job", b"").decode()
                    with self._waiters_lock:
                        for ev in self._waiters.get(job_id, []):
                            ev.set()

    def watch_new_work(self, callback) -> None:
        """Call `callback()` (from a background thread) whenever a job is queued, so that a remote worker
        claims at once rather than at its next poll. Best effort: a missed message only costs a poll interval."""
        threading.Thread(target=self._watch_new_work, args=(callback,), name="redis-new-work", daemon=True).start()

    def _watch_new_work(self, callback) -> None:
        channel = self._k("new-work")
        while not self._closed.is_set():
            pubsub = self._blocking.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(channel)
                callback()      # anything queued while (re)connecting
                while not self._closed.is_set():
                    if pubsub.get_message(timeout=1.0) is not None:
                        callback()
            except Exception as e:  # Redis away: resubscribe when it returns; the worker polls meanwhile
                log.debug("new-work watcher: %s", e)
                self._closed.wait(0.5)
            finally:
                try:
                    pubsub.close()
                except Exception:
                    pass

    def stats(self) -> StoreStats:
        cutoff = time.time() - self.retention
        pipe = self.r.pipeline(transaction=False)
        pipe.zcard(self._k("queued"))
        pipe.zcard(self._k("leases"))
        pipe.zcount(self._k("done", "COMPLETED"), cutoff, "+inf")
        pipe.zcount(self._k("done", "FAILED"), cutoff, "+inf")
        pipe.zrange(self._k("queued"), 0, 0, withscores=True)
        pipe.smembers(self._k("workers"))
        pipe.smembers(self._k("models"))
        queued, processing, completed, failed, oldest, worker_ids, models = self._call(pipe.execute)
        by_model: dict[str, int] = {}
        others = sorted(m.decode() for m in models if m.decode() != DEFAULT_MODEL)
        if others:
            pipe = self.r.pipeline(transaction=False)
            for m in others:
                pipe.zcard(self._k("mq", m))
            counts = self._call(pipe.execute)
            by_model = {m: n for m, n in zip(others, counts) if n}
        default = queued - sum(by_model.values())
        if default > 0:
            by_model[DEFAULT_MODEL] = default
        workers: dict[str, dict] = {}
        if worker_ids:
            ids = sorted(w.decode() for w in worker_ids)
            infos = self._call(self.r.mget, [self._k("worker", w) for w in ids])
            gone = []
            for w, info in zip(ids, infos):
                if info is None:
                    gone.append(w)
                else:
                    workers[w] = json.loads(info)
            if gone:
                self._call(self.r.srem, self._k("workers"), *gone)
        age = max(0.0, time.time() - oldest[0][1]) if oldest else 0.0
        return StoreStats(by_state={"QUEUED": queued, "PROCESSING": processing, "COMPLETED": completed,
                                    "FAILED": failed},
                          oldest_queued_age=age, workers=workers, queued_by_model=by_model)

    # --- worker side --------------------------------------------------------------------------------------
    def claim(self, worker_id: str, limit: int, lease_seconds: float,
              models: Sequence[str] | None = None) -> list[Job]:
        if limit <= 0 or (models is not None and not models):
            return []
        which = ["*"] if models is None else ["", *sorted(set(models))]
        replies = self._run("claim", worker_id, int(limit), float(lease_seconds), *which)
        return [_job_from_hash(_decode(r)) for r in replies]

    def heartbeat(self, worker_id: str, job_ids: list[str], lease_seconds: float, info: dict | None = None) -> None:
        self._run("heartbeat", worker_id, float(lease_seconds), json.dumps(info or {}),
                  self._ms(lease_seconds), *job_ids)

    def complete(self, job_id: str, worker_id: str, audio: bytes, media_type: str, metrics: dict) -> bool:
        retention_ms = self._ms(self.retention)
        if self.audio_dir is not None and len(audio) > self.inline_max_bytes:
            path = self.audio_dir / f"{job_id}.{uuid.uuid4().hex[:12]}"
            write_atomically(path, audio)
            try:
                ok = self._run("complete", job_id, worker_id, media_type, json.dumps(metrics), retention_ms,
                               "file", str(path))
            except BaseException:
                path.unlink(missing_ok=True)
                raise
            if not ok:
                path.unlink(missing_ok=True)
            return bool(ok)
        return bool(self._run("complete", job_id, worker_id, media_type, json.dumps(metrics), retention_ms,
                              "inline", audio))

    def fail(self, job_id: str, worker_id: str | None, error: str, metrics: dict | None = None) -> bool:
        return bool(self._run("fail", job_id, worker_id or "", error,
                              "" if metrics is None else json.dumps(metrics), self._ms(self.retention),
                              error[:200]))

    def release(self, job_id: str, worker_id: str) -> bool:
        return bool(self._run("release", job_id, worker_id))

    def retry_later(self, job_id: str, worker_id: str, reason: str, delay: float) -> bool:
        return bool(self._run("retry_later", job_id, worker_id, repr(max(0.0, float(delay))), reason))

    def writable(self) -> str | None:
        try:
            self.r.set(self._k("probe"), repr(time.time()), px=10_000)
        except redis.exceptions.BusyLoadingError:
            return "Redis is loading its data"
        except (redis.ConnectionError, redis.TimeoutError):
            return "Redis cannot be reached"
        except redis.ResponseError as e:    # OOM (maxmemory), READONLY (a replica), MISCONF (cannot persist), ...
            code = (getattr(e, "status_code", None) or _ERROR_CODES.get(type(e))
                    or (str(e).split() or ["error"])[0])
            return f"Redis refuses writes ({code})"
        if self.audio_dir is not None:
            problem = probe_directory(self.audio_dir)
            if problem is not None:
                return f"audio files cannot be written ({problem})"
        return None

    # --- queue conventions ------------------------------------------------------------------------------
    def cancel(self, job_id: str) -> Job | None:
        self._run("cancel", job_id, CANCELLED_REASON, self._ms(self.retention))
        return self.get(job_id)

    def queue_position(self, job_id: str) -> int | None:
        position = int(self._run("position", job_id))
        return None if position < 0 else position

    def job_events(self, job_id: str, after: int = 0, limit: int = 1000) -> list[JobEvent]:
        start = max(0, int(after))
        raw = self._call(self.r.lrange, self._k("ev", job_id), start, start + max(1, int(limit)) - 1)
        out = []
        for seq, item in enumerate(raw, start + 1):
            data = json.loads(item)
            kind = data.pop("type", "state")
            out.append(JobEvent(seq=seq, type=kind, data=data))
        return out

    def progress(self, worker_id: str, updates: dict[str, dict]) -> set[str]:
        if not updates:
            return set()
        args: list[str] = []
        now = round(time.time(), 6)
        for job_id, data in updates.items():
            args += [job_id, json.dumps({**data, "type": "progress", "at": now}) if data else ""]
        return {i.decode() for i in self._run("progress", worker_id, *args)}

    def append_chunk(self, job_id: str, worker_id: str, seq: int, data: bytes) -> bool:
        try:
            return bool(self._run("append_chunk", job_id, worker_id, int(seq), bytes(data)))
        except redis.ResponseError as e:
            if "already stored" in str(e) or "leave a gap" in str(e):
                raise ValueError(str(e)) from None
            raise

    def read_chunks(self, job_id: str, after: int = -1, attempt: int | None = None,
                    limit: int = 100) -> ChunkRead | None:
        limit = max(1, int(limit))
        raw = self._run("read_chunks", job_id, "" if attempt is None else int(attempt), int(after), limit)
        if not raw:
            return None
        state, current, restarted, more = JobState(raw[0].decode()), int(raw[1]), bool(raw[2]), bool(raw[3])
        if restarted:
            return ChunkRead(state=state, attempt=current, chunks=[], restarted=True)
        chunks = [AudioChunk(seq=int(raw[i]), data=raw[i + 1]) for i in range(4, len(raw), 2)]
        return ChunkRead(state=state, attempt=current, chunks=chunks, end=state.terminal and not more)

    @staticmethod
    def _key_hash(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    def claim_idempotency_key(self, owner: str, key: str, fingerprint: str, job_id: str, ttl: float,
                              stale_after: float = 30.0) -> IdempotencyRecord | None:
        raw = self._run("idempotency", owner, self._key_hash(key), fingerprint, job_id, self._ms(ttl),
                        repr(float(stale_after)))
        if raw is None:
            return None
        rec = json.loads(raw)
        return IdempotencyRecord(job_id=rec["job_id"], fingerprint=rec["fingerprint"], created_at=float(rec["at"]))

    def release_idempotency_key(self, owner: str, key: str, job_id: str) -> None:
        self._run("idempotency_release", owner, self._key_hash(key), job_id)

    def claim_webhooks(self, claimer: str, limit: int, lease_seconds: float,
                       max_attempts: int) -> list[WebhookDelivery]:
        if limit <= 0:
            return []
        raw = self._run("claim_webhooks", claimer, int(limit), repr(float(lease_seconds)), int(max_attempts),
                        LOST_ATTEMPT)
        return [WebhookDelivery(job_id=raw[i].decode(), attempt=int(raw[i + 1])) for i in range(0, len(raw), 2)]

    def finish_webhook(self, job_id: str, claimer: str, attempt: int, outcome: str, status: int | None = None,
                       error: str | None = None, retry_in: float = 0.0) -> bool:
        state = {"delivered": "delivered", "failed": "failed", "retry": "pending"}[outcome]
        return bool(self._run("finish_webhook", job_id, claimer, int(attempt), state,
                              "" if status is None else int(status), error or "", repr(max(0.0, float(retry_in)))))

    # --- maintenance --------------------------------------------------------------------------------------
    def recover_expired(self, max_attempts: int) -> int:
        total = 0
        while True:
            n = int(self._run("recover", int(max_attempts), self._ms(self.retention), BATCH))
            total += n
            if n < BATCH:
                return total

    def purge_expired(self, retention_seconds: float) -> int:
        total = 0
        while True:
            ids = [i.decode() for i in self._run("purge", float(retention_seconds), BATCH)]
            total += len(ids)
            if self.audio_dir is not None:
                for job_id in ids:
                    for f in self.audio_dir.glob(f"{job_id}.*"):
                        try:
                            f.unlink(missing_ok=True)
                        except OSError:     # left to the orphan sweep
                            pass
            if len(ids) < BATCH:
                break
        if self.audio_dir is not None:
            self._sweep_orphan_files(retention_seconds)
        return total

    def _sweep_orphan_files(self, retention_seconds: float) -> None:
        """Files left by a worker that died between writing the audio and completing the job."""
        cutoff = time.time() - max(retention_seconds, self.retention) - 600
        try:
            entries = list(self.audio_dir.iterdir())
        except OSError:         # the directory is away (a broken mount): nothing to sweep now
            return
        for f in entries:
            try:
                if f.stat().st_mtime < cutoff:
                    f.unlink(missing_ok=True)
            except OSError:     # gone meanwhile, or the disk refuses: the next sweep tries again
                pass

    def events(self, count: int = EVENTS_MAXLEN) -> list[dict[str, str]]:
        """The most recent terminal transitions, oldest first: [{"job", "state", "worker"}]."""
        entries = self._call(self.r.xrange, self._k("events"), count=count)
        return [{k.decode(): v.decode() for k, v in fields.items()} for _id, fields in entries]

    def close(self) -> None:
        self._closed.set()
        if self._listener is not None:
            self._blocking.connection_pool.disconnect()   # interrupts a blocked XREAD
            self._listener.join(timeout=3)
        self.r.close()
        self._blocking.close()
