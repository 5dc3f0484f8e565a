"""The voice library: what the API and the worker do with library voices, over a `VoiceStore`.

    API     create(owner, name, clip bytes)   decode and check the clip; with an engine in this process, compute
                                              its conditionals now (a clip the model cannot use is refused here)
            resolve(owner, value)             a request's `voice` -> a voice id, or None for the built-in voice
    worker  load(voice_id)                    the voice for the engine: its stored conditionals for the engine's
                                              variant; the first time a variant needs them (an API without an
                                              engine), computed from the clip and stored, once per variant

A voice named in a request is resolved at submit (the job records its id). Deleting a voice that queued jobs
use: those jobs FAIL with a reason saying so when they are run, nothing is billed for them (a FAILED job's
hold is released); a job whose voice was loaded already finishes normally.
"""
from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from typing import Any, Iterable

from ..engine.contract import PreparedVoice, VoiceAudio
from .store import Voice, VoiceStore

log = logging.getLogger(__name__)

BUILTIN_VOICE = "default"             # the model's built-in voice (conds.pt)
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse",
                 "marin", "cedar")
ID_PREFIX = "voice_"
MAX_NAME = 64
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]*")
_ID = re.compile(r"voice_[0-9a-f]{32}")


class VoiceError(Exception):
    """A request about voices that cannot be served: `status` (400, 404, 409, 429...) and a message for the
    client naming `param` when there is one."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class VoiceGone(Exception):
    """The job's voice was deleted before the job ran."""


def parse_voice_map(entries: Iterable[str]) -> dict[str, str]:
    """`alloy=default`, `echo=voice_...`, `nova=NAME` -> {openai name: target}; ValueError naming the entry."""
    out: dict[str, str] = {}
    for entry in entries:
        name, eq, target = entry.partition("=")
        name, target = name.strip().lower(), target.strip()
        if not eq or not target:
            raise ValueError(f"{entry!r} is not NAME=VOICE")
        if name not in OPENAI_VOICES:
            raise ValueError(f"{name!r} is not one of OpenAI's voice names ({', '.join(OPENAI_VOICES)})")
        out[name] = target
    return out


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise VoiceError(400, "parameter 'name': a voice needs a name", "name")
    name = name.strip()
    if len(name) > MAX_NAME or not _NAME.fullmatch(name):
        raise VoiceError(400, f"parameter 'name': at most {MAX_NAME} letters, digits, spaces, '.', '_' or '-', "
                              "starting with a letter or digit", "name")
    if name.lower() == BUILTIN_VOICE or name.lower() in OPENAI_VOICES:
        raise VoiceError(400, f"parameter 'name': {name!r} is a built-in voice name; choose another", "name")
    if name.startswith(ID_PREFIX):
        raise VoiceError(400, f"parameter 'name': names must not start with {ID_PREFIX!r} (voice ids do)", "name")
    return name


class VoiceLibrary:
    def __init__(self, store: VoiceStore, engine: Any = None, *, max_voices: int = 20,
                 max_bytes: int = 10_000_000, voice_map: dict[str, str] | None = None):
        self.store = store
        self.engine = engine                 # in this process (prepare at creation), or None
        self.max_voices = max_voices
        self.max_bytes = max_bytes
        self.voice_map = dict(voice_map or {})
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # --- API ----------------------------------------------------------------------------------------------------
    def create(self, owner: str, name: Any, audio: bytes) -> Voice:
        from ..media import MediaError
        from ..media.decode import decode_audio, probe_audio
        name = check_name(name)
        if not audio:
            raise VoiceError(400, "parameter 'audio_sample': the audio is empty", "audio_sample")
        if len(audio) > self.max_bytes:
            raise VoiceError(400, f"parameter 'audio_sample': {len(audio)} bytes is more than this server's limit "
                                  f"of {self.max_bytes}", "audio_sample")
        if self.store.count(owner) >= self.max_voices:      # checked again atomically by the store
            raise VoiceError(409, f"this key has {self.max_voices} voices, the most this server keeps per key; "
                                  "delete one first")
        if self.store.get_by_name(owner, name) is not None:
            raise VoiceError(409, f"this key already has a voice named {name!r}", "name")
        try:
            clip = decode_audio(audio)
            fmt = probe_audio(audio).format
        except MediaError as e:
            raise VoiceError(400, f"parameter 'audio_sample': {e}", "audio_sample") from None
        conditionals = {}
        if self.engine is not None and hasattr(self.engine, "prepare_voice"):
            try:
                prepared = self.engine.prepare_voice(clip)
            except ValueError as e:   # silent, too short for the model, no speaker embedding
                raise VoiceError(400, f"parameter 'audio_sample': {e}", "audio_sample") from None
            conditionals[prepared.variant] = prepared.data
        voice = Voice(id=ID_PREFIX + uuid.uuid4().hex, owner=owner, name=name, created_at=time.time(),
                      audio_bytes=len(audio), seconds=len(clip.samples) / clip.sample_rate,
                      sample_rate=clip.sample_rate, format=fmt)
        from .store import DuplicateVoiceName, VoiceLimitReached
        try:
            return self.store.create(voice, audio, max_per_owner=self.max_voices, conditionals=conditionals)
        except DuplicateVoiceName as e:
            raise VoiceError(409, str(e), "name") from None
        except VoiceLimitReached as e:
            raise VoiceError(409, str(e)) from None

    def get(self, owner: str, voice_id: str) -> Voice:
        """The owner's voice by id (or name); another key's voice is not found."""
        voice = self._find(owner, voice_id)
        if voice is None:
            shown = voice_id if len(voice_id) <= 80 else voice_id[:80] + "…"
            raise VoiceError(404, f"voice {shown!r} not found")
        return voice

    def list(self, owner: str) -> list[Voice]:
        return self.store.list(owner)

    def delete(self, owner: str, voice_id: str) -> Voice:
        voice = self.get(owner, voice_id)
        if not self.store.delete(owner, voice.id):
            raise VoiceError(404, f"voice {voice_id!r} not found")
        return voice

    def resolve(self, owner: str, value: str) -> str | None:
        """A request's `voice`: None for the built-in voice, else the id of a library voice the caller may use
        (its own, by id or name, or the one the operator mapped an OpenAI voice name to)."""
        if not isinstance(value, str) or not value.strip():
            raise VoiceError(400, "parameter 'voice': must be a voice name or id", "voice")
        value = value.strip()
        if value.lower() == BUILTIN_VOICE:
            return None
        if value.lower() in OPENAI_VOICES:
            target = self.voice_map.get(value.lower(), BUILTIN_VOICE)
            if target.lower() == BUILTIN_VOICE:
                return None
            voice = self.store.get(target) if _ID.fullmatch(target) else self.store.get_by_name(owner, target)
            if voice is None:
                raise VoiceError(400, f"parameter 'voice': {value!r} is mapped by this server to the library voice "
                                      f"{target!r}, which does not exist" + ("" if _ID.fullmatch(target) else
                                                                             " for this key"), "voice")
            return voice.id
        voice = self._find(owner, value)
        if voice is None:
            shown = value if len(value) <= 80 else value[:80] + "…"
            raise VoiceError(400, f"parameter 'voice': no voice {shown!r}: use '{BUILTIN_VOICE}', one of "
                                  f"OpenAI's names, or the id or name of a voice of this key (GET /v1/audio/voices)",
                             "voice")
        return voice.id

    def _find(self, owner: str, value: str) -> Voice | None:
        if _ID.fullmatch(value):
            voice = self.store.get(value)
            return voice if voice is not None and voice.owner == owner else None
        if value.startswith(ID_PREFIX) or len(value) > MAX_NAME:
            return None
        return self.store.get_by_name(owner, value)

    # --- worker ---------------------------------------------------------------------------------------------------
    def load(self, voice_id: str) -> VoiceAudio | PreparedVoice:
        """The voice a job names, for the engine. Raises VoiceGone when it was deleted."""
        variant = getattr(self.engine, "voice_variant", None) if hasattr(self.engine, "prepare_voice") else None
        if variant is None:        # an engine without prepared voices: the clip, as reference audio
            return self._clip(voice_id)
        data = self.store.conditionals(voice_id, variant)
        if data is not None:
            return PreparedVoice(variant, data)
        with self._lock_for(voice_id, variant):     # threads of this worker wanting it: one computes
            data = self.store.conditionals(voice_id, variant)
            if data is not None:
                return PreparedVoice(variant, data)
            prepared = self.engine.prepare_voice(self._clip(voice_id))
            if not self.store.put_conditionals(voice_id, variant, prepared.data):
                raise VoiceGone(self._gone(voice_id))
            log.info("voice %s: conditionals computed for %s and stored", voice_id, variant)
            return prepared

    def _clip(self, voice_id: str) -> VoiceAudio:
        from ..media.decode import decode_audio
        audio = self.store.audio(voice_id)
        if audio is None:
            raise VoiceGone(self._gone(voice_id))
        return decode_audio(audio)

    @staticmethod
    def _gone(voice_id: str) -> str:
        return f"voice: the voice {voice_id} was deleted before this request ran"

    def _lock_for(self, voice_id: str, variant: str) -> threading.Lock:
        with self._locks_guard:
            if len(self._locks) > 1024:
                self._locks = {k: v for k, v in self._locks.items() if v.locked()}
            return self._locks.setdefault((voice_id, variant), threading.Lock())
