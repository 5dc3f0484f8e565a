"""Signal-processing primitives of the voice front-ends, against expectations computed independently here
(tone frequencies, filter areas, lengths). Bit-exactness against librosa/torchaudio is checked ad hoc with the
reference environment; these tests pin the behaviour without those libraries."""
import math

import numpy as np
import pytest
import torch

from chatterbox_serverless.engine import audio


def tone(freq: float, sr: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def slaney_hz(mel: float) -> float:
    """Slaney mel -> Hz, written out: linear (200/3 Hz per mel) below 1 kHz, log (27 mels per 6.4x) above."""
    return mel * 200 / 3 if mel < 15 else 1000 * 6.4 ** ((mel - 15) / 27)


def slaney_mel(hz: float) -> float:
    return hz * 3 / 200 if hz < 1000 else 15 + 27 * math.log(hz / 1000) / math.log(6.4)


@pytest.mark.parametrize("sr,n_fft,n_mels,fmax", [(16000, 400, 40, 8000), (24000, 1920, 80, 8000), (16000, 400, 128, None)])
def test_mel_filterbank_centres_and_unit_area(sr, n_fft, n_mels, fmax):
    w = audio.slaney_mel_filterbank(sr, n_fft, n_mels, 0.0, fmax)
    assert w.shape == (n_mels, n_fft // 2 + 1) and w.dtype == np.float32 and (w >= 0).all()
    top = slaney_mel(fmax or sr / 2)
    centres = [slaney_hz(top * (i + 1) / (n_mels + 1)) for i in range(n_mels)]
    freqs = np.arange(n_fft // 2 + 1) * sr / n_fft
    bin_hz = sr / n_fft
    for i in range(n_mels):
        peak = freqs[np.argmax(w[i])]
        assert abs(peak - centres[i]) <= bin_hz / 2 + 1e-6
        lo, hi = slaney_hz(top * i / (n_mels + 1)), slaney_hz(top * (i + 2) / (n_mels + 1))
        if hi - lo > 8 * bin_hz:   # wide triangles: Slaney norm makes the area (in Hz) one
            assert abs(w[i].sum() * bin_hz - 1.0) < 0.05
        assert w[i, freqs > hi + 1e-6].max(initial=0) == 0 and w[i, freqs < lo - 1e-6].max(initial=0) == 0


def test_sinc_resample_preserves_a_low_tone():
    x = torch.from_numpy(tone(440, 24000, 0.5))
    y = audio.sinc_resample(x, 24000, 16000)
    assert y.shape == (math.ceil(x.shape[0] * 2 / 3),)
    expected = torch.from_numpy(tone(440, 16000, 0.5))
    assert torch.allclose(y[200:-200], expected[200:y.shape[0] - 200], atol=2e-3)
    # batched rows resample independently; odd rates work too
    xb = torch.stack([x, 0.5 * x])
    yb = audio.sinc_resample(xb, 24000, 16000)
    assert torch.allclose(yb[0], y) and torch.allclose(yb[1], 0.5 * y, atol=1e-6)
    z = audio.sinc_resample(torch.from_numpy(tone(300, 44100, 0.3)), 44100, 16000)
    assert z.shape == (math.ceil(int(44100 * 0.3) * 16000 / 44100),)
    assert torch.allclose(z[300:-300], torch.from_numpy(tone(300, 16000, 0.3))[300:z.shape[0] - 300], atol=3e-3)
    assert audio.sinc_resample(x, 16000, 16000) is x


def test_soxr_resample_length_and_tone():
    x = tone(440, 24000, 0.5)
    y = audio.soxr_resample(x, 24000, 16000)
    assert y.dtype == np.float32 and y.shape == (8000,)
    assert np.allclose(y[300:-300], tone(440, 16000, 0.5)[300:-300], atol=2e-3)
    # librosa's length rule: ceil(n * (target / orig)) with the ratio rounded first (352800 -> 192001)
    assert audio.soxr_resample(np.zeros(352800, np.float32), 44100, 24000).shape == (192001,)


def test_trim_silence_keeps_the_loud_part():
    sr = 16000
    x = np.concatenate([np.zeros(8000), tone(300, sr, 1.0), 1e-4 * np.ones(16000)]).astype(np.float32)
    y = audio.trim_silence(x, top_db=20)
    # the result is a slice starting on a hop (512) boundary, within one frame (2048) of the tone's edges
    offsets = [o for o in range(0, len(x) - len(y) + 1, 512) if np.array_equal(x[o:o + len(y)], y)]
    assert len(offsets) == 1
    start, end = offsets[0], offsets[0] + len(y)
    assert 8000 - 2048 <= start <= 8000
    assert 24000 <= end <= 24000 + 2048
    assert len(audio.trim_silence(np.zeros(5000, np.float32))) == 5000   # all equally quiet: nothing trimmed


def test_voice_encoder_mel_sine_peak_and_power():
    sr = 16000
    x = tone(1000, sr, 1.0)
    mel = audio.voice_encoder_mel(x)
    assert mel.shape == (1 + len(x) // 160, 40) and mel.dtype == np.float32
    centres = [slaney_hz(slaney_mel(8000) * (i + 1) / 41) for i in range(40)]
    band = int(np.argmax(mel[50]))
    assert abs(centres[band] - 1000) < 150
    assert np.allclose(audio.voice_encoder_mel(2 * x), 4 * mel, rtol=1e-4, atol=1e-6)   # power, no log


def test_s3gen_prompt_mel_shape_and_peak():
    x = torch.from_numpy(tone(1000, 24000, 1.0))[None]
    mel = audio.s3gen_prompt_mel(x)
    assert mel.shape == (1, 80, 24000 // 480)
    band = int(mel[0, :, 25].argmax())
    centres = [slaney_hz(slaney_mel(8000) * (i + 1) / 81) for i in range(80)]
    assert abs(centres[band] - 1000) < 60
    silent = audio.s3gen_prompt_mel(torch.zeros(1, 4800))
    assert torch.allclose(silent, torch.full_like(silent, math.log(1e-5)))   # log floor


def test_s3_log_mel_range_and_shape():
    x = torch.from_numpy(tone(500, 16000, 1.0))
    mel = audio.s3_log_mel(x)
    assert mel.shape == (128, 16000 // 160)
    top = mel.max()
    assert mel.min() >= top - 2.0 - 1e-6             # floor at max - 8 (in log10), /4
    centres = [slaney_hz(slaney_mel(8000) * (i + 1) / 129) for i in range(128)]
    assert abs(centres[int(mel[:, 50].argmax())] - 500) < 40
    with pytest.raises(ValueError):
        audio.s3_log_mel(torch.zeros(2, 1000))


def test_kaldi_fbank_frames_and_peak():
    x = torch.from_numpy(tone(1000, 16000, 0.5))
    fb = audio.kaldi_fbank(x)
    assert fb.shape == (1 + (8000 - 400) // 160, 80)
    mel = lambda f: 1127 * math.log(1 + f / 700)
    lo, hi = mel(20), mel(8000)
    centres = [700 * (math.exp((lo + (i + 1) * (hi - lo) / 81) / 1127) - 1) for i in range(80)]
    assert abs(centres[int(fb[20].argmax())] - 1000) < 60
    assert torch.allclose(audio.kaldi_fbank(torch.zeros(1000)), torch.full((4, 80), math.log(torch.finfo(torch.float).eps)))
    with pytest.raises(ValueError):
        audio.kaldi_fbank(torch.zeros(100))
