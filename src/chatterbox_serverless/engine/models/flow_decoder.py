"""S3Gen's flow-matching estimator: ConditionalDecoder (Matcha-TTS / CosyVoice 2 U-Net, causal variant).

input [x, mu, speaker, cond] (B, 320, T) and a time t -> velocity (B, 80, T).
Sinusoidal time embedding (x1000) -> Linear, SiLU, Linear (1024). One down block, N mid blocks, one up block
(skip concatenated), each = causal resnet block (causal conv k3 + LayerNorm over channels + Mish, time
added between its two convs) + transformer blocks (LayerNorm, 8x64 self-attention, LayerNorm, GELU FFN);
the down/up blocks end with a causal conv k3 (no resampling in the official single-level model); final causal
block; 1x1 conv to 80.

The meanflow estimator of Chatterbox Turbo (`s3gen_meanflow.safetensors`, `meanflow=True`) has one more
layer, `time_embed_mixer` (Linear 2*1024 -> 1024, no bias): the start time t and the end time r of a solver step
go through the same sinusoidal embedding and `time_mlp`, are concatenated and mixed into one time embedding
(IntMeanFlow); everything else is the same network.

Batching is exact: convs only look left, masked inputs are zeroed before every conv, attention ignores padded
keys (as the official additive -1e10 bias does).

Attention runs through one of two exact kernels, `ConditionalDecoder.attention`: "sdpa" (PyTorch's fused
scaled_dot_product_attention, the default) or "sliced" (`sliced_attention`: plain matmul / softmax / matmul over
a few (row, head) slices at a time, whose scores stay in cache). On an AMD Zen 4 (AVX512-BF16, no AMX) SDPA's
bfloat16 kernel is exp-bound and the sliced form ~1.8x faster; other CPUs may differ, so `pick_attention`
measures which is faster where the model runs.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class FlowDecoderConfig:
    in_channels: int = 320          # x (80) + mu (80) + speaker (80) + cond (80)
    out_channels: int = 80
    channels: int = 256
    attention_head_dim: int = 64
    num_heads: int = 8
    n_blocks: int = 4               # transformer blocks per U-Net block
    num_mid_blocks: int = 12
    time_embed_dim: int = 1024      # 4 * channels
    meanflow: bool = False          # time_embed_mixer: the (t, r) time embedding of Turbo's meanflow estimator

    @classmethod
    def tiny(cls) -> "FlowDecoderConfig":
        # 80 mel bins kept: the prompt mels come from the real front-end
        return cls(channels=32, attention_head_dim=16, num_heads=2, n_blocks=1, num_mid_blocks=1, time_embed_dim=64)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], overrides: dict | None = None) -> "FlowDecoderConfig":
        """`sd` holds the estimator's keys without prefix (`time_mlp.linear_1.weight`, ...)."""
        overrides = overrides or {}
        if any(k.startswith("down_blocks.1.") for k in sd):
            raise ValueError("flow decoder: only the single-level U-Net of the official model is supported")
        time_embed_dim, in_channels = sd["time_mlp.linear_1.weight"].shape
        inner = sd["down_blocks.0.1.0.attn1.to_q.weight"].shape[0]
        heads = int(overrides.get("num_heads", cls.num_heads))
        if inner % heads:
            raise ValueError(f"flow decoder: attention width {inner} is not divisible by num_heads={heads}")
        return cls(
            in_channels=in_channels, out_channels=sd["final_proj.weight"].shape[0],
            channels=sd["final_proj.weight"].shape[1], attention_head_dim=inner // heads, num_heads=heads,
            n_blocks=len({k.split(".")[3] for k in sd if k.startswith("down_blocks.0.1.")}),
            num_mid_blocks=len({k.split(".")[1] for k in sd if k.startswith("mid_blocks.")}),
            time_embed_dim=time_embed_dim, meanflow=bool(overrides.get("meanflow", cls.meanflow)),
        )


def sinusoidal_time_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """(N,) -> (N, dim): [sin(scale t f_k), cos(scale t f_k)], f_k = 10000^(-k/(dim/2-1))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    args = scale * t.unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat((args.sin(), args.cos()), dim=-1)


class TimestepMLP(nn.Module):
    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class CausalConv1d(nn.Conv1d):
    """Conv1d padded on the left only (kernel-1 frames): frame t sees frames <= t."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, T) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class CausalBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        # indices 1 and 3 of the official Sequential are parameterless transposes
        self.block = nn.Sequential(CausalConv1d(dim, dim_out, 3), nn.Identity(), ChannelLayerNorm(dim_out),
                                   nn.Identity(), nn.Mish())

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.block(x * mask) * mask


class CausalResnetBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_emb_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = CausalBlock1D(dim, dim_out)
        self.block2 = CausalBlock1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x, mask)
        h = h + self.mlp(time_emb).unsqueeze(-1)
        h = self.block2(h, mask)
        return h + self.res_conv(x * mask)


def sliced_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                     slice_bytes: int = 4 << 20) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for q, k, v (B, H, T, D), key_mask (B, 1, 1, T) bool or None (True = real
    frame), computed over groups of (row, head) slices whose scores fit in `slice_bytes` (cache-resident, and
    memory bounded for long inputs). Scores are in the input dtype; torch's softmax accumulates in float32."""
    B, H, T, D = q.shape
    qs, vs = q.reshape(B * H, T, D), v.reshape(B * H, T, D)
    ks = k.reshape(B * H, T, D).transpose(1, 2)
    bias = torch.zeros(B, 1, T, dtype=q.dtype, device=q.device)
    if key_mask is not None:
        bias.masked_fill_(~key_mask.reshape(B, 1, T), -float("inf"))
    bias = bias.expand(B, H, T).reshape(B * H, 1, T)
    out = torch.empty_like(qs)
    n = max(1, slice_bytes // (T * T * q.element_size()))
    for i in range(0, B * H, n):
        scores = torch.baddbmm(bias[i:i + n], qs[i:i + n], ks[i:i + n], alpha=D ** -0.5)
        torch.bmm(torch.softmax(scores, dim=-1), vs[i:i + n], out=out[i:i + n])
    return out.view(B, H, T, D)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.sliced = False             # set by ConditionalDecoder.attention
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.to_q(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.to_k(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        v = self.to_v(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        if self.sliced:
            out = sliced_attention(q, k, v, key_mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self.to_out[0](out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


class GELUProjection(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # index 1 of the official ModuleList is a dropout
        self.net = nn.ModuleList([GELUProjection(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = SelfAttention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), key_mask)
        return x + self.ff(self.norm3(x))


def _transformer_stack(c: FlowDecoderConfig) -> nn.ModuleList:
    return nn.ModuleList(TransformerBlock(c.channels, c.num_heads, c.attention_head_dim) for _ in range(c.n_blocks))


class ConditionalDecoder(nn.Module):
    def __init__(self, config: FlowDecoderConfig):
        super().__init__()
        c = self.config = config
        self.time_mlp = TimestepMLP(c.in_channels, c.time_embed_dim)
        self.down_blocks = nn.ModuleList([nn.ModuleList([
            CausalResnetBlock1D(c.in_channels, c.channels, c.time_embed_dim), _transformer_stack(c),
            CausalConv1d(c.channels, c.channels, 3)])])
        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([CausalResnetBlock1D(c.channels, c.channels, c.time_embed_dim), _transformer_stack(c)])
            for _ in range(c.num_mid_blocks))
        self.up_blocks = nn.ModuleList([nn.ModuleList([
            CausalResnetBlock1D(2 * c.channels, c.channels, c.time_embed_dim), _transformer_stack(c),
            CausalConv1d(c.channels, c.channels, 3)])])
        self.final_block = CausalBlock1D(c.channels, c.channels)
        self.final_proj = nn.Conv1d(c.channels, c.out_channels, 1)
        if c.meanflow:
            self.time_embed_mixer = nn.Linear(2 * c.time_embed_dim, c.time_embed_dim, bias=False)

    @property
    def attention(self) -> str:
        """The attention kernel: "sdpa" or "sliced" (see the module's docstring)."""
        return "sliced" if any(m.sliced for m in self.modules() if isinstance(m, SelfAttention)) else "sdpa"

    @attention.setter
    def attention(self, kind: str) -> None:
        if kind not in ("sdpa", "sliced"):
            raise ValueError(f"flow attention must be 'sdpa' or 'sliced', not {kind!r}")
        for m in self.modules():
            if isinstance(m, SelfAttention):
                m.sliced = kind == "sliced"

    def time_embedding(self, t: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) times in [0, 1] -> (N, time_embed_dim). A meanflow estimator takes the end times `r` (N,) too:
        mixer([mlp(emb(t)), mlp(emb(r))])."""
        emb = self.time_mlp(sinusoidal_time_embedding(t, self.config.in_channels).to(t.dtype))
        if not self.config.meanflow:
            return emb
        if r is None:
            raise ValueError("a meanflow estimator needs the end time r of the step")
        end = self.time_mlp(sinusoidal_time_embedding(r, self.config.in_channels).to(r.dtype))
        return self.time_embed_mixer(torch.cat([emb, end], dim=1))

    @staticmethod
    def key_mask(mask: torch.Tensor) -> torch.Tensor | None:
        """The attention key mask (B, 1, 1, T) for a frame mask (B, 1, T); None when no row is padded."""
        return None if bool(mask.all()) else mask.bool()[:, :, None, :]

    def forward(self, x: torch.Tensor, mask: torch.Tensor, t_emb: torch.Tensor,
                key_mask: torch.Tensor | None | str = "auto") -> torch.Tensor:
        """x (B, in_channels, T) already concatenated [x, mu, spks, cond]; mask (B, 1, T) float of 0/1;
        t_emb (1 or B, time_embed_dim) from `time_embedding`; key_mask from `key_mask(mask)` (computed when
        not given). Returns (B, out_channels, T)."""
        if isinstance(key_mask, str):
            key_mask = self.key_mask(mask)

        def transformers(h: torch.Tensor, blocks: nn.ModuleList) -> torch.Tensor:
            h = h.transpose(1, 2)
            for block in blocks:
                h = block(h, key_mask)
            return h.transpose(1, 2)

        resnet, blocks, conv = self.down_blocks[0]
        x = transformers(resnet(x, mask, t_emb), blocks)
        skip = x
        x = conv(x * mask)
        for resnet, blocks in self.mid_blocks:
            x = transformers(resnet(x, mask, t_emb), blocks)
        resnet, blocks, conv = self.up_blocks[0]
        x = torch.cat([x, skip], dim=1)
        x = transformers(resnet(x, mask, t_emb), blocks)
        x = conv(x * mask)
        x = self.final_block(x, mask)
        return self.final_proj(x * mask) * mask


def pick_attention(heads: int, head_dim: int, device: torch.device | str, dtype: torch.dtype,
                   frames: int = 500, rows: int = 2, tries: int = 3) -> str:
    """The faster attention kernel for the estimator on this device and dtype, measured on a typical shape
    (one request with CFG: 2 rows of ~500 frames, prompt included): "sliced" only on a CPU where it is at
    least 10% faster than SDPA (as in bfloat16 on an AMD Zen 4); float32 (exact parity) and CUDA keep "sdpa"."""
    device = torch.device(device)
    if device.type != "cpu" or dtype == torch.float32:
        return "sdpa"
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(rows, heads, frames, head_dim, generator=g, device=device).to(dtype) for _ in range(3))

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(tries):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    with torch.inference_mode():
        sdpa = best(lambda: F.scaled_dot_product_attention(q, k, v))
        sliced = best(lambda: sliced_attention(q, k, v, None))
    return "sliced" if sliced < 0.9 * sdpa else "sdpa"
