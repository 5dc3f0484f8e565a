"""Streamed audio: the pieces of the chunk channel, and encoders that turn pieces into a format's bytes as they
arrive.

The worker stores each piece the engine hands over as `pack_piece(samples, rate, fmt)`: a 4-byte little-endian
sample rate, then the samples as 16-bit little-endian PCM, quantised as the job's stored file is (pcm:
round(x * 32767), media/encode.py's; every other format: libsndfile's own float-to-16-bit conversion, as the
stored wav holds it), so a streamed wav or pcm carries exactly the samples of the file the job stores, and the
HTTP layer can encode a piece in any format without the engine.

`StreamEncoder(fmt, rate, speed)`: `feed(int16 samples)` returns the bytes that can leave now, `finish()` the rest.
Every output format but flac streams (see STREAM_FORMATS):
  pcm   the samples (resampled to 24 kHz when the engine's rate differs), no header
  wav   a 44-byte header whose RIFF and data sizes are 0xFFFFFFFF (length unknown: read to the end), then PCM
  mp3, ogg / opus, aac   FFmpeg's encoders and muxers through PyAV (LAME, libopus, FFmpeg's AAC) written to a
        sink that cannot seek: mp3 is its frames with no Xing/LAME tag (that tag, patched in at the end of a file,
        tells decoders the encoder delay: a streamed mp3 starts with ~50 ms more silence than the stored file);
        Ogg pages are flushed every 20 ms of audio so pieces leave at once; ADTS frames carry their own headers.
Encoders hold back at most a frame (mp3 1152 samples, Opus 20 ms, AAC 1024) until the next piece or `finish`.
`speed` != 1: the pieces go through FFmpeg's `atempo` (media/stretch.py) as a stream first.
"""
from __future__ import annotations

import struct

import numpy as np

from chatterbox_serverless.media import MediaError
from chatterbox_serverless.media.formats import MEDIA_TYPES, PCM_RATE

# flac is not streamed: a FLAC stream whose length is unknown when it starts (STREAMINFO total 0) is valid, but
# libsndfile (soundfile) refuses to read it, so a flac client gets the whole file, made when the job is done
STREAM_FORMATS: tuple[str, ...] = tuple(f for f in MEDIA_TYPES if f != "flac")
_AV = {  # format -> (PyAV muxer, encoder, options, rates the encoder takes (None: any))
    "mp3": ("mp3", "libmp3lame", {}, (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)),
    "ogg": ("ogg", "libopus", {"page_duration": "20000"}, (8000, 12000, 16000, 24000, 48000)),
    "opus": ("ogg", "libopus", {"page_duration": "20000"}, (8000, 12000, 16000, 24000, 48000)),
    "aac": ("adts", "aac", {}, (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)),
}
MP3_BITRATE = 80_000            # as the stored files (libsndfile's CBR at 24 kHz mono)
AAC_BITRATE = 64_000


class StreamError(MediaError):
    """A piece that cannot be read, or a format that cannot be streamed."""


# --- pieces of the chunk channel -----------------------------------------------------------------------------
def to_pcm16(samples: np.ndarray, fmt: str = "pcm") -> np.ndarray:
    """Float samples as 16-bit PCM the way the stored file of `fmt` holds them (see the module docstring)."""
    x = np.nan_to_num(np.asarray(samples, dtype=np.float32).reshape(-1), nan=0.0, posinf=0.0, neginf=0.0)
    x = np.clip(x, -1.0, 1.0)
    if fmt == "pcm" or not len(x):
        return np.round(x * 32767.0).astype("<i2")
    import io

    import soundfile as sf
    buf = io.BytesIO()
    with sf.SoundFile(buf, mode="w", samplerate=8000, channels=1, format="RAW", subtype="PCM_16",
                      endian="LITTLE") as f:
        f.write(x)
    return np.frombuffer(buf.getvalue(), dtype="<i2")


def pack_piece(samples: np.ndarray, sample_rate: int, fmt: str = "pcm") -> bytes:
    """A piece as stored in the chunk channel: rate (uint32 LE) + 16-bit PCM (LE), quantised for `fmt`."""
    return struct.pack("<I", int(sample_rate)) + to_pcm16(samples, fmt).tobytes()


def unpack_piece(data: bytes) -> tuple[int, np.ndarray]:
    """(sample rate, int16 samples) of a stored piece."""
    if len(data) < 4 or (len(data) - 4) % 2:
        raise StreamError("a streamed piece is damaged")
    (rate,) = struct.unpack_from("<I", data)
    return rate, np.frombuffer(data, dtype="<i2", offset=4)


# --- encoders ------------------------------------------------------------------------------------------------
def wav_stream_header(sample_rate: int) -> bytes:
    """RIFF/WAVE, 16-bit mono PCM, RIFF and data sizes 0xFFFFFFFF ("unknown: read to the end")."""
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", 0xFFFFFFFF))


class _Sink:
    """A write-only, unseekable file for PyAV's muxers: what they write, taken as it comes."""

    def __init__(self):
        self.parts: list[bytes] = []

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


class _Tempo:
    """FFmpeg's atempo as a stream (float mono in, float mono out)."""

    def __init__(self, rate: int, speed: float):
        import av.filter
        from chatterbox_serverless.media.stretch import MAX_SPEED, MIN_SPEED, _tempos
        if not MIN_SPEED <= speed <= MAX_SPEED:
            raise StreamError(f"speed must be between {MIN_SPEED:g} and {MAX_SPEED:g}, got {speed:g}")
        self.rate, self.pts = rate, 0
        self.graph = av.filter.Graph()
        node = self.graph.add_abuffer(format="flt", sample_rate=rate, layout="mono", time_base=f"1/{rate}")
        for tempo in _tempos(float(speed)):
            nxt = self.graph.add("atempo", repr(tempo))
            node.link_to(nxt)
            node = nxt
        sink = self.graph.add("abuffersink")
        node.link_to(sink)
        self.graph.configure()

    def push(self, x: np.ndarray | None) -> np.ndarray:
        import av
        if x is None:
            self.graph.push(None)
        elif len(x):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x, dtype=np.float32)[None, :], format="flt",
                                               layout="mono")
            frame.sample_rate, frame.pts = self.rate, self.pts
            self.pts += len(x)
            self.graph.push(frame)
        out = []
        while True:
            try:
                got = self.graph.pull()
            except (av.error.EOFError, av.error.BlockingIOError):
                break
            out.append(got.to_ndarray().reshape(-1).astype(np.float32, copy=False))
        return np.concatenate(out) if out else np.zeros(0, np.float32)


class StreamEncoder:
    """Encodes pieces of 16-bit mono PCM at `sample_rate` as `fmt`, bytes out as soon as the codec gives them."""

    def __init__(self, fmt: str, sample_rate: int, speed: float = 1.0):
        if fmt not in STREAM_FORMATS:
            raise StreamError(f"output_format {fmt!r} cannot be streamed; streamable: {', '.join(STREAM_FORMATS)}")
        self.fmt, self.in_rate = fmt, int(sample_rate)
        self.tempo = _Tempo(self.in_rate, speed) if speed != 1.0 else None
        self.rate = self.in_rate
        self.started = False
        self.resampler = None
        self.container = None
        if fmt == "pcm" and self.in_rate != PCM_RATE:
            self.rate = PCM_RATE
        elif fmt in _AV and _AV[fmt][3] is not None and self.in_rate not in _AV[fmt][3]:
            self.rate = 48000
        if self.rate != self.in_rate:
            import soxr
            self.resampler = soxr.ResampleStream(self.in_rate, self.rate, 1, dtype="float32", quality="HQ")
        if fmt in _AV:
            self._open_av()

    def _open_av(self) -> None:
        import av
        muxer, codec, options, _ = _AV[self.fmt]
        self.sink = _Sink()
        self.container = av.open(self.sink, "w", format=muxer, options=dict(options))
        self.stream = self.container.add_stream(codec, rate=self.rate, layout="mono")
        if codec == "libmp3lame":
            self.stream.bit_rate = MP3_BITRATE
        elif codec == "aac":
            self.stream.bit_rate = AAC_BITRATE
        self.av_resampler = av.AudioResampler(format=self.stream.codec_context.format.name, layout="mono",
                                              rate=self.rate)
        self.pts = 0

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.fmt]

    def feed(self, pcm16: np.ndarray) -> bytes:
        """Bytes to send for these samples (maybe none yet: the codec waits for a whole frame)."""
        if self._passthrough:
            return self._header() + np.asarray(pcm16, dtype="<i2").tobytes()
        return self._encode(self._prepare(np.asarray(pcm16, dtype=np.float32) / 32767.0, last=False))

    def finish(self) -> bytes:
        """The rest: what the codec held back, the container's trailer."""
        if self._passthrough:
            return self._header()
        tail = self._prepare(None, last=True)
        return self._encode(tail, flush=True)

    # --- internals -------------------------------------------------------------------------------------------
    @property
    def _passthrough(self) -> bool:
        """pcm / wav at the engine's rate, unstretched: the stored samples go out as they are."""
        return self.fmt in ("pcm", "wav") and self.tempo is None and self.resampler is None

    def _header(self) -> bytes:
        if self.started:
            return b""
        self.started = True
        return wav_stream_header(self.rate) if self.fmt == "wav" else b""

    def _prepare(self, x: np.ndarray | None, last: bool) -> np.ndarray:
        if self.tempo is not None:
            x = self.tempo.push(x)
        elif x is None:
            x = np.zeros(0, np.float32)
        if self.resampler is not None:
            x = self.resampler.resample_chunk(np.ascontiguousarray(x, dtype=np.float32), last=last)
        return np.asarray(x, dtype=np.float32)

    def _encode(self, x: np.ndarray, flush: bool = False) -> bytes:
        if self.fmt in ("pcm", "wav"):      # after a tempo change or a resampler
            return self._header() + to_pcm16(x, self.fmt).tobytes()
        import av
        if len(x):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(np.clip(x, -1.0, 1.0))[None, :], format="flt",
                                               layout="mono")
            frame.sample_rate, frame.pts = self.rate, self.pts
            self.pts += len(x)
            for converted in self.av_resampler.resample(frame):
                for packet in self.stream.encode(converted):
                    self.container.mux(packet)
        if flush:
            for converted in self.av_resampler.resample(None):
                for packet in self.stream.encode(converted):
                    self.container.mux(packet)
            for packet in self.stream.encode(None):
                self.container.mux(packet)
            self.container.close()
            self.container = None
        return self.sink.take()

    def close(self) -> None:
        """Free the codec when the stream ends early (an error, the client gone)."""
        if self.container is not None:
            try:
                self.container.close()
            except Exception:  # noqa: BLE001 - closing a half-written container may complain; nothing to keep
                pass
            self.container = None
