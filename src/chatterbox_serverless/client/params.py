"""The request parameters of `chatterbox-tts`, typed, with their ranges; checked before anything is sent.

`validate_params(dict)` checks the known parameters and returns the JSON body (a `Path` or `bytes`
`reference_audio` becomes a `data:` URI). Unknown keys are passed through untouched: the server decides.
`TTSParams` is the same set as a dataclass, for code that wants names checked by the type checker.
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

MODEL = "chatterbox-tts"
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


def encode_audio(source: bytes | bytearray | memoryview | os.PathLike | str, media_type: str | None = None) -> str:
    """A local audio file (path) or raw bytes as a `data:` URI, ready for `reference_audio`."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        media_type = media_type or "application/octet-stream"
    else:
        path = Path(source).expanduser()
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ParameterError(f"reference_audio: cannot read {str(path)!r}: {e.strerror or e}") from None
        media_type = media_type or _MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")
    if not data:
        raise ParameterError("reference_audio: the audio is empty")
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


def validate_params(params: dict[str, Any]) -> dict[str, Any]:
    """Check the known parameters (type and range) and return the JSON body to send.

    Raises `ParameterError` naming the first bad parameter."""
    body = dict(params)
    if "text" not in body:
        raise ParameterError("text is required")
    text = body["text"]
    if not isinstance(text, str):
        raise ParameterError(f"text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ParameterError("text must not be empty")
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
        ref = body["reference_audio"]
        if ref is None:
            del body["reference_audio"]
        elif isinstance(ref, (bytes, bytearray, memoryview, os.PathLike)):
            body["reference_audio"] = encode_audio(ref)
        elif not isinstance(ref, str):
            raise ParameterError(f"reference_audio must be a URL, a data: URI, base64, bytes or a Path, "
                                 f"got {type(ref).__name__}")
        elif not ref.strip():
            raise ParameterError("reference_audio must not be empty")
    return body
