"""Decode a reference clip (wav / mp3 / flac / ogg, any sample rate) into mono float32 samples.

Only the four containers of the API contract are handed to libsndfile: the first bytes are checked first, so
the many other formats libsndfile can parse (a larger attack surface) are never reached with client data.
No resampling here: the engine's front-end resamples like the official model does.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from chatterbox_serverless.engine.contract import VoiceAudio
from chatterbox_serverless.media import MediaError

DEFAULT_MAX_SECONDS = 30.0      # longer clips are refused (the engine uses at most the first 10 s)
DEFAULT_MIN_SECONDS = 0.5       # shorter clips carry too little voice to condition on
MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 192_000
MAX_CHANNELS = 8
_BLOCK_FRAMES = 1 << 20         # few, large reads (mpg123 logs spurious warnings at many small ones)

# libsndfile's name for each container we accept (WAVEX / RF64 are WAV variants).
_CONTAINERS = {"WAV": "wav", "WAVEX": "wav", "RF64": "wav", "MP3": "mp3", "FLAC": "flac", "OGG": "ogg"}


class DecodeError(MediaError):
    """The bytes are not usable audio (unknown format, corrupt, too long or too short)."""


@dataclass(frozen=True)
class AudioInfo:
    format: str           # "wav" | "mp3" | "flac" | "ogg"
    sample_rate: int
    channels: int
    seconds: float        # as declared by the header (mp3: as estimated by the decoder)


def sniff_format(data: bytes) -> str | None:
    """The container of `data` from its first bytes: "wav", "mp3", "flac", "ogg", or None."""
    head = data[:12]
    if len(head) >= 12 and head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:3] == b"ID3":
        return "mp3"
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0:   # MPEG audio frame sync
        return "mp3"
    return None


def _open(data: bytes) -> sf.SoundFile:
    if not data:
        raise DecodeError("the audio is empty")
    if sniff_format(data) is None:
        raise DecodeError("unsupported or unrecognised audio format (expected wav, mp3, flac or ogg)")
    try:
        f = sf.SoundFile(io.BytesIO(data))
    except Exception as e:  # libsndfile reports corrupt headers as LibsndfileError / RuntimeError
        raise DecodeError(f"the audio could not be decoded ({_short(e)})") from None
    if f.format not in _CONTAINERS:
        f.close()
        raise DecodeError("unsupported or unrecognised audio format (expected wav, mp3, flac or ogg)")
    return f


def _check_header(f: sf.SoundFile, max_seconds: float) -> None:
    if not MIN_SAMPLE_RATE <= f.samplerate <= MAX_SAMPLE_RATE:
        raise DecodeError(f"unsupported sample rate {f.samplerate} Hz "
                          f"(expected {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz)")
    if not 1 <= f.channels <= MAX_CHANNELS:
        raise DecodeError(f"unsupported channel count {f.channels} (at most {MAX_CHANNELS})")
    if f.frames > 0 and f.frames / f.samplerate > max_seconds + 0.05:
        raise DecodeError(f"the audio is too long ({f.frames / f.samplerate:.1f} s; at most {max_seconds:g} s)")


def probe_audio(data: bytes, max_seconds: float = DEFAULT_MAX_SECONDS) -> AudioInfo:
    """Check format, sample rate, channels and declared duration from the header alone (cheap: for submit time).

    Raises DecodeError. A corrupt body past a valid header is only found by `decode_audio`."""
    with _open(data) as f:
        _check_header(f, max_seconds)
        return AudioInfo(_CONTAINERS[f.format], f.samplerate, f.channels, f.frames / f.samplerate)


def decode_audio(data: bytes, max_seconds: float = DEFAULT_MAX_SECONDS,
                 min_seconds: float = DEFAULT_MIN_SECONDS) -> VoiceAudio:
    """Decode wav/mp3/flac/ogg bytes to mono float32 at the file's own sample rate (channels averaged).

    Memory is bounded by the duration limit, which is enforced while decoding (not only from the header)."""
    with _open(data) as f:
        _check_header(f, max_seconds)
        sr, channels = f.samplerate, f.channels
        max_frames = int(max_seconds * sr) + int(0.05 * sr)
        parts: list[np.ndarray] = []
        total = 0
        try:
            while True:
                block = f.read(_BLOCK_FRAMES, dtype="float32", always_2d=True)
                if len(block) == 0:
                    break
                total += len(block)
                if total > max_frames:
                    raise DecodeError(f"the audio is too long (more than {max_seconds:g} s)")
                parts.append(block.mean(axis=1, dtype=np.float32) if channels > 1 else block[:, 0].copy())
        except DecodeError:
            raise
        except Exception as e:
            raise DecodeError(f"the audio is corrupt and could not be decoded ({_short(e)})") from None
    samples = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    if len(samples) < min_seconds * sr:
        raise DecodeError(f"the audio is too short ({len(samples) / sr:.2f} s; at least {min_seconds:g} s)")
    if not np.isfinite(samples).all():
        raise DecodeError("the audio contains invalid (NaN or infinite) samples")
    return VoiceAudio(samples=samples, sample_rate=sr)


def _short(e: Exception) -> str:
    """libsndfile's message without the BytesIO repr it embeds."""
    msg = str(e).replace("\n", " ").strip()
    if ">:" in msg:
        msg = msg.split(">:", 1)[1].strip()
    return msg[:200] or type(e).__name__
