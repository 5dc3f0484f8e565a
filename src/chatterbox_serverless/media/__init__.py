"""Audio in and out of the service.

  reference.py  the `reference_audio` parameter: URL | data: URI | bare base64  ->  ReferenceSource -> bytes
  fetch.py      SafeFetcher: http(s) download that refuses private/loopback/metadata addresses (SSRF)
  decode.py     bytes (wav/mp3/flac/ogg, any rate) -> VoiceAudio (mono float32, original rate)
  encode.py     float samples -> mp3 | wav | flac | ogg / opus (Opus in Ogg) | aac (ADTS) | pcm bytes + media type
  stretch.py    time_stretch: `speed`, a pitch-preserving tempo change (FFmpeg's atempo through PyAV)
  formats.py    the output formats, listed once (name -> media type, suffix); standard library only

Every error these modules raise on bad input is a `MediaError` (a ValueError) whose message is written for the
client: the API answers it as a 400 at submit time, the worker stores it as the reason of a FAILED job.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any


class MediaError(ValueError):
    """Bad or unusable audio input; the message is safe and meant to be shown to the client."""


# The names below are loaded from their submodules on first use (PEP 562), so that importing this package, or its
# dependency-free `formats` module (the client does), does not import numpy, soundfile or httpx.
_EXPORTS = {
    "DEFAULT_MAX_SECONDS": "decode", "DEFAULT_MIN_SECONDS": "decode", "AudioInfo": "decode",
    "DecodeError": "decode", "decode_audio": "decode", "probe_audio": "decode",
    "FORMATS": "encode", "EncodeError": "encode", "encode_audio": "encode",
    "DEFAULT_FORMAT": "formats", "OUTPUT_FORMATS": "formats", "OutputFormat": "formats",
    "AllowList": "fetch", "FetchError": "fetch", "SafeFetcher": "fetch", "ip_literal": "fetch",
    "DEFAULT_MAX_BYTES": "reference", "ReferenceAudioError": "reference", "ReferenceSource": "reference",
    "load_reference": "reference",
    "parse_reference": "reference", "resolve": "reference", "time_stretch": "stretch",
}

if TYPE_CHECKING:
    from .decode import (DEFAULT_MAX_SECONDS, DEFAULT_MIN_SECONDS, AudioInfo, DecodeError, decode_audio,
                         probe_audio)
    from .encode import FORMATS, EncodeError, encode_audio
    from .fetch import AllowList, FetchError, SafeFetcher, ip_literal
    from .formats import DEFAULT_FORMAT, OUTPUT_FORMATS, OutputFormat
    from .reference import (DEFAULT_MAX_BYTES, ReferenceAudioError, ReferenceSource, load_reference,
                            parse_reference, resolve)
    from .stretch import time_stretch


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = ["MediaError", *_EXPORTS]
