"""The worker–engine contract: what crosses the boundary between the job worker and the engine (requests,
parameters, voices, results, and the `Engine` protocol the worker drives)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np


@dataclass(frozen=True)
class SynthesisParams:
    """Per-request generation parameters (ranges are validated by the API, see api/schemas.py)."""
    exaggeration: float = 0.5
    cfg_weight: float = 0.5
    temperature: float = 0.8
    min_p: float = 0.05
    top_p: float = 1.0
    repetition_penalty: float = 1.2
    seed: int = 42


@dataclass
class VoiceAudio:
    """A decoded reference clip: mono float32 samples in [-1, 1] at `sample_rate`."""
    samples: np.ndarray
    sample_rate: int


@dataclass(frozen=True)
class PreparedVoice:
    """A voice's conditionals as an engine serialised them (`VoicePreparer.prepare_voice`): computed once from a
    clip, kept (the voice library stores them per variant), and loaded instead of recomputed. `variant` names
    the engine variant they fit (`VoicePreparer.voice_variant`); an engine refuses another variant's."""
    variant: str
    data: bytes


@dataclass
class SynthesisRequest:
    text: str
    params: SynthesisParams = field(default_factory=SynthesisParams)
    voice: VoiceAudio | PreparedVoice | None = None   # None: the checkpoint's built-in voice (conds.pt)
    request_id: str = ""


@dataclass
class SynthesisResult:
    """Exactly one of `audio` / `error` is set. `audio` is mono float32 at the engine's sample rate."""
    audio: np.ndarray | None = None
    error: str | None = None
    metrics: dict = field(default_factory=dict)   # e.g. {"speech_tokens": n, "audio_seconds": s}


class Engine(Protocol):
    """What the worker needs from an engine: a batch of requests in, one result each out, in order.

    A failure of one request is reported in its own result and never fails the others."""
    sample_rate: int

    def synthesize(self, requests: Sequence[SynthesisRequest]) -> list[SynthesisResult]: ...


class VoicePreparer(Protocol):
    """What an engine offers for library voices (optional: engines without it serve library voices from their
    clip, as reference audio). `prepare_voice` computes a clip's conditionals for this engine's variant, exactly
    as a request with that clip as `voice` would use them."""
    voice_variant: str

    def prepare_voice(self, voice: VoiceAudio) -> PreparedVoice: ...
