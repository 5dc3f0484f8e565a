"""S3Gen's token encoder: UpsampleConformerEncoder (CosyVoice 2 / ESPnet conformer, relative positions).

speech-token embeddings (B, T, 512) -> Linear+LayerNorm, x sqrt(d) -> PreLookahead (sees 3 frames ahead)
-> 6 conformer layers -> x2 nearest upsample + causal conv -> Linear+LayerNorm, x sqrt(d) -> 4 conformer layers
-> LayerNorm  = (B, 2T, 512).

Conformer layers here are pre-norm (LayerNorm eps 1e-12) relative-position self-attention + SiLU FFN; the
official model uses neither macaron FFNs nor convolution modules. Attention is bidirectional, masked by padding.
Batching is exact: padded frames are zeroed after the input embedding (the lookahead conv is the only layer
that looks right), every other conv looks left only, and attention never looks at padded keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class FlowEncoderConfig:
    input_size: int = 512
    output_size: int = 512
    attention_heads: int = 8
    linear_units: int = 2048
    num_blocks: int = 6
    num_up_blocks: int = 4
    pre_lookahead_len: int = 3
    upsample_stride: int = 2

    @classmethod
    def tiny(cls) -> "FlowEncoderConfig":
        return cls(input_size=32, output_size=32, attention_heads=2, linear_units=64, num_blocks=1, num_up_blocks=1)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], overrides: dict | None = None) -> "FlowEncoderConfig":
        """`sd` holds the encoder's keys without prefix (`embed.out.0.weight`, ...)."""
        def count(prefix: str) -> int:
            return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})
        out, inp = sd["embed.out.0.weight"].shape
        values = dict(
            input_size=inp, output_size=out,
            attention_heads=sd["encoders.0.self_attn.pos_bias_u"].shape[0],
            linear_units=sd["encoders.0.feed_forward.w_1.weight"].shape[0],
            num_blocks=count("encoders."), num_up_blocks=count("up_encoders."),
            pre_lookahead_len=sd["pre_lookahead_layer.conv1.weight"].shape[-1] - 1,
            upsample_stride=(sd["up_layer.conv.weight"].shape[-1] - 1) // 2,
        )
        values.update({k: v for k, v in (overrides or {}).items() if k in cls.__dataclass_fields__})
        return cls(**values)


def relative_position_encoding(length: int, d_model: int, device, dtype) -> torch.Tensor:
    """ESPnet's relative sinusoidal table (1, 2*length-1, d): row k encodes the relative position length-1-k,
    i.e. positive offsets (key to the left of the query) first, descending, then negative ones."""
    position = torch.arange(0, length, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    positive = torch.zeros(length, d_model)
    negative = torch.zeros(length, d_model)
    positive[:, 0::2] = torch.sin(position * div_term)
    positive[:, 1::2] = torch.cos(position * div_term)
    negative[:, 0::2] = torch.sin(-1 * position * div_term)
    negative[:, 1::2] = torch.cos(-1 * position * div_term)
    table = torch.cat([torch.flip(positive, [0]), negative[1:]], dim=0)
    return table.unsqueeze(0).to(device=device, dtype=dtype)


class LinearEmbed(nn.Module):
    """Linear + LayerNorm, then x sqrt(d) (the positional table is returned separately: it is relative)."""

    def __init__(self, idim: int, odim: int):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5))
        self.xscale = math.sqrt(odim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.out(x) * self.xscale
        return x, relative_position_encoding(x.size(1), x.size(2), x.device, x.dtype)


class RelPositionAttention(nn.Module):
    """Transformer-XL style attention: scores = (q+u)·k + shift((q+v)·W_pos p), / sqrt(d_k)."""

    def __init__(self, n_head: int, n_feat: int):
        super().__init__()
        self.h, self.d_k = n_head, n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_head, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_head, self.d_k))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        """x (B, T, D); key_mask (B, 1, 1, T) bool, True = real frame; pos_emb (1, 2T-1, D)."""
        B, T, _ = x.shape
        q = self.linear_q(x).view(B, T, self.h, self.d_k)
        k = self.linear_k(x).view(B, T, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(B, T, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(1, -1, self.h, self.d_k).transpose(1, 2)   # (1, h, 2T-1, d_k)
        content = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))         # (B, h, T, T)
        position = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))        # (B, h, T, 2T-1)
        # Query i, key j sit at relative position i-j, which is column (T-1) - i + j of the table:
        # a strided view (row stride 2T-2) picks exactly those columns.
        position = position.contiguous()
        s0, s1 = position.stride(0), position.stride(1)
        position = position.as_strided((B, self.h, T, T), (s0, s1, 2 * T - 2, 1), position.storage_offset() + T - 1)
        scores = (content + position) / math.sqrt(self.d_k)
        scores = scores.masked_fill(~key_mask, -float("inf"))
        attn = torch.softmax(scores, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(B, T, self.h * self.d_k)
        return self.linear_out(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.w_2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.self_attn = RelPositionAttention(heads, dim)
        self.feed_forward = FeedForward(dim, hidden)
        self.norm_ff = nn.LayerNorm(dim, eps=1e-12)
        self.norm_mha = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), key_mask, pos_emb)
        return x + self.feed_forward(self.norm_ff(x))


class PreLookaheadLayer(nn.Module):
    """conv over the frame and `lookahead` frames to its right, leaky ReLU, causal conv (k3), residual."""

    def __init__(self, channels: int, lookahead: int):
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=lookahead + 1)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (B, T, C)
        y = F.pad(x.transpose(1, 2), (0, self.lookahead))
        y = F.leaky_relu(self.conv1(y))
        y = self.conv2(F.pad(y, (2, 0)))
        return y.transpose(1, 2) + x


class UpsampleLayer(nn.Module):
    """Nearest-neighbour x stride, then a causal conv (kernel 2*stride+1, left padding 2*stride)."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, channels, 2 * stride + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (B, C, T) -> (B, C, stride*T)
        y = F.interpolate(x, scale_factor=float(self.stride), mode="nearest")
        return self.conv(F.pad(y, (2 * self.stride, 0)))


class UpsampleConformerEncoder(nn.Module):
    def __init__(self, config: FlowEncoderConfig):
        super().__init__()
        c = config
        self.config = c
        self.embed = LinearEmbed(c.input_size, c.output_size)
        self.pre_lookahead_layer = PreLookaheadLayer(c.output_size, c.pre_lookahead_len)
        self.encoders = nn.ModuleList(ConformerLayer(c.output_size, c.attention_heads, c.linear_units)
                                      for _ in range(c.num_blocks))
        self.up_layer = UpsampleLayer(c.output_size, c.upsample_stride)
        self.up_embed = LinearEmbed(c.output_size, c.output_size)
        self.up_encoders = nn.ModuleList(ConformerLayer(c.output_size, c.attention_heads, c.linear_units)
                                         for _ in range(c.num_up_blocks))
        self.after_norm = nn.LayerNorm(c.output_size, eps=1e-5)

    def forward(self, xs: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """xs (B, T, input_size) with padded frames zeroed; lengths (B,). Returns (B, sT, D) and lengths*s."""
        mask = torch.arange(xs.size(1), device=xs.device)[None, :] < lengths[:, None]     # (B, T)
        xs, pos_emb = self.embed(xs)
        xs = xs * mask[:, :, None].to(xs.dtype)    # what the lookahead conv sees beyond the end: zeros, as alone
        xs = self.pre_lookahead_layer(xs)
        key_mask = mask[:, None, None, :]
        for layer in self.encoders:
            xs = layer(xs, key_mask, pos_emb)

        xs = self.up_layer(xs.transpose(1, 2)).transpose(1, 2)
        lengths = lengths * self.config.upsample_stride
        mask = torch.arange(xs.size(1), device=xs.device)[None, :] < lengths[:, None]
        xs, pos_emb = self.up_embed(xs)
        key_mask = mask[:, None, None, :]
        for layer in self.up_encoders:
            xs = layer(xs, key_mask, pos_emb)
        return self.after_norm(xs), lengths
