"""The output formats, listed once: name -> media type, file suffix.

Everything else derives from this table: the encoder (media/encode.py), the API's `output_format` parameter
(api/schemas.py), the Python SDK's checks (client/params.py) and the `say` command (client/cli.py). It imports
only the standard library, and `chatterbox_serverless.media` loads its other modules lazily, so the client can
import it without the server's dependencies (numpy, soundfile, torch, fastapi).
"""
from __future__ import annotations

from typing import Literal, NamedTuple


class OutputFormat(NamedTuple):
    name: str                         # the `output_format` value
    media_type: str                   # Content-Type of the audio
    suffix: str                       # file extension written for it
    label: str                        # for help texts and docs
    other_suffixes: tuple[str, ...] = ()   # further extensions read as this format ("say -o x.opus")


OUTPUT_FORMATS: dict[str, OutputFormat] = {f.name: f for f in (
    OutputFormat("mp3", "audio/mpeg", ".mp3", "mp3"),
    OutputFormat("wav", "audio/wav", ".wav", "wav"),
    OutputFormat("flac", "audio/flac", ".flac", "flac"),
    OutputFormat("ogg", "audio/ogg", ".ogg", "ogg (Opus)"),
    # OpenAI's names (POST /v1/audio/speech `response_format`); usable on every route
    OutputFormat("opus", "audio/ogg; codecs=opus", ".opus", "opus (Opus in Ogg, as ogg)"),
    OutputFormat("aac", "audio/aac", ".aac", "aac (AAC-LC in ADTS)"),
    OutputFormat("pcm", "audio/pcm", ".pcm", "pcm (raw 24 kHz 16-bit little-endian mono, no header)"),
)}
PCM_RATE = 24000                      # pcm is always this rate (OpenAI's), whatever the engine's rate
DEFAULT_FORMAT = "mp3"

FORMAT_NAMES: tuple[str, ...] = tuple(OUTPUT_FORMATS)
MEDIA_TYPES: dict[str, str] = {f.name: f.media_type for f in OUTPUT_FORMATS.values()}
SUFFIX_FORMATS: dict[str, str] = {s: f.name for f in OUTPUT_FORMATS.values() for s in (f.suffix, *f.other_suffixes)}
# The type of an `output_format` value, built from the table (type checkers see it as a str-valued Literal).
OutputFormatName = Literal[FORMAT_NAMES]  # type: ignore[valid-type]


def describe_formats() -> str:
    """"mp3 (default), wav, flac, ogg (Opus), ... or pcm (...)": for help texts and the API's schema."""
    labels = [f.label + (" (default)" if f.name == DEFAULT_FORMAT else "") for f in OUTPUT_FORMATS.values()]
    return ", ".join(labels[:-1]) + " or " + labels[-1] if len(labels) > 1 else labels[0]
