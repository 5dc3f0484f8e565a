"""Signal processing for the voice front-ends, in numpy/torch only (no librosa, no torchaudio).

Each function reproduces, numerically, what the official Chatterbox pipeline gets from a library:

  slaney_mel_filterbank  librosa.filters.mel (Slaney scale and norm)
  soxr_resample          librosa.resample(res_type="soxr_hq") and the resampling inside librosa.load
  sinc_resample          torchaudio.transforms.Resample (sinc, Hann window, width 6, rolloff 0.99)
  trim_silence           librosa.effects.trim
  voice_encoder_mel      the voice encoder's mel: librosa.stft (center, reflect) -> power -> 40 mels, no log
  s3gen_prompt_mel       S3Gen's prompt mel (Matcha-TTS mel_spectrogram: n_fft 1920, hop 480, log)
  s3_log_mel             the S3 tokenizer's Whisper-style log-mel (128 mels)
  kaldi_fbank            torchaudio.compliance.kaldi.fbank with its defaults (CAMPPlus input)
  integrated_loudness    pyloudnorm.Meter(sr).integrated_loudness (ITU-R BS.1770-4, K-weighting, gating)
  normalize_loudness     Turbo's ChatterboxTurboTTS.norm_loudness (scale to -27 LUFS)
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

S3GEN_SR = 24_000   # S3Gen prompt mel and output audio
S3_SR = 16_000      # S3 tokenizer, voice encoder, CAMPPlus


# ----------------------------------------------------------------------------------------------- mel filters

def _hz_to_mel_slaney(f: np.ndarray | float) -> np.ndarray:
    f = np.asanyarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-30) / min_log_hz) / logstep, f / f_sp)


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@lru_cache(maxsize=16)
def _slaney_mel_filterbank_cached(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    fft_freqs = np.fft.rfftfreq(n_fft, d=1.0 / sr)
    mel_f = _mel_to_hz_slaney(np.linspace(_hz_to_mel_slaney(fmin), _hz_to_mel_slaney(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fft_freqs)
    weights = np.zeros((n_mels, n_fft // 2 + 1), dtype=np.float32)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels]))[:, None]   # Slaney norm: constant energy per band
    weights.setflags(write=False)
    return weights


def slaney_mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """(n_mels, n_fft//2+1) float32 triangular filters on the Slaney mel scale, Slaney-normalised:
    equal to `librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)`."""
    fmax = sr / 2 if fmax is None else fmax
    return _slaney_mel_filterbank_cached(int(sr), int(n_fft), int(n_mels), float(fmin), float(fmax)).copy()


# ------------------------------------------------------------------------------------------------ resamplers

def soxr_resample(y: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """`librosa.resample(y, orig_sr=..., target_sr=...)` with its default soxr_hq: SoX HQ resampling, then the
    length fixed to ceil(len * target/orig) (zero-padded or cut), in y's dtype."""
    if orig_sr == target_sr:
        return y
    import soxr
    ratio = float(target_sr) / orig_sr
    n_out = int(np.ceil(y.shape[-1] * ratio))   # librosa's rounding: e.g. 352800 at 44.1k -> 192001 at 24k
    out = soxr.resample(y, orig_sr, target_sr, quality="HQ")
    if out.shape[-1] > n_out:
        out = out[..., :n_out]
    elif out.shape[-1] < n_out:
        out = np.pad(out, [(0, 0)] * (out.ndim - 1) + [(0, n_out - out.shape[-1])])
    return np.asarray(out, dtype=y.dtype)


@lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int, lowpass_filter_width: int, rolloff: float) -> tuple[torch.Tensor, int]:
    """Windowed-sinc polyphase kernel (new, 1, 2*width + orig), computed in float64 and stored as float32, as
    torchaudio's Resample does."""
    base_freq = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base_freq)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    t = torch.arange(0, -new, -1)[:, None, None] / new + idx      # -j/new rounded to float32 first, as torchaudio
    t = (t * base_freq).clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), t.sin() / t) * (window * (base_freq / orig))
    return kernel.to(torch.float32), width


def sinc_resample(wav: torch.Tensor, orig_sr: int, target_sr: int, lowpass_filter_width: int = 6,
                  rolloff: float = 0.99) -> torch.Tensor:
    """Resample (..., time) like `torchaudio.transforms.Resample(orig_sr, target_sr)` (float32 kernel)."""
    if orig_sr == target_sr:
        return wav
    g = math.gcd(int(orig_sr), int(target_sr))
    orig, new = int(orig_sr) // g, int(target_sr) // g
    kernel, width = _sinc_kernel(orig, new, lowpass_filter_width, float(rolloff))
    kernel = kernel.to(device=wav.device, dtype=wav.dtype)
    shape = wav.shape
    x = wav.reshape(-1, shape[-1])
    length = x.shape[-1]
    x = F.pad(x, (width, width + orig))
    y = F.conv1d(x[:, None], kernel, stride=orig)            # (N, new, frames)
    y = y.transpose(1, 2).reshape(x.shape[0], -1)
    target_length = math.ceil(new * length / orig)
    return y[..., :target_length].reshape(*shape[:-1], -1)


# ------------------------------------------------------------------------------------------------------ trim

def _frame(y: np.ndarray, frame_length: int, hop_length: int) -> np.ndarray:
    """(frame_length, n_frames) strided view, frames on the last axis, as librosa.util.frame."""
    n_frames = 1 + (y.shape[-1] - frame_length) // hop_length
    return np.lib.stride_tricks.as_strided(y, shape=(frame_length, n_frames),
                                           strides=(y.strides[-1], y.strides[-1] * hop_length), writeable=False)


def trim_silence(y: np.ndarray, top_db: float = 20.0, frame_length: int = 2048, hop_length: int = 512) -> np.ndarray:
    """Drop leading and trailing frames quieter than `top_db` below the loudest frame (RMS, centred frames):
    `librosa.effects.trim(y, top_db=top_db)[0]` for 1-D y."""
    padded = np.pad(y, (frame_length // 2, frame_length // 2), mode="constant")
    frames = _frame(np.ascontiguousarray(padded), frame_length, hop_length)
    rms = np.sqrt(np.mean(np.abs(frames) ** 2, axis=-2, keepdims=True))[0]
    power = np.square(np.abs(rms))
    ref = np.max(np.abs(rms)) ** 2
    amin = 1e-10
    db = 10.0 * np.log10(np.maximum(amin, power)) - 10.0 * np.log10(np.maximum(amin, ref))
    nonzero = np.flatnonzero(db > -top_db)
    if nonzero.size == 0:
        return y[:0]
    start = int(nonzero[0] * hop_length)
    end = min(y.shape[-1], int((nonzero[-1] + 1) * hop_length))
    return y[start:end]


# ------------------------------------------------------------------------------------------- mel front-ends

def _hann_periodic_f64(n: int) -> np.ndarray:
    """Periodic Hann window in float64, computed as scipy.signal.get_window("hann", n) does."""
    fac = np.linspace(-np.pi, np.pi, n + 1)[:n]
    return 0.5 * np.cos(0.0 * fac) + 0.5 * np.cos(fac)


def voice_encoder_mel(wav: np.ndarray, sr: int = S3_SR, n_fft: int = 400, hop: int = 160, n_mels: int = 40,
                      fmin: float = 0.0, fmax: float = 8000.0) -> np.ndarray:
    """The voice encoder's mel, (frames, n_mels) float32: librosa.stft (Hann, center, reflect pad), |X|**2,
    Slaney mel filters, no log. frames = 1 + len(wav) // hop."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.shape[-1] <= n_fft // 2:
        raise ValueError(f"audio too short for the voice encoder mel ({wav.shape[-1]} samples)")
    padded = np.pad(wav, (n_fft // 2, n_fft // 2), mode="reflect")
    frames = _frame(padded, n_fft, hop)                                      # (n_fft, T) float32
    spec = np.fft.rfft(_hann_periodic_f64(n_fft)[:, None] * frames, axis=0).astype(np.complex64)
    power = np.abs(spec) ** 2                                                 # float32
    mel = np.dot(slaney_mel_filterbank(sr, n_fft, n_mels, fmin, fmax), power)
    return np.ascontiguousarray(mel.T, dtype=np.float32)


def s3gen_prompt_mel(wav: torch.Tensor, n_fft: int = 1920, hop: int = 480, n_mels: int = 80, sr: int = S3GEN_SR,
                     fmin: float = 0.0, fmax: float = 8000.0) -> torch.Tensor:
    """S3Gen's prompt mel of (B, L) 24 kHz audio -> (B, n_mels, L // hop): reflect pad (n_fft-hop)/2 each side,
    STFT without centring, magnitude sqrt(re²+im²+1e-9), Slaney mels, natural log clamped at 1e-5."""
    if wav.dim() == 1:
        wav = wav[None]
    pad = (n_fft - hop) // 2
    if wav.shape[-1] <= pad:
        raise ValueError(f"audio too short for the S3Gen prompt mel ({wav.shape[-1]} samples)")
    x = F.pad(wav[:, None], (pad, pad), mode="reflect")[:, 0]
    window = torch.hann_window(n_fft, device=wav.device, dtype=wav.dtype)
    spec = torch.view_as_real(torch.stft(x, n_fft, hop_length=hop, win_length=n_fft, window=window, center=False,
                                         normalized=False, onesided=True, return_complex=True))
    mag = torch.sqrt(spec.pow(2).sum(-1) + 1e-9)
    basis = torch.from_numpy(slaney_mel_filterbank(sr, n_fft, n_mels, fmin, fmax)).to(wav.device, wav.dtype)
    return torch.log(torch.clamp(torch.matmul(basis, mag), min=1e-5))


def s3_log_mel(wav: torch.Tensor, mel_filters: torch.Tensor | None = None, window: torch.Tensor | None = None,
               n_fft: int = 400, hop: int = 160, n_mels: int = 128) -> torch.Tensor:
    """The S3 tokenizer's log-mel of one 16 kHz clip (L,) -> (n_mels, L // hop): centred STFT, last frame
    dropped, |X|², Slaney mels, log10 clamped at 1e-10, floor at max-8, (x+4)/4. The max is over this clip."""
    if wav.dim() != 1:
        raise ValueError("s3_log_mel takes one clip, shape (L,)")
    if wav.shape[0] <= n_fft // 2:
        raise ValueError(f"audio too short for the S3 tokenizer ({wav.shape[0]} samples)")
    if window is None:
        window = torch.hann_window(n_fft, device=wav.device)
    if mel_filters is None:
        mel_filters = torch.from_numpy(slaney_mel_filterbank(S3_SR, n_fft, n_mels))
    stft = torch.stft(wav, n_fft, hop, window=window.to(wav.device), return_complex=True)
    magnitudes = stft[..., :-1].abs() ** 2
    mel = mel_filters.to(wav.device) @ magnitudes
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


@lru_cache(maxsize=8)
def _kaldi_mel_banks(num_bins: int, padded_window: int, sample_freq: float, low_freq: float,
                     high_freq: float) -> torch.Tensor:
    """Kaldi's triangular mel banks (num_bins, padded_window//2 + 1) in float32, last (Nyquist) column zero."""
    nyquist = 0.5 * sample_freq
    if high_freq <= 0.0:
        high_freq += nyquist
    fft_bin_width = sample_freq / padded_window

    def mel_scalar(f: float) -> float:
        return 1127.0 * math.log(1.0 + f / 700.0)

    mel_low, mel_high = mel_scalar(low_freq), mel_scalar(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins).unsqueeze(1)
    left = mel_low + b * delta
    center = mel_low + (b + 1.0) * delta
    right = mel_low + (b + 2.0) * delta
    mel = (1127.0 * (1.0 + fft_bin_width * torch.arange(float(padded_window // 2)) / 700.0).log()).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.max(torch.zeros(1), torch.min(up, down))
    return F.pad(banks, (0, 1))


def kaldi_fbank(wav: torch.Tensor, num_mel_bins: int = 80, sample_frequency: float = 16000.0,
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0, preemphasis: float = 0.97,
                low_freq: float = 20.0, high_freq: float = 0.0) -> torch.Tensor:
    """Log mel filterbank energies (frames, num_mel_bins) of a 1-D clip, as `torchaudio.compliance.kaldi.fbank`
    with its defaults (no dither, DC removal, pre-emphasis, Povey window, FFT size rounded up to a power of
    two, snip_edges, power spectrum, log floored at float32 eps)."""
    if wav.dim() != 1:
        raise ValueError("kaldi_fbank takes one clip, shape (L,)")
    shift = int(sample_frequency * frame_shift_ms * 0.001)
    size = int(sample_frequency * frame_length_ms * 0.001)
    padded = 1 if size == 0 else 2 ** (size - 1).bit_length()
    if wav.shape[0] < size:
        raise ValueError(f"audio too short for the filterbank ({wav.shape[0]} samples < {size})")
    eps = torch.tensor(torch.finfo(torch.float).eps, device=wav.device, dtype=wav.dtype)
    m = 1 + (wav.shape[0] - size) // shift
    frames = wav.as_strided((m, size), (shift * wav.stride(0), wav.stride(0)))
    frames = frames - frames.mean(dim=1, keepdim=True)
    prev = F.pad(frames.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)[:, :-1]
    frames = frames - preemphasis * prev
    window = torch.hann_window(size, periodic=False, device=wav.device, dtype=wav.dtype).pow(0.85)
    frames = F.pad((frames * window.unsqueeze(0)).unsqueeze(0), (0, padded - size)).squeeze(0)
    power = torch.fft.rfft(frames).abs().pow(2.0)
    banks = _kaldi_mel_banks(num_mel_bins, padded, float(sample_frequency), float(low_freq), float(high_freq))
    energies = torch.mm(power, banks.to(device=wav.device, dtype=wav.dtype).T)
    return torch.max(energies, eps).log()


# -------------------------------------------------------------------------------------------------- loudness
#
# pyloudnorm 0.2 (what the official Turbo uses), reproduced: the two K-weighting biquads of its RBJ-cookbook
# design (high shelf +4 dB at 1500 Hz, Q 1/sqrt 2; high pass at 38 Hz, Q 0.5), each run in float64 (scipy's
# lfilter) and stored back into the float32 signal, as pyloudnorm does with a float32 input; then 400 ms blocks
# overlapping by 75%, mean square per block (a float32 sum, as numpy's), absolute gate -70 LUFS, relative gate
# -10 LU. The filters are computed here as the convolution with their impulse response (run out until it is
# below 1e-20 of its peak: 4-5k samples at 24 kHz) through the FFT, which equals the recursion to ~1e-15
# relative; the float32 rounding that follows absorbs it (a sample can move by one float32 step only where the
# float64 value sits within ~1e-15 of a rounding boundary).


def _biquad(kind: str, gain_db: float, q: float, fc: float, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """(b, a) normalised by a0: pyloudnorm's IIRfilter.generate_coefficients for 'high_shelf' / 'high_pass'."""
    A = 10 ** (gain_db / 40.0)
    w0 = 2.0 * np.pi * (fc / rate)
    alpha = np.sin(w0) / (2.0 * q)
    if kind == "high_shelf":
        b0 = A * ((A + 1) + (A - 1) * np.cos(w0) + 2 * np.sqrt(A) * alpha)
        b1 = -2 * A * ((A - 1) + (A + 1) * np.cos(w0))
        b2 = A * ((A + 1) + (A - 1) * np.cos(w0) - 2 * np.sqrt(A) * alpha)
        a0 = (A + 1) - (A - 1) * np.cos(w0) + 2 * np.sqrt(A) * alpha
        a1 = 2 * ((A - 1) - (A + 1) * np.cos(w0))
        a2 = (A + 1) - (A - 1) * np.cos(w0) - 2 * np.sqrt(A) * alpha
    elif kind == "high_pass":
        b0 = (1 + np.cos(w0)) / 2
        b1 = -(1 + np.cos(w0))
        b2 = (1 + np.cos(w0)) / 2
        a0 = 1 + alpha
        a1 = -2 * np.cos(w0)
        a2 = 1 - alpha
    else:
        raise ValueError(kind)
    return np.array([b0, b1, b2]) / a0, np.array([a0, a1, a2]) / a0


@lru_cache(maxsize=8)
def _impulse_response(b: tuple, a: tuple, tol: float = 1e-20, max_len: int = 1 << 16) -> np.ndarray:
    """h[n] of the biquad (b, a) (direct form, float64), up to where the tail is below tol x its peak."""
    h = []
    x1 = x2 = y1 = y2 = 0.0
    peak, quiet = 0.0, 0
    for n in range(max_len):
        x0 = 1.0 if n == 0 else 0.0
        y0 = b[0] * x0 + b[1] * x1 + b[2] * x2 - a[1] * y1 - a[2] * y2
        h.append(y0)
        x2, x1, y2, y1 = x1, x0, y1, y0
        peak = max(peak, abs(y0))
        quiet = quiet + 1 if abs(y0) < tol * peak else 0
        if quiet >= 64:
            break
    return np.array(h, dtype=np.float64)


def _apply_biquad(x: np.ndarray, b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """lfilter(b, a, x) in float64 (zero initial state), by FFT convolution with the impulse response."""
    h = _impulse_response(tuple(b.tolist()), tuple(a.tolist()))
    n = x.shape[0] + h.shape[0] - 1
    size = 1 << max(1, (n - 1).bit_length())
    y = np.fft.irfft(np.fft.rfft(x.astype(np.float64), size) * np.fft.rfft(h, size), size)
    return y[: x.shape[0]]


def integrated_loudness(wav: np.ndarray, rate: int) -> float:
    """Integrated loudness (LUFS) of a mono signal, as pyloudnorm.Meter(rate).integrated_loudness(wav): -inf for
    a signal whose blocks are all below the absolute gate. ValueError for one shorter than a block (400 ms)."""
    import warnings
    data = np.array(wav, copy=True)
    if data.ndim != 1 or not np.issubdtype(data.dtype, np.floating):
        raise ValueError("loudness: a mono floating-point signal is needed")
    block, overlap = 0.400, 0.75
    if data.shape[0] < block * rate:
        raise ValueError("Audio must have length greater than the block size.")
    for kind, gain, q, fc in (("high_shelf", 4.0, 1 / np.sqrt(2), 1500.0), ("high_pass", 0.0, 0.5, 38.0)):
        b, a = _biquad(kind, gain, q, fc, rate)
        data[:] = _apply_biquad(data, b, a)           # float64 result stored in the input's dtype
    step = 1.0 - overlap
    T = data.shape[0] / rate
    n_blocks = int(np.round(((T - block) / (block * step)))) + 1
    z = np.zeros(n_blocks)
    for j in range(n_blocks):
        lo = int(block * (j * step) * rate)
        hi = int(block * (j * step + 1) * rate)
        z[j] = (1.0 / (block * rate)) * np.sum(np.square(data[lo:hi]))
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", category=RuntimeWarning)
        loud = [-0.691 + 10.0 * np.log10(np.sum([1.0 * z[j]])) for j in range(n_blocks)]
        gated = [j for j, l_j in enumerate(loud) if l_j >= -70.0]
        z_avg = np.mean([z[j] for j in gated])
        gamma_r = -0.691 + 10.0 * np.log10(np.sum([1.0 * z_avg])) - 10.0
        gated = [j for j, l_j in enumerate(loud) if (l_j > gamma_r and l_j > -70.0)]
        z_avg = np.nan_to_num(np.array(np.mean([z[j] for j in gated])))
        return float(-0.691 + 10.0 * np.log10(np.sum([1.0 * z_avg])))


def normalize_loudness(wav: np.ndarray, rate: int, target_lufs: float = -27.0) -> np.ndarray:
    """Turbo's norm_loudness: scale `wav` to `target_lufs`; left as it is when the gain is not finite and positive
    (a signal under the gate) or the meter cannot measure it (shorter than 400 ms)."""
    try:
        gain = 10.0 ** ((target_lufs - integrated_loudness(wav, rate)) / 20.0)
    except ValueError:
        return wav
    if math.isfinite(gain) and gain > 0.0:
        return wav * gain
    return wav
