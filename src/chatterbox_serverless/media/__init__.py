"""Audio in and out of the service.

  reference.py  the `reference_audio` parameter: URL | data: URI | bare base64  ->  ReferenceSource -> bytes
  fetch.py      SafeFetcher: http(s) download that refuses private/loopback/metadata addresses (SSRF)
  decode.py     bytes (wav/mp3/flac/ogg, any rate) -> VoiceAudio (mono float32, original rate)
  encode.py     float samples -> mp3 | wav | flac | ogg (opus) bytes + media type

Every error these modules raise on bad input is a `MediaError` (a ValueError) whose message is written for the
client: the API answers it as a 400 at submit time, the worker stores it as the reason of a FAILED job.
"""
from __future__ import annotations


class MediaError(ValueError):
    """Bad or unusable audio input; the message is safe and meant to be shown to the client."""


# Defined above the imports: the submodules import MediaError from this package.
from .decode import DEFAULT_MAX_SECONDS, DEFAULT_MIN_SECONDS, AudioInfo, DecodeError, decode_audio, probe_audio  # noqa: E402
from .encode import DEFAULT_FORMAT, FORMATS, EncodeError, encode_audio  # noqa: E402
from .fetch import AllowList, FetchError, SafeFetcher, ip_literal  # noqa: E402
from .reference import (  # noqa: E402
    DEFAULT_MAX_BYTES,
    ReferenceAudioError,
    ReferenceSource,
    aload_reference,
    aresolve,
    load_reference,
    parse_reference,
    resolve,
)

__all__ = [
    "MediaError",
    "ReferenceAudioError", "ReferenceSource", "parse_reference", "resolve", "aresolve",
    "load_reference", "aload_reference", "DEFAULT_MAX_BYTES",
    "FetchError", "SafeFetcher", "AllowList", "ip_literal",
    "DecodeError", "AudioInfo", "decode_audio", "probe_audio", "DEFAULT_MAX_SECONDS", "DEFAULT_MIN_SECONDS",
    "EncodeError", "encode_audio", "FORMATS", "DEFAULT_FORMAT",
]
