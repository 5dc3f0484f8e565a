"""The worker–engine contract: what crosses the boundary between the job worker and the engine (requests,
parameters, voices, results, and the `Engine` protocol the worker drives)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

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
    top_k: int = 1000          # Turbo's sampling chain only (the original's CFG/min_p chain has no top-k)


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
    stream: bool = False      # hand the audio over piece by piece (`Engine.synthesize`'s on_audio) as it is made
    language: str | None = None       # Multilingual: an ISO 639-1 code of the model's languages (None: English)
    source: VoiceAudio | None = None  # voice conversion: the speech to say again in `voice` (then `text` is unused)


@dataclass
class SynthesisResult:
    """Exactly one of `audio` / `error` is set. `audio` is mono float32 at the engine's sample rate."""
    audio: np.ndarray | None = None
    error: str | None = None
    metrics: dict = field(default_factory=dict)   # e.g. {"speech_tokens": n, "audio_seconds": s}


# on_audio(request_id, seq, samples): piece `seq` (0, 1, ...) of a streamed request's audio, mono float32 at the
# engine's sample rate. Called from the engine's thread, in order; may raise to stop that request (it then fails).
OnAudio = Callable[[str, int, np.ndarray], None]


class Engine(Protocol):
    """What the worker needs from an engine: a batch of requests in, one result each out, in order.

    A failure of one request is reported in its own result and never fails the others.

    Streaming: for a request with `stream=True`, an engine that streams calls `on_audio(request_id, seq, samples)`
    with its audio in pieces, in order, as they are made; the pieces concatenate to exactly the audio of its
    result (so a streamed request's result is what was streamed). A request whose `on_audio` raised fails with
    the reason. Without `on_audio`, or for `stream=False`, nothing is streamed. An engine may ignore `stream`
    (and take no `on_audio`): its clients then get the audio when the request is done.

    Abort (optional): an engine with `abort(request_id)` lets the worker stop a request of the batch it is running
    (its job was cancelled): callable from any thread while `synthesize` runs, it returns at once; the engine stops
    working on that request at its next step (ChatterboxEngine: T3's next decoding step, its rows freed, no S3Gen
    work) and reports it with the error "cancelled"; the other requests' results do not change. An abort for an id
    no running batch holds may be forgotten (the worker repeats it while the batch runs).

    Core (optional): an engine with `new_core()` returns an engine core (engine/core.py: `add_request`, `abort`,
    `step() -> events`, `has_unfinished`, `free_slots`); the worker then drives it step by step instead of calling
    `synthesize` (jobs/engine_loop.py): requests join between steps and each ends on its own."""
    sample_rate: int
    model: str          # the API model it serves ("chatterbox-tts", "chatterbox-turbo", ...: variants.Variant.api_model)

    def synthesize(self, requests: Sequence[SynthesisRequest], on_audio: OnAudio | None = None
                   ) -> list[SynthesisResult]: ...


class VoicePreparer(Protocol):
    """What an engine offers for library voices (optional: engines without it serve library voices from their
    clip, as reference audio). `prepare_voice` computes a clip's conditionals for this engine's variant, exactly
    as a request with that clip as `voice` would use them."""
    voice_variant: str

    def prepare_voice(self, voice: VoiceAudio) -> PreparedVoice: ...
