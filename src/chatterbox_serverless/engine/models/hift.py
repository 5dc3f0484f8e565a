"""S3Gen's vocoder: HiFTGenerator (neural source-filter + iSTFT HiFi-GAN, CosyVoice 2) with ConvRNNF0Predictor.

mel (B, 80, T) -> F0 (B, T) -> upsampled x480 -> harmonic source (fundamental + 8 harmonics with random
initial phases, noise) merged by Linear+tanh -> its STFT (16/4) fused at every upsampling stage of the
HiFi-GAN (conv_pre, ups 8/5/3, Snake resblocks) -> conv_post -> magnitude exp / phase sin -> iSTFT -> clamp.

Weight-normed convs carry the official keys `*.parametrizations.weight.original0/1` (torch's weight_norm
parametrisation); `fold_weight_norm()` replaces them by plain weights after loading.
Convolutions are non-causal and the iSTFT pads by reflection: rows of a batch must have equal lengths.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm


@dataclass
class HiFTConfig:
    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    n_fft: int = 16
    hop_len: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_cond_channels: int = 512

    @property
    def samples_per_frame(self) -> int:
        return int(np.prod(self.upsample_rates)) * self.hop_len

    @classmethod
    def tiny(cls) -> "HiFTConfig":
        # same time structure (480 samples per frame at 24 kHz), a few channels
        return cls(base_channels=16, resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1, 3),),
                   source_resblock_kernel_sizes=(3, 3, 3), source_resblock_dilation_sizes=((1,), (1,), (1,)),
                   f0_cond_channels=16)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], overrides: dict | None = None) -> "HiFTConfig":
        """`sd` holds the vocoder's keys without the `mel2wav.` prefix. Upsampling rates, hop and dilations are
        not visible in shapes: they come from `overrides` or the official defaults."""
        overrides = dict(overrides or {})
        g = lambda k: sd[k + ".parametrizations.weight.original1"]
        n_ups = len({k.split(".")[1] for k in sd if k.startswith("ups.")})
        n_kernels = len({k.split(".")[1] for k in sd if k.startswith("resblocks.")}) // n_ups
        count = lambda prefix: len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})
        default = cls()
        dil = overrides.pop("resblock_dilation_sizes", None)
        sdil = overrides.pop("source_resblock_dilation_sizes", None)
        values = dict(
            in_channels=g("conv_pre").shape[1], base_channels=g("conv_pre").shape[0],
            nb_harmonics=sd["m_source.l_linear.weight"].shape[1] - 1,
            upsample_kernel_sizes=tuple(g(f"ups.{i}").shape[-1] for i in range(n_ups)),
            n_fft=g("conv_post").shape[0] - 2,
            resblock_kernel_sizes=tuple(g(f"resblocks.{j}.convs1.0").shape[-1] for j in range(n_kernels)),
            resblock_dilation_sizes=tuple(tuple(d) for d in dil) if dil else tuple(
                default.resblock_dilation_sizes[0][:count(f"resblocks.{j}.convs1.")] for j in range(n_kernels)),
            source_resblock_kernel_sizes=tuple(g(f"source_resblocks.{i}.convs1.0").shape[-1] for i in range(n_ups)),
            source_resblock_dilation_sizes=tuple(tuple(d) for d in sdil) if sdil else tuple(
                default.source_resblock_dilation_sizes[0][:count(f"source_resblocks.{i}.convs1.")]
                for i in range(n_ups)),
            f0_cond_channels=g("f0_predictor.condnet.0").shape[0],
        )
        values.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()
                       if k in cls.__dataclass_fields__})
        return cls(**values)


def _padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


def hann_window_periodic(n: int) -> torch.Tensor:
    """scipy.signal.get_window('hann', n, fftbins=True), computed in float64 then rounded to float32."""
    fac = np.linspace(-np.pi, np.pi, n + 1)[:-1]
    return torch.from_numpy((0.5 + 0.5 * np.cos(fac)).astype(np.float32))


class Snake(nn.Module):
    """x + 1/alpha sin^2(alpha x), alpha per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]
        return x + (1.0 / (alpha + 1e-9)) * torch.pow(torch.sin(x * alpha), 2)


class ResBlock(nn.Module):
    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(weight_norm(nn.Conv1d(channels, channels, kernel_size, dilation=d,
                                                          padding=_padding(kernel_size, d))) for d in dilations)
        self.convs2 = nn.ModuleList(weight_norm(nn.Conv1d(channels, channels, kernel_size,
                                                          padding=_padding(kernel_size))) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = c2(a2(c1(a1(x)))) + x
        return x


class ConvRNNF0Predictor(nn.Module):
    def __init__(self, in_channels: int = 80, cond_channels: int = 512):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [weight_norm(nn.Conv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1)),
                       nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:   # (B, 80, T) -> (B, T) Hz
        x = self.condnet(mel).transpose(1, 2)
        return torch.abs(self.classifier(x).squeeze(-1))


class SourceModuleHnNSF(nn.Module):
    """Harmonic-plus-noise excitation from an upsampled F0, merged to one channel by Linear + tanh."""

    def __init__(self, config: HiFTConfig):
        super().__init__()
        self.config = config
        self.l_linear = nn.Linear(config.nb_harmonics + 1, 1)

    def sine_source(self, f0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """f0 (1, 1, L) Hz at the audio rate -> harmonics (1, H, L), voiced sines + noise. Draws, in the
        official order, the initial phases, the noise, and the (unused) noise-branch samples."""
        c = self.config
        H = c.nb_harmonics + 1
        harmonics = torch.arange(1, H + 1, device=f0.device, dtype=f0.dtype)[None, :, None]
        f_mat = f0 * harmonics / c.sampling_rate
        theta = 2 * np.pi * (torch.cumsum(f_mat, dim=-1) % 1)
        # draws happen on the generator's device (the global RNG of f0's device without one), then move
        gdev = generator.device if generator is not None else f0.device
        low = torch.tensor(-np.pi, dtype=torch.float32, device=gdev)
        high = torch.tensor(np.pi, dtype=torch.float32, device=gdev)
        u = torch.rand((f0.size(0), H, 1), generator=generator, device=gdev, dtype=torch.float32)
        phase = (low + u * (high - low)).to(f0.device, f0.dtype)
        phase[:, 0, :] = 0
        sines = c.nsf_alpha * torch.sin(theta + phase)
        uv = (f0 > c.nsf_voiced_threshold).to(torch.float32)
        noise_amp = uv * c.nsf_sigma + (1 - uv) * c.nsf_alpha / 3
        noise = torch.randn(sines.shape, generator=generator, device=gdev, dtype=sines.dtype).to(f0.device)
        torch.randn((f0.size(0), f0.size(2), 1), generator=generator, device=gdev)   # official noise branch
        return sines * uv + noise_amp * noise

    def forward(self, f0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """f0 (1, 1, L) -> source (1, 1, L)."""
        sines = self.sine_source(f0, generator)
        return torch.tanh(self.l_linear(sines.transpose(1, 2))).transpose(1, 2)


class HiFTGenerator(nn.Module):
    def __init__(self, config: HiFTConfig):
        super().__init__()
        c = self.config = config
        self.m_source = SourceModuleHnNSF(c)
        self.conv_pre = weight_norm(nn.Conv1d(c.in_channels, c.base_channels, 7, 1, padding=3))
        self.ups = nn.ModuleList(
            weight_norm(nn.ConvTranspose1d(c.base_channels // 2 ** i, c.base_channels // 2 ** (i + 1), k, u,
                                           padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes)))
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        cum_rates = np.cumprod([1] + list(c.upsample_rates[::-1][:-1]))[::-1]
        for i, (u, k, d) in enumerate(zip(cum_rates, c.source_resblock_kernel_sizes,
                                          c.source_resblock_dilation_sizes)):
            ch = c.base_channels // 2 ** (i + 1)
            u = int(u)
            self.source_downs.append(nn.Conv1d(c.n_fft + 2, ch, 1, 1) if u == 1 else
                                     nn.Conv1d(c.n_fft + 2, ch, u * 2, u, padding=u // 2))
            self.source_resblocks.append(ResBlock(ch, k, d))
        self.resblocks = nn.ModuleList(
            ResBlock(c.base_channels // 2 ** (i + 1), k, d)
            for i in range(len(c.upsample_rates))
            for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes))
        self.conv_post = weight_norm(nn.Conv1d(c.base_channels // 2 ** len(c.upsample_rates), c.n_fft + 2, 7, 1,
                                               padding=3))
        self.f0_predictor = ConvRNNF0Predictor(c.in_channels, c.f0_cond_channels)
        self.register_buffer("stft_window", hann_window_periodic(c.n_fft), persistent=False)

    def fold_weight_norm(self) -> None:
        """Replace every weight-norm parametrisation by the plain weight it computes (after loading)."""
        for module in self.modules():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)

    def convolve_in(self, dtype: torch.dtype) -> None:
        """Run the convolution stack (conv_pre, the upsampling and residual blocks, the source's downsampling
        convolutions; most of the vocoder's arithmetic) in `dtype`; the F0 predictor, the sine source, conv_post,
        the STFTs and everything between stay in float32 (the engine's bfloat16 mode: engine/speech_to_wav.py)."""
        for m in (self.conv_pre, self.ups, self.source_downs, self.source_resblocks, self.resblocks):
            m.to(dtype)

    def source(self, mel: torch.Tensor, generators: list[torch.Generator | None] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """mel (B, 80, T) -> (f0 (B, T), source (B, 1, T*samples_per_frame)); row b draws from generators[b]."""
        f0 = self.f0_predictor(mel)
        up = F.interpolate(f0[:, None], scale_factor=float(self.config.samples_per_frame), mode="nearest")
        gens = generators or [None] * mel.size(0)
        return f0, torch.cat([self.m_source(up[b:b + 1], gens[b]) for b in range(mel.size(0))], dim=0)

    def decode(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """mel (B, 80, T), source (B, 1, W) -> waveform (B, W)."""
        c = self.config
        window = self.stft_window.to(source.dtype)
        spec = torch.stft(source.squeeze(1), c.n_fft, c.hop_len, c.n_fft, window=window, return_complex=True)
        s_stft = torch.cat([spec.real, spec.imag], dim=1)

        dtype = self.conv_pre.weight.dtype
        x, s_stft = self.conv_pre(mel.to(dtype)), s_stft.to(dtype)
        n_k = len(c.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, c.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            xs = self.resblocks[i * n_k](x)
            for j in range(1, n_k):
                xs = xs + self.resblocks[i * n_k + j](x)
            x = xs / n_k
        x = self.conv_post(F.leaky_relu(x.float()))
        half = c.n_fft // 2 + 1
        magnitude = torch.clip(torch.exp(x[:, :half]), max=1e2)
        phase = torch.sin(x[:, half:])
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        wav = torch.istft(spec, c.n_fft, c.hop_len, c.n_fft, window=window)
        return torch.clamp(wav, -c.audio_limit, c.audio_limit)

    def forward(self, mel: torch.Tensor, generators: list[torch.Generator | None] | None = None,
                source: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """mel (B, 80, T) of equal lengths -> (waveform (B, W), source (B, 1, W)); a given `source` is used
        as is (parity with recorded excitation), else drawn from `generators`."""
        if source is None:
            _, source = self.source(mel, generators)
        return self.decode(mel, source), source
