"""S3 speech tokenizer v2 (25 tokens/s, 6561 codes), as in s3tokenizer <= 0.2.0, which Chatterbox was built with.

Log-mel (128 bands, 100 frames/s) -> two stride-2 convs + GELU -> blocks of [LayerNorm -> attention with RoPE
(q and k each scaled by head_dim^-0.25) + FSMN memory (depthwise conv over the values) -> residual; LayerNorm ->
MLP -> residual] -> FSQ: Linear to 8 dims, tanh, round to {-1, 0, 1}, base-3 index. Keys = the `tokenizer.*`
part of `s3gen.safetensors` without the prefix.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .. import audio
from ..checkpoint import CONFIG_FILE, CheckpointError

MAX_MEL_FRAMES = 3000   # 30 s; longer audio needs s3tokenizer's sliding windows, which Chatterbox never uses


@dataclass
class S3TokenizerConfig:
    n_mels: int = 128
    n_state: int = 1280
    n_head: int = 20
    n_layer: int = 6
    fsmn_kernel: int = 31
    attn_ln_eps: float = 1e-6    # s3tokenizer <= 0.2.0 (0.3.0 changed it to 1e-5)
    mlp_ln_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_max: int = 2048
    fsq_dims: int = 8
    n_fft: int = 400
    hop: int = 160

    @classmethod
    def tiny(cls) -> "S3TokenizerConfig":
        return cls(n_state=64, n_head=2, n_layer=2, fsmn_kernel=5)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], overrides: dict | None = None) -> "S3TokenizerConfig":
        cfg = dict(n_mels=sd["encoder.conv1.weight"].shape[1], n_state=sd["encoder.conv1.weight"].shape[0],
                   n_layer=len({k.split(".")[2] for k in sd if k.startswith("encoder.blocks.")}),
                   fsmn_kernel=sd["encoder.blocks.0.attn.fsmn_block.weight"].shape[-1],
                   fsq_dims=sd["quantizer._codebook.project_down.weight"].shape[0])
        known = {f.name for f in fields(cls)}
        cfg.update({k: v for k, v in (overrides or {}).items() if k in known and k not in cfg})
        config = cls(**cfg)
        if config.n_state % config.n_head or (config.n_state // config.n_head) % 2:
            raise CheckpointError(f"S3 tokenizer width {config.n_state} does not split into {config.n_head} heads; "
                             f"set n_head in {CONFIG_FILE}")
        return config


def _lengths_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B, max_len) bool, True on valid positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class FSMNAttention(nn.Module):
    def __init__(self, config: S3TokenizerConfig):
        super().__init__()
        n = config.n_state
        self.n_head = config.n_head
        self.query = nn.Linear(n, n)
        self.key = nn.Linear(n, n, bias=False)
        self.value = nn.Linear(n, n)
        self.out = nn.Linear(n, n)
        self.fsmn_block = nn.Conv1d(n, n, config.fsmn_kernel, groups=n, bias=False)
        self.left_pad = (config.fsmn_kernel - 1) // 2
        self.right_pad = config.fsmn_kernel - 1 - self.left_pad

    def forward(self, x: torch.Tensor, bias: torch.Tensor, valid: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        """x (B, T, C); bias (B, 1, 1, T) additive key mask; valid (B, T, 1) float; cos/sin (T, head_dim)."""
        B, T, C = x.shape
        q = self.query(x).view(B, T, self.n_head, -1)
        k = self.key(x).view(B, T, self.n_head, -1)
        v = self.value(x).view(B, T, self.n_head, -1)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)

        # FSMN memory: depthwise conv over time on the (masked) values, plus the values themselves.
        vm = v.reshape(B, T, C) * valid
        memory = self.fsmn_block(F.pad(vm.transpose(1, 2), (self.left_pad, self.right_pad))).transpose(1, 2)
        memory = (memory + vm) * valid

        scale = (C // self.n_head) ** -0.25
        q = q.permute(0, 2, 1, 3) * scale
        k = k.permute(0, 2, 3, 1) * scale
        w = torch.softmax((q @ k + bias).float(), dim=-1).to(q.dtype)
        out = (w @ v.permute(0, 2, 1, 3)).permute(0, 2, 1, 3).flatten(start_dim=2)
        return self.out(out) + memory


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (B, T, H, D) with rotate-halves pairing; cos/sin (T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]


class ResidualAttentionBlock(nn.Module):
    def __init__(self, config: S3TokenizerConfig):
        super().__init__()
        n = config.n_state
        self.attn = FSMNAttention(config)
        self.attn_ln = nn.LayerNorm(n, eps=config.attn_ln_eps)
        self.mlp = nn.Sequential(nn.Linear(n, 4 * n), nn.GELU(), nn.Linear(4 * n, n))
        self.mlp_ln = nn.LayerNorm(n, eps=config.mlp_ln_eps)

    def forward(self, x, bias, valid, cos, sin):
        x = x + self.attn(self.attn_ln(x), bias, valid, cos, sin)
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    def __init__(self, config: S3TokenizerConfig):
        super().__init__()
        self.conv1 = nn.Conv1d(config.n_mels, config.n_state, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(config.n_state, config.n_state, kernel_size=3, stride=2, padding=1)
        self.blocks = nn.ModuleList(ResidualAttentionBlock(config) for _ in range(config.n_layer))


class FSQCodebook(nn.Module):
    def __init__(self, config: S3TokenizerConfig):
        super().__init__()
        self.project_down = nn.Linear(config.n_state, config.fsq_dims)


class FSQQuantizer(nn.Module):
    def __init__(self, config: S3TokenizerConfig):
        super().__init__()
        self._codebook = FSQCodebook(config)


class S3TokenizerV2(nn.Module):
    # The official tokenizer registers these as buffers; a checkpoint may or may not carry them.
    computable_buffers = ("_mel_filters", "window")

    def __init__(self, config: S3TokenizerConfig):
        super().__init__()
        self.config = config
        self.encoder = AudioEncoder(config)
        self.quantizer = FSQQuantizer(config)
        self.register_buffer("_mel_filters", torch.from_numpy(
            audio.slaney_mel_filterbank(audio.S3_SR, config.n_fft, config.n_mels)))
        self.register_buffer("window", torch.hann_window(config.n_fft))
        head_dim = config.n_state // config.n_head
        freqs = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2)[:head_dim // 2].float() / head_dim))
        angles = torch.outer(torch.arange(config.rope_max), freqs).float()
        rot = torch.view_as_real(torch.polar(torch.ones_like(angles), angles))
        self.register_buffer("rope_cos", torch.cat((rot[..., 0], rot[..., 0]), dim=-1), persistent=False)
        self.register_buffer("rope_sin", torch.cat((rot[..., 1], rot[..., 1]), dim=-1), persistent=False)

    def log_mel(self, wav: torch.Tensor) -> torch.Tensor:
        """(n_mels, frames) log-mel of one 16 kHz clip (L,), 100 frames/s."""
        c = self.config
        return audio.s3_log_mel(wav.to(self._mel_filters.device, torch.float32), self._mel_filters.float(),
                                self.window.float(), n_fft=c.n_fft, hop=c.hop, n_mels=c.n_mels)

    def encode(self, mels: torch.Tensor, mel_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states of a padded batch of log-mels (B, n_mels, T) with lengths (B,) -> ((B, T', n_state),
        lengths (B,)); T' = ceil(T / 4). Padding is masked, so a row's valid states do not depend on the batch."""
        if int(mel_lens.max()) > MAX_MEL_FRAMES:
            raise ValueError(f"the S3 tokenizer takes at most {MAX_MEL_FRAMES // 100} s of audio at once")
        enc = self.encoder
        x_len = mel_lens.to(mels.device)
        mels = mels.to(enc.conv1.weight.dtype)
        x = mels * _lengths_mask(x_len, mels.shape[-1]).unsqueeze(1).to(mels.dtype)
        x = F.gelu(enc.conv1(x))
        x_len = (x_len - 1) // 2 + 1
        x = x * _lengths_mask(x_len, x.shape[-1]).unsqueeze(1).to(x.dtype)
        x = F.gelu(enc.conv2(x))
        x_len = (x_len - 1) // 2 + 1
        valid = _lengths_mask(x_len, x.shape[-1])
        x = x.permute(0, 2, 1)
        T = x.shape[1]
        bias = ((1.0 - valid.to(x.dtype)) * -1.0e10)[:, None, None, :]
        valid_f = valid.unsqueeze(-1).to(x.dtype)
        cos, sin = self.rope_cos[:T].to(x.dtype), self.rope_sin[:T].to(x.dtype)
        for block in enc.blocks:
            x = block(x, bias, valid_f, cos, sin)
        return x, x_len

    def quantize(self, hidden: torch.Tensor) -> torch.Tensor:
        """FSQ codes (B, T') int64 in [0, 3**fsq_dims) of encoder states (B, T', n_state)."""
        h = self.quantizer._codebook.project_down(hidden).float().tanh() * 0.9990000128746033
        h = h.round() + 1
        powers = torch.pow(3.0, torch.arange(h.shape[-1], device=h.device, dtype=h.dtype))
        return (h * powers).sum(dim=-1).long()

    def forward(self, mels: torch.Tensor, mel_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens of a padded batch of log-mels (B, n_mels, T) with lengths (B,) -> (codes (B, T'), lens (B,)).
        Codes past a row's length are padding."""
        hidden, lens = self.encode(mels, mel_lens)
        return self.quantize(hidden), lens.long()

    def tokenize(self, wavs: list[torch.Tensor], max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens of 16 kHz clips (each (L,)): per-clip log-mel (optionally cut to max_len tokens), batched.
        Returns (codes (B, T'), lens (B,)); codes past a row's length are padding."""
        mels = []
        for wav in wavs:
            mel = self.log_mel(wav)
            if max_len is not None:
                mel = mel[:, :max_len * 4]   # 4 mel frames per token
            mels.append(mel)
        lens = torch.tensor([m.shape[1] for m in mels], device=mels[0].device)
        batch = mels[0].new_zeros(len(mels), mels[0].shape[0], int(lens.max()))
        for i, m in enumerate(mels):
            batch[i, :, :m.shape[1]] = m
        return self(batch, lens)
