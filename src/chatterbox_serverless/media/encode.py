"""Encode generated audio for the client: mp3 (the hosted API's default), wav, flac, ogg / opus (Opus in Ogg),
aac (AAC-LC in ADTS), pcm (raw 16-bit little-endian, 24 kHz, no header).

mp3, wav, flac and Opus go through soundfile's bundled libsndfile (>= 1.1 writes MP3 via LAME and Opus
natively). libsndfile cannot write AAC: aac is encoded by FFmpeg's native AAC encoder through PyAV (`av`, the
FFmpeg bindings whose wheels bundle FFmpeg; no ffmpeg program needed), imported only when aac is asked for. pcm
is the samples as 16-bit integers. Rates an encoder cannot take (mp3: the MPEG rates; opus: 8/12/16/24/48 kHz;
pcm: exactly 24 kHz) are resampled with soxr first; Chatterbox's 24 kHz goes through untouched in every format.
"""
from __future__ import annotations

import io

import numpy as np
import soundfile as sf

from chatterbox_serverless.media import MediaError
from chatterbox_serverless.media.formats import DEFAULT_FORMAT, MEDIA_TYPES, PCM_RATE

FORMATS: dict[str, str] = MEDIA_TYPES      # output_format -> media type (the table is in formats.py)

_MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
_OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
_AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
AAC_BITRATE = 64_000            # AAC-LC, mono speech

# (libsndfile format, subtype, extra SoundFile arguments). compression_level is libsndfile's 0 (best) .. 1.
# mp3: constant bitrate (players show the right duration; ~80 kb/s at 24 kHz mono);
# opus: variable bitrate, ~40-70 kb/s at 24 kHz mono speech (transparent for speech).
_WRITE_ARGS: dict[str, tuple[str, str, dict]] = {
    "mp3": ("MP3", "MPEG_LAYER_III", {"bitrate_mode": "CONSTANT", "compression_level": 0.5}),
    "wav": ("WAV", "PCM_16", {}),
    "flac": ("FLAC", "PCM_16", {}),
    "ogg": ("OGG", "OPUS", {"compression_level": 0.75}),
    "opus": ("OGG", "OPUS", {"compression_level": 0.75}),
    "aac": ("ADTS", "AAC", {}),          # PyAV (see _encode_aac), not libsndfile
    "pcm": ("RAW", "PCM_16", {}),        # raw little-endian 16-bit, no header
}
if set(_WRITE_ARGS) != set(FORMATS):
    raise RuntimeError("media/encode.py: every output format in formats.py needs its encoder settings")


class EncodeError(MediaError):
    """An unknown output format or unusable samples."""


def _target_rate(fmt: str, sample_rate: int) -> int:
    if fmt == "pcm":
        return PCM_RATE
    allowed = {"mp3": _MP3_RATES, "ogg": _OPUS_RATES, "opus": _OPUS_RATES, "aac": _AAC_RATES}.get(fmt)
    if allowed is None or sample_rate in allowed:
        return sample_rate
    return 48000


def encode_audio(samples: np.ndarray, sample_rate: int, fmt: str = DEFAULT_FORMAT) -> tuple[bytes, str]:
    """Encode mono samples (float, nominally in [-1, 1]) as `fmt`; returns (file bytes, media type).

    Values outside [-1, 1] are clipped and non-finite ones zeroed (16-bit PCM and the codecs need it)."""
    fmt = fmt.lower() if isinstance(fmt, str) else fmt
    if fmt not in FORMATS:
        raise EncodeError(f"unsupported output_format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not isinstance(sample_rate, (int, np.integer)) or not 1000 <= sample_rate <= 384_000:
        raise EncodeError(f"unsupported sample rate {sample_rate!r}")
    x = np.asarray(samples)
    if x.ndim == 2 and 1 in x.shape:
        x = x.reshape(-1)
    if x.ndim != 1:
        raise EncodeError(f"expected mono samples (1-D), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise EncodeError(f"expected numeric samples, got {x.dtype}")
    if len(x) == 0:
        raise EncodeError("there is no audio to encode (0 samples)")
    x = np.nan_to_num(x.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
    x = np.clip(x, -1.0, 1.0)

    rate = _target_rate(fmt, int(sample_rate))
    if rate != sample_rate:
        import soxr
        x = soxr.resample(x, int(sample_rate), rate, quality="HQ").astype(np.float32, copy=False)
        x = np.clip(x, -1.0, 1.0)

    if fmt == "aac":
        return _encode_aac(x, rate), FORMATS[fmt]
    if fmt == "pcm":
        pcm = np.round(x * 32767.0).astype("<i2")
        return pcm.tobytes(), FORMATS[fmt]
    container, subtype, extra = _WRITE_ARGS[fmt]
    buf = io.BytesIO()
    with sf.SoundFile(buf, mode="w", samplerate=rate, channels=1, format=container, subtype=subtype, **extra) as f:
        f.write(x)
    return buf.getvalue(), FORMATS[fmt]


def _encode_aac(x: np.ndarray, rate: int) -> bytes:
    """AAC-LC in an ADTS stream (each frame carries its header: playable and streamable as is)."""
    try:
        import av
    except ImportError:     # pragma: no cover - av is a dependency; a trimmed install says what is missing
        raise EncodeError("output_format 'aac' needs the PyAV package (pip install av)") from None
    buf = io.BytesIO()
    with av.open(buf, "w", format="adts") as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        stream.bit_rate = AAC_BITRATE
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x)[None, :], format="flt", layout="mono")
        frame.sample_rate = rate
        frame.pts = 0
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono", rate=rate)
        for converted in resampler.resample(frame):
            for packet in stream.encode(converted):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()
