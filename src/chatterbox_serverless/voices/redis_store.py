"""Redis voice store: keys on the job store's server under its prefix (`RedisVoiceStore.beside(job_store)` shares
its connection pool). Creation and deletion are Lua scripts (the count limit and name check are atomic).

    voice:<id>          hash    the voice's fields
    voiceaudio:<id>     string  the clip as uploaded
    voicecond:<id>      hash    variant -> conditionals
    voicenames:<owner>  hash    name -> id
    voicesof:<owner>    zset    ids by created_at
"""
from __future__ import annotations

import os
from typing import Any

import redis

from ..jobs.store import StoreUnavailable
from .store import DuplicateVoiceName, Voice, VoiceLimitReached, VoiceStore

_CREATE = """
local p, id, owner, name, max = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local n = redis.call('ZCARD', p .. 'voicesof:' .. owner)
if n >= max then return {'limit', n} end
if redis.call('HEXISTS', p .. 'voicenames:' .. owner, name) == 1 then return {'duplicate', n} end
local nfields = tonumber(ARGV[8])
local fields = {}
for i = 1, nfields do fields[i] = ARGV[8 + i] end
redis.call('HSET', p .. 'voice:' .. id, unpack(fields))
redis.call('SET', p .. 'voiceaudio:' .. id, ARGV[6])
redis.call('HSET', p .. 'voicenames:' .. owner, name, id)
redis.call('ZADD', p .. 'voicesof:' .. owner, ARGV[7], id)
local i = 9 + nfields
while i < #ARGV do
  redis.call('HSET', p .. 'voicecond:' .. id, ARGV[i], ARGV[i + 1])
  i = i + 2
end
return {'ok', n + 1}
"""

_DELETE = """
local p, owner, id = ARGV[1], ARGV[2], ARGV[3]
local key = p .. 'voice:' .. id
local fields = redis.call('HMGET', key, 'owner', 'name')
if not fields[1] or fields[1] ~= owner then return 0 end
redis.call('DEL', key, p .. 'voiceaudio:' .. id, p .. 'voicecond:' .. id)
redis.call('HDEL', p .. 'voicenames:' .. owner, fields[2])
redis.call('ZREM', p .. 'voicesof:' .. owner, id)
return 1
"""

_PUT_CONDS = """
local p, id = ARGV[1], ARGV[2]
if redis.call('EXISTS', p .. 'voice:' .. id) == 0 then return 0 end
redis.call('HSETNX', p .. 'voicecond:' .. id, ARGV[3], ARGV[4])
return 1
"""


def _voice(raw: dict) -> Voice | None:
    if not raw:
        return None
    f = {k.decode(): v.decode() for k, v in raw.items()}
    return Voice(id=f["id"], owner=f["owner"], name=f["name"], created_at=float(f["created_at"]),
                 audio_bytes=int(f["audio_bytes"]), seconds=float(f["seconds"]), sample_rate=int(f["sample_rate"]),
                 format=f["format"])


class RedisVoiceStore(VoiceStore):
    def __init__(self, url: str | None = None, prefix: str | None = None, client: redis.Redis | None = None,
                 timeout: float = 5.0):
        prefix = prefix if prefix is not None else os.environ.get("CHATTERBOX_REDIS_PREFIX", "cbx:")
        if client is None:
            if url is None:
                raise ValueError("give a Redis URL or a client")
            client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=min(2.0, timeout))
            self._own_client = True
        else:
            self._own_client = False
        self.r, self.prefix = client, prefix
        self._scripts = {name: client.register_script(src) for name, src in (
            ("create", _CREATE), ("delete", _DELETE), ("put", _PUT_CONDS))}

    @classmethod
    def beside(cls, job_store: Any) -> "RedisVoiceStore":
        return cls(prefix=job_store.prefix, client=job_store.r)

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _call(self, fn, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise StoreUnavailable(f"the voice store (Redis) is unavailable: {e}") from e

    def _run(self, name: str, *args: Any) -> Any:
        return self._call(self._scripts[name], args=[self.prefix, *args])

    def create(self, voice: Voice, audio: bytes, *, max_per_owner: int,
               conditionals: dict[str, bytes] | None = None) -> Voice:
        fields = ["id", voice.id, "owner", voice.owner, "name", voice.name, "created_at", repr(voice.created_at),
                  "audio_bytes", voice.audio_bytes, "seconds", repr(voice.seconds), "sample_rate", voice.sample_rate,
                  "format", voice.format]
        conds = [x for variant, data in (conditionals or {}).items() for x in (variant, data)]
        status, n = self._run("create", voice.id, voice.owner, voice.name, int(max_per_owner), audio,
                              repr(voice.created_at), len(fields), *fields, *conds)
        status = status.decode() if isinstance(status, bytes) else status
        if status == "limit":
            raise VoiceLimitReached(f"this key has {n} voices, the most this server keeps per key "
                                    f"({max_per_owner}); delete one first")
        if status == "duplicate":
            raise DuplicateVoiceName(f"this key already has a voice named {voice.name!r}")
        return voice

    def get(self, voice_id: str) -> Voice | None:
        return _voice(self._call(self.r.hgetall, self._k("voice", voice_id)))

    def get_by_name(self, owner: str, name: str) -> Voice | None:
        voice_id = self._call(self.r.hget, self._k("voicenames", owner), name)
        return self.get(voice_id.decode()) if voice_id else None

    def list(self, owner: str) -> list[Voice]:
        ids = self._call(self.r.zrange, self._k("voicesof", owner), 0, -1)
        pipe = self.r.pipeline(transaction=False)
        for i in ids:
            pipe.hgetall(self._k("voice", i.decode()))
        voices = [_voice(raw) for raw in self._call(pipe.execute)]
        return sorted((v for v in voices if v is not None), key=lambda v: (v.created_at, v.id))

    def count(self, owner: str) -> int:
        return int(self._call(self.r.zcard, self._k("voicesof", owner)))

    def delete(self, owner: str, voice_id: str) -> bool:
        return bool(self._run("delete", owner, voice_id))

    def audio(self, voice_id: str) -> bytes | None:
        return self._call(self.r.get, self._k("voiceaudio", voice_id))

    def conditionals(self, voice_id: str, variant: str) -> bytes | None:
        return self._call(self.r.hget, self._k("voicecond", voice_id), variant)

    def put_conditionals(self, voice_id: str, variant: str, data: bytes) -> bool:
        return bool(self._run("put", voice_id, variant, data))

    def close(self) -> None:
        if self._own_client:
            self.r.close()
