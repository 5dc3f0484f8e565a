"""The voice library's storage: `VoiceStore`, implemented in the job store's backend (SQLite: tables in the same
database file; Redis: keys on the same server under the same prefix), like accounts/.

A voice belongs to one owner (an account id; "" with auth off) and has a name unique for that owner. The store
keeps the uploaded clip as sent (so any worker can decode it exactly as the API did) and, per engine variant,
the conditionals computed from it (`put_conditionals`: computed once, by the API's engine at creation or by the
first worker that needs them). Deleting a voice deletes its clip and conditionals in one step.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass


@dataclass(frozen=True)
class Voice:
    id: str                     # "voice_" + 32 hex
    owner: str
    name: str
    created_at: float
    audio_bytes: int            # size of the clip as uploaded
    seconds: float              # its duration
    sample_rate: int
    format: str                 # its container: wav | mp3 | flac | ogg

    def to_json(self) -> dict:
        """OpenAI's voice object, with what this server knows beyond it."""
        return {"object": "audio.voice", "id": self.id, "name": self.name, "created_at": int(self.created_at),
                "type": "audio_sample", "audio_sample": {"bytes": self.audio_bytes, "seconds": round(self.seconds, 3),
                                                         "sample_rate": self.sample_rate, "format": self.format}}


class VoiceStoreError(Exception):
    """A refused write; the message is for the client."""


class VoiceLimitReached(VoiceStoreError):
    pass


class DuplicateVoiceName(VoiceStoreError):
    pass


class VoiceStore(abc.ABC):
    @abc.abstractmethod
    def create(self, voice: Voice, audio: bytes, *, max_per_owner: int,
               conditionals: dict[str, bytes] | None = None) -> Voice:
        """Store a new voice with its clip (and conditionals per variant, if computed already), atomically.
        Raises VoiceLimitReached when the owner has `max_per_owner` voices, DuplicateVoiceName when the owner
        has a voice of that name."""

    @abc.abstractmethod
    def get(self, voice_id: str) -> Voice | None:
        """A voice by id, whoever owns it (callers check the owner)."""

    @abc.abstractmethod
    def get_by_name(self, owner: str, name: str) -> Voice | None: ...

    @abc.abstractmethod
    def list(self, owner: str) -> list[Voice]:
        """The owner's voices, oldest first."""

    @abc.abstractmethod
    def count(self, owner: str) -> int: ...

    @abc.abstractmethod
    def delete(self, owner: str, voice_id: str) -> bool:
        """Delete the owner's voice (clip and conditionals); False when the owner has no such voice."""

    @abc.abstractmethod
    def audio(self, voice_id: str) -> bytes | None:
        """The clip as uploaded; None when the voice does not exist (any more)."""

    @abc.abstractmethod
    def conditionals(self, voice_id: str, variant: str) -> bytes | None: ...

    @abc.abstractmethod
    def put_conditionals(self, voice_id: str, variant: str, data: bytes) -> bool:
        """Keep a variant's conditionals (the first stored stays: they are the same by construction). False when
        the voice no longer exists (nothing is stored)."""

    @abc.abstractmethod
    def close(self) -> None: ...
