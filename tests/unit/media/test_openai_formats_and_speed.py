"""The formats OpenAI's speech API names (opus, aac, pcm) and `speed` (pitch-preserving time-stretch)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from chatterbox_serverless.media import MediaError, encode_audio, time_stretch

RATE = 24000


def tone(freq: float = 220.0, seconds: float = 2.0, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant(x: np.ndarray, rate: int = RATE) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def decode_av(data: bytes) -> tuple[np.ndarray, int, str]:
    import av
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.audio[0]
        x = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(stream)])
        return x, stream.codec_context.sample_rate, stream.codec_context.name


def test_pcm_is_raw_24khz_16bit_little_endian():
    x = tone(seconds=1.5)
    data, media_type = encode_audio(x, RATE, "pcm")
    assert media_type == "audio/pcm" and len(data) == len(x) * 2
    back = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767
    assert np.max(np.abs(back - x)) < 1e-4
    # another engine rate is resampled to 24 kHz: the byte count still says the duration
    data16, _ = encode_audio(tone(seconds=1.5, rate=16000), 16000, "pcm")
    assert abs(len(data16) / 2 / RATE - 1.5) < 0.01


def test_opus_is_opus_in_ogg():
    data, media_type = encode_audio(tone(), RATE, "opus")
    assert media_type == "audio/ogg; codecs=opus" and data[:4] == b"OggS"
    info = sf.info(io.BytesIO(data))
    assert info.format == "OGG" and info.subtype == "OPUS" and abs(info.duration - 2.0) < 0.05


def test_aac_is_adts_and_decodes():
    data, media_type = encode_audio(tone(440.0), RATE, "aac")
    assert media_type == "audio/aac"
    assert data[0] == 0xFF and data[1] & 0xF0 == 0xF0           # ADTS sync word
    x, rate, codec = decode_av(data)
    assert codec == "aac" and rate == RATE
    assert abs(len(x) / rate - 2.0) < 0.1                       # + encoder priming
    assert abs(dominant(x[4096:-4096]) - 440.0) < 5


@pytest.mark.parametrize("speed", [0.25, 0.5, 2.0, 4.0])
def test_speed_scales_the_duration_and_keeps_the_pitch(speed):
    x = tone(220.0, seconds=3.0)
    y = time_stretch(x, RATE, speed)
    assert abs(len(y) / (len(x) / speed) - 1) < 0.10
    assert abs(dominant(y) / 220.0 - 1) < 0.03                  # a resampling would give 220 * speed


def test_speed_one_is_untouched_and_out_of_range_refused():
    x = tone(seconds=0.5)
    assert np.array_equal(time_stretch(x, RATE, 1.0), x)
    with pytest.raises(MediaError, match="speed"):
        time_stretch(x, RATE, 5.0)
