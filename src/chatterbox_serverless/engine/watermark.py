"""The Perth implicit watermark (PyPI `resemble-perth` 1.0.1, `PerthImplicitWatermarker`), reimplemented in
torch/numpy so that the product needs neither librosa nor torchaudio (the `perth` package's own code imports
both). Only its weights are taken from the installed package (perth/perth_net/pretrained/implicit/*.pth.tar),
located without importing it, and loaded strictly.

`apply(wav, sr)` does what `apply_watermark` does:
  resample to 32 kHz (librosa's default soxr HQ + length fix), STFT (n_fft 2048, hop 320, Hann, centred,
  reflect padding), magnitude -> 20 log10(max(|X|, 1e-9)), normalised (m + 180) / 195; phase = angle(X);
  the encoder adds a conv-net residual to the lowest 128 bins (2 kHz) of frames louder than 5% of the
  loudest; back to a complex spectrum, iSTFT, resample to the input rate (length restored).
`detect(wav, sr)` runs the decoder (confidence in [0, 1] that the watermark is present). The official
detector resamples with scipy's polyphase filter; here soxr is used, so detection at rates other than
32 kHz is close to, not identical with, the official.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .audio import soxr_resample
from .checkpoint import CheckpointError, load_strict, read_torch

PERTH_SR = 32000
N_FFT = 2048
HOP = 320
MAGNITUDE_MIN = 1e-9
HEADROOM_DB = 15
MAX_WMARK_FREQ = 2000
HIDDEN = 256
SUBBAND = int(round((N_FFT // 2 + 1) * MAX_WMARK_FREQ / (PERTH_SR / 2)))   # 128 bins
MIN_LEVEL_DB = 20 * np.log10(MAGNITUDE_MIN)
WEIGHTS_IN_PACKAGE = ("perth_net", "pretrained", "implicit", "perth_net_250000.pth.tar")


def perth_weights_path() -> Path:
    """The checkpoint shipped inside the installed `resemble-perth` package (found without importing it)."""
    spec = importlib.util.find_spec("perth")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the Perth watermark weights come with the resemble-perth package: "
                              "pip install --no-deps resemble-perth==1.0.1")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*WEIGHTS_IN_PACKAGE)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: reinstall resemble-perth==1.0.1")
    return path


class ConvAct(nn.Module):
    def __init__(self, i: int, o: int, k: int, act: bool = True):
        super().__init__()
        self.conv = nn.Conv1d(i, o, k, padding=(k - 1) // 2)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return F.leaky_relu(x) if self.act else x


def _layers(i: int, hidden: int, o: int) -> nn.Sequential:
    return nn.Sequential(ConvAct(i, hidden, 1), *[ConvAct(hidden, hidden, 7) for _ in range(5)],
                         ConvAct(hidden, o, 1, act=False))


def loud_frames(magspec: torch.Tensor, p: float = 0.05) -> torch.Tensor:
    """(B, F, T) normalised magnitudes -> (B, T) 1.0 where the frame's sum exceeds p x the loudest frame's."""
    s = magspec.sum(dim=1)
    return (s > (s.max(dim=1).values * p)[:, None]).float()


class PerthEncoder(nn.Module):
    def __init__(self, hidden: int = HIDDEN, subband: int = SUBBAND):
        super().__init__()
        self.subband = subband
        self.layers = _layers(subband, hidden, subband)

    def forward(self, magspec: torch.Tensor) -> torch.Tensor:
        magspec = magspec.clone()
        mask = loud_frames(magspec)[:, None]
        magspec[:, :self.subband] += self.layers(magspec[:, :self.subband]) * mask
        return magspec


class PerthDecoder(nn.Module):
    """Three time scales (x1.25, x1, x0.75 frames), each giving an attention logit and a watermark score
    (masked means over loud frames); softmax-weighted sum of the scores."""

    def __init__(self, hidden: int = HIDDEN, subband: int = SUBBAND):
        super().__init__()
        self.subband = subband
        self.slow_layers = _layers(subband, hidden, 2)
        self.normal_layers = _layers(subband, hidden, 2)
        self.fast_layers = _layers(subband, hidden, 2)

    def forward(self, magspec: torch.Tensor) -> torch.Tensor:
        mask = loud_frames(magspec)[:, None]
        sub = magspec[:, :self.subband]
        T = sub.size(2)
        attns, marks = [], []
        for layers, size in ((self.slow_layers, int(T * 1.25)), (self.normal_layers, None),
                             (self.fast_layers, int(T * 0.75))):
            x = sub if size is None else F.interpolate(sub, size=size, mode="linear", align_corners=True)
            out = layers(x)
            m = F.interpolate(mask, size=out.size(2), mode="nearest")
            mean = lambda y: (y * m).sum(dim=2) / m.sum(dim=2)
            attns.append(mean(out[:, :1]))
            marks.append(mean(out[:, 1:]))
        attn = torch.softmax(torch.cat(attns, dim=1), dim=1)
        return (torch.cat(marks, dim=1) * attn).sum(dim=1)


class _Buffers(nn.Module):
    def __init__(self, **tensors: torch.Tensor):
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t)


class PerthNet(nn.Module):
    """Mirrors the keys of perth_net_250000.pth.tar: encoder.*, decoder.*, and the audio processor's buffers
    (STFT windows, used here; the time-stretch phase advance, a training-time attack, carried unused)."""

    def __init__(self):
        super().__init__()
        self.encoder = PerthEncoder()
        self.decoder = PerthDecoder()
        window = torch.hann_window(N_FFT)
        self.ap = nn.Module()
        self.ap.spectrogram = _Buffers(window=window.clone())
        self.ap.inv_spectrogram = _Buffers(window=window.clone())
        self.ap.stretch = _Buffers(phase_advance=torch.zeros(N_FFT // 2 + 1, 1))

    def magphase(self, signal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L,) -> normalised dB magnitude and phase, each (F, T)."""
        spec = torch.stft(signal, N_FFT, HOP, N_FFT, window=self.ap.spectrogram.window, center=True,
                          pad_mode="reflect", normalized=False, onesided=True, return_complex=True)
        phase = torch.angle(spec)
        mag = 20 * torch.log10(spec.abs().clip(MAGNITUDE_MIN))
        return (mag - MIN_LEVEL_DB) / (-MIN_LEVEL_DB + HEADROOM_DB), phase

    def signal(self, mag: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        mag = mag * (-MIN_LEVEL_DB + HEADROOM_DB) + MIN_LEVEL_DB
        mag = 10.0 ** ((mag / 20).clip(max=10))
        spec = mag * torch.exp(1.0j * phase)
        return torch.istft(spec, N_FFT, HOP, N_FFT, window=self.ap.inv_spectrogram.window, center=True,
                           normalized=False, onesided=True)


class Watermarker:
    """Applies (and detects) the Perth implicit watermark. Thread-safe for concurrent `apply` calls."""

    def __init__(self, weights: str | Path | None = None, device: torch.device | str = "cpu"):
        path = Path(weights) if weights else perth_weights_path()
        ckpt = read_torch(path)
        self.net = PerthNet()
        load_strict(self.net, ckpt["model"] if "model" in ckpt else ckpt, what=f"Perth watermark ({path.name})")
        self.net = self.net.to(device).eval()
        self.device = torch.device(device)

    @torch.inference_mode()
    def apply(self, wav: np.ndarray, sample_rate: int) -> np.ndarray:
        """Watermarked copy of a mono float waveform, same length and rate, float32."""
        x = np.asarray(wav, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"watermark: expected mono samples, got shape {x.shape}")
        y = soxr_resample(x, sample_rate, PERTH_SR)
        if y.shape[0] <= N_FFT // 2:      # under 32 ms: too short for the reflect-padded STFT (the official fails)
            return x.copy()
        mag, phase = self.net.magphase(torch.from_numpy(np.ascontiguousarray(y)).to(self.device))
        mag = self.net.encoder(mag[None])[0]
        out = self.net.signal(mag, phase).cpu().numpy()
        out = soxr_resample(out, PERTH_SR, sample_rate)
        if out.shape[0] != x.shape[0]:
            # the iSTFT drops the last partial hop (up to 10 ms): the official returns the shorter signal;
            # here the length is kept, the dropped tail being silence
            out = np.pad(out, (0, max(0, x.shape[0] - out.shape[0])))[:x.shape[0]]
        return out.astype(np.float32, copy=False)

    @torch.inference_mode()
    def detect(self, wav: np.ndarray, sample_rate: int) -> float:
        """Watermark confidence in [0, 1] (about 1 for watermarked audio, about 0 otherwise)."""
        x = np.asarray(wav, dtype=np.float32)
        y = soxr_resample(x, sample_rate, PERTH_SR)
        mag, _ = self.net.magphase(torch.from_numpy(np.ascontiguousarray(y)).to(self.device))
        return float(self.net.decoder(mag[None])[0].clip(0.0, 1.0))
