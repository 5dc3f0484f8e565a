"""The request parameters of the Chatterbox models, typed, with their ranges; checked before anything is sent.

`validate_params(dict, model)` checks the known parameters of `model` and returns the JSON body (a `Path` or
`bytes` `reference_audio` / `source_audio` becomes a `data:` URI). Unknown keys are passed through untouched:
the server decides. The models (engine/catalog.py names them; the server's api/schemas.py has the same ranges):

    chatterbox-tts           text + the sampling parameters below (the hosted contract)
    chatterbox-turbo         text, temperature, top_k (1-6563), top_p, repetition_penalty (exaggeration, cfg_weight
                             and min_p are sent as given: the server ignores them for Turbo)
    chatterbox-multilingual  the original's + language (one of the 23 codes of engine/languages.py; default "en")
    chatterbox-vc            source_audio (required: the speech to convert) and the target (reference_audio or
                             voice); no text
    any other name           checked as chatterbox-tts (a server speaking the hosted contract)

`TTSParams` is chatterbox-tts's set as a dataclass, for code that wants names checked by the type checker.
"""
from __future__ import annotations

import base64
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..media.formats import DEFAULT_FORMAT, FORMAT_NAMES, OutputFormatName
from .errors import ParameterError

# The family's model names and Multilingual's languages, as engine/catalog.py and engine/languages.py list them
# (copied: the client does not import the engine package; tests/unit/client compares them).
MODEL = "chatterbox-tts"                     # the default model
TURBO, MULTILINGUAL, VC = "chatterbox-turbo", "chatterbox-multilingual", "chatterbox-vc"
MODELS = (MODEL, TURBO, MULTILINGUAL, VC)
LANGUAGES = ("ar", "da", "de", "el", "en", "es", "fi", "fr", "he", "hi", "it", "ja", "ko", "ms", "nl", "no", "pl",
             "pt", "ru", "sv", "sw", "tr", "zh")
TOP_K_RANGE = (1, 6563)                      # Turbo's speech vocabulary (the server's api/schemas.py)
OUTPUT_FORMATS = FORMAT_NAMES        # ("mp3", "wav", "flac", "ogg"): the table is media/formats.py (no dependencies)
OutputFormat = OutputFormatName
AudioSource = str | bytes | os.PathLike   # URL / data: URI / base64 string, raw bytes, or a local file

# name -> (low, high) inclusive; the API contract's ranges.
RANGES: dict[str, tuple[float, float]] = {
    "exaggeration": (0.0, 2.0),
    "cfg_weight": (0.0, 2.0),
    "temperature": (0.0, 2.0),
    "min_p": (0.0, 1.0),
    "top_p": (0.0, 1.0),
    "repetition_penalty": (1.0, 2.0),
    "speed": (0.25, 4.0),
}
SEED_RANGE = (0, 2**63 - 1)      # the server's range (api/schemas.py)

_MEDIA_TYPES = {".wav": "audio/wav", ".mp3": "audio/mpeg", ".flac": "audio/flac", ".ogg": "audio/ogg",
                ".opus": "audio/ogg", ".m4a": "audio/mp4"}


@dataclass
class TTSParams:
    """Every parameter of a request, with the API's defaults. `dict(**TTSParams(...).to_payload())` is a body."""
    text: str
    reference_audio: AudioSource | None = None   # None: the model's built-in voice
    exaggeration: float = 0.5
    cfg_weight: float = 0.5
    temperature: float = 0.8
    min_p: float = 0.05
    top_p: float = 1.0
    repetition_penalty: float = 1.2
    seed: int = 42
    output_format: OutputFormat = DEFAULT_FORMAT
    voice: str | None = None                     # a library voice (id or name); not with reference_audio
    speed: float = 1.0                           # 0.25-4, a time-stretch keeping the pitch

    def to_payload(self) -> dict[str, Any]:
        body = {k: v for k, v in asdict(self).items() if v is not None}
        return validate_params(body)


def encode_audio(source: bytes | bytearray | memoryview | os.PathLike | str, media_type: str | None = None,
                 param: str = "reference_audio") -> str:
    """A local audio file (path) or raw bytes as a `data:` URI, ready for `reference_audio` (or `source_audio`:
    `param` names it in errors)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        media_type = media_type or "application/octet-stream"
    else:
        path = Path(source).expanduser()
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ParameterError(f"{param}: cannot read {str(path)!r}: {e.strerror or e}") from None
        media_type = media_type or _MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")
    if not data:
        raise ParameterError(f"{param}: the audio is empty")
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParameterError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ParameterError(f"{name} must be a finite number, got {value}")
    low, high = RANGES[name]
    if not low <= value <= high:
        raise ParameterError(f"{name} must be between {low:g} and {high:g}, got {value}")
    return value


def _audio(body: dict[str, Any], name: str) -> None:
    """`body[name]` as the server takes audio: a URL, data: URI or base64 string as given; bytes or a path
    encoded as a data: URI; None dropped."""
    value = body[name]
    if value is None:
        del body[name]
    elif isinstance(value, (bytes, bytearray, memoryview, os.PathLike)):
        body[name] = encode_audio(value, param=name)
    elif not isinstance(value, str):
        raise ParameterError(f"{name} must be a URL, a data: URI, base64, bytes or a Path, got {type(value).__name__}")
    elif not value.strip():
        raise ParameterError(f"{name} must not be empty")


def validate_params(params: dict[str, Any], model: str = MODEL) -> dict[str, Any]:
    """Check the known parameters of `model` (type and range) and return the JSON body to send.

    Raises `ParameterError` naming the first bad parameter."""
    body = dict(params)
    if model == VC:
        if body.get("source_audio") is None:
            raise ParameterError("source_audio is required (the speech to convert)")
        _audio(body, "source_audio")
        if body.get("stream"):
            raise ParameterError("stream: voice conversion cannot be streamed")
    else:
        if "text" not in body:
            raise ParameterError("text is required")
        text = body["text"]
        if not isinstance(text, str):
            raise ParameterError(f"text must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ParameterError("text must not be empty")
    if model == TURBO and "top_k" in body:
        top_k = body["top_k"]
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise ParameterError(f"top_k must be an integer, got {type(top_k).__name__}")
        if not TOP_K_RANGE[0] <= top_k <= TOP_K_RANGE[1]:
            raise ParameterError(f"top_k must be between {TOP_K_RANGE[0]} and {TOP_K_RANGE[1]}, got {top_k}")
    if model == MULTILINGUAL and "language" in body:
        language = body["language"]
        if not isinstance(language, str) or language.strip().lower() not in LANGUAGES:
            raise ParameterError(f"language must be one of {', '.join(LANGUAGES)}, got {language!r}")
    for name in RANGES:
        if name in body:
            _number(name, body[name])
    if "seed" in body:
        seed = body["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ParameterError(f"seed must be an integer, got {type(seed).__name__}")
        if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
            raise ParameterError(f"seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}, got {seed}")
    if "output_format" in body:
        fmt = body["output_format"]
        if fmt not in OUTPUT_FORMATS:
            raise ParameterError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
    if body.get("voice") is not None:
        voice = body["voice"]
        if not isinstance(voice, str) or not voice.strip():
            raise ParameterError("voice must be a library voice's id or name (or 'default')")
        if body.get("reference_audio") is not None:
            raise ParameterError("give either voice or reference_audio, not both")
    elif "voice" in body:
        del body["voice"]
    if "reference_audio" in body:
        _audio(body, "reference_audio")
    return body
