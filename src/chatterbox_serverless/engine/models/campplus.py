"""CAM++ speaker encoder: the 192-d x-vector that conditions S3Gen.

Kaldi fbank (80 bins, mean-normalised per utterance) -> FCM 2-D residual head -> TDNN -> three densely
connected blocks of context-aware-masking TDNN layers with transitions -> BN/ReLU -> mean + std pooling ->
dense 1x1 conv -> BatchNorm without affine. All BatchNorms use their running statistics (inference only).
Keys = the `speaker_encoder.*` part of `s3gen.safetensors` without the prefix.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .. import audio


@dataclass
class CAMPPlusConfig:
    feat_dim: int = 80
    embedding_size: int = 192
    growth_rate: int = 32
    bn_size: int = 4
    init_channels: int = 128
    m_channels: int = 32
    head_blocks: int = 2                      # residual blocks in each of the FCM head's two layers
    block_layers: tuple[int, ...] = (12, 24, 16)
    block_dilations: tuple[int, ...] = (1, 2, 2)
    kernel_size: int = 3
    seg_len: int = 100                        # CAM segment pooling length (frames)
    sample_rate: int = 16_000

    @classmethod
    def tiny(cls) -> "CAMPPlusConfig":
        return cls(feat_dim=80, embedding_size=24, growth_rate=8, bn_size=2, init_channels=16, m_channels=4,
                   head_blocks=1, block_layers=(2, 2, 1), block_dilations=(1, 2, 2))

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], overrides: dict | None = None) -> "CAMPPlusConfig":
        m = sd["head.conv1.weight"].shape[0]
        tdnn = sd["xvector.tdnn.linear.weight"]
        n_blocks = len({k.split(".")[1] for k in sd if k.startswith("xvector.block")})
        layers = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"xvector.block{i + 1}.")})
                       for i in range(n_blocks))
        first = sd["xvector.block1.tdnnd1.cam_layer.linear_local.weight"]
        cfg = dict(feat_dim=tdnn.shape[1] // m * 8, embedding_size=sd["xvector.dense.linear.weight"].shape[0],
                   growth_rate=first.shape[0], bn_size=first.shape[1] // first.shape[0],
                   init_channels=tdnn.shape[0], m_channels=m, kernel_size=first.shape[-1],
                   head_blocks=len({k.split(".")[2] for k in sd if k.startswith("head.layer1.")}),
                   block_layers=layers)
        known = {f.name for f in fields(cls)}
        extra = {k: (tuple(v) if isinstance(v, list) else v) for k, v in (overrides or {}).items()
                 if k in known and k not in cfg}
        cfg.update(extra)
        if "block_dilations" not in extra:
            cfg["block_dilations"] = (1, 2, 2, 2, 2, 2, 2, 2)[:n_blocks]
        return cls(**cfg)


def bn(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm with running statistics, whatever the module's train/eval mode."""
    return F.batch_norm(x, module.running_mean, module.running_var, module.weight, module.bias, False, 0.0,
                        module.eps)


class BasicResBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=(stride, 1), bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(bn(self.bn1, self.conv1(x)))
        out = bn(self.bn2, self.conv2(out))
        short = bn(self.shortcut[1], self.shortcut[0](x)) if len(self.shortcut) else x
        return F.relu(out + short)


class FCM(nn.Module):
    def __init__(self, config: CAMPPlusConfig):
        super().__init__()
        m = config.m_channels
        self.conv1 = nn.Conv2d(1, m, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(m)
        self.layer1 = nn.Sequential(*(BasicResBlock(m, m, 2 if i == 0 else 1) for i in range(config.head_blocks)))
        self.layer2 = nn.Sequential(*(BasicResBlock(m, m, 2 if i == 0 else 1) for i in range(config.head_blocks)))
        self.conv2 = nn.Conv2d(m, m, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(m)
        self.out_channels = m * (config.feat_dim // 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F, T) -> (B, m * F/8, T)"""
        out = F.relu(bn(self.bn1, self.conv1(x.unsqueeze(1))))
        out = self.layer2(self.layer1(out))
        out = F.relu(bn(self.bn2, self.conv2(out)))
        return out.reshape(out.shape[0], out.shape[1] * out.shape[2], out.shape[3])


class BNReLU(nn.Module):
    """The official `nonlinear` Sequential: a BatchNorm1d named `batchnorm`, then ReLU (unless affine=False,
    which is the final embedding's plain BatchNorm)."""
    def __init__(self, channels: int, relu: bool = True):
        super().__init__()
        self.batchnorm = nn.BatchNorm1d(channels, affine=relu)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = bn(self.batchnorm, x)
        return F.relu(x) if self.relu else x


class TDNNLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__()
        self.linear = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride,
                                padding=(kernel_size - 1) // 2, bias=False)
        self.nonlinear = BNReLU(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x))


class CAMLayer(nn.Module):
    def __init__(self, bn_channels: int, out_channels: int, kernel_size: int, dilation: int, seg_len: int):
        super().__init__()
        self.linear_local = nn.Conv1d(bn_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2 * dilation,
                                      dilation=dilation, bias=False)
        self.linear1 = nn.Conv1d(bn_channels, bn_channels // 2, 1)
        self.linear2 = nn.Conv1d(bn_channels // 2, out_channels, 1)
        self.seg_len = seg_len

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear_local(x)
        # context = utterance mean + the mean of the segment (seg_len frames) each frame belongs to
        seg = F.avg_pool1d(x, kernel_size=self.seg_len, stride=self.seg_len, ceil_mode=True)
        seg = seg.unsqueeze(-1).expand(*seg.shape, self.seg_len).reshape(*seg.shape[:-1], -1)[..., :x.shape[-1]]
        context = F.relu(self.linear1(x.mean(-1, keepdim=True) + seg))
        return y * torch.sigmoid(self.linear2(context))


class CAMDenseTDNNLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, bn_channels: int, kernel_size: int, dilation: int,
                 seg_len: int):
        super().__init__()
        self.nonlinear1 = BNReLU(in_channels)
        self.linear1 = nn.Conv1d(in_channels, bn_channels, 1, bias=False)
        self.nonlinear2 = BNReLU(bn_channels)
        self.cam_layer = CAMLayer(bn_channels, out_channels, kernel_size, dilation, seg_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))


class CAMDenseTDNNBlock(nn.Module):
    def __init__(self, num_layers: int, in_channels: int, config: CAMPPlusConfig, dilation: int):
        super().__init__()
        g = config.growth_rate
        for i in range(num_layers):
            self.add_module(f"tdnnd{i + 1}", CAMDenseTDNNLayer(in_channels + i * g, g, config.bn_size * g,
                                                               config.kernel_size, dilation, config.seg_len))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.children():
            x = torch.cat([x, layer(x)], dim=1)
        return x


class TransitLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.nonlinear = BNReLU(in_channels)
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.nonlinear(x))


class DenseLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)
        self.nonlinear = BNReLU(out_channels, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x.unsqueeze(-1)).squeeze(-1))


class XVector(nn.Module):
    def __init__(self, config: CAMPPlusConfig, in_channels: int):
        super().__init__()
        self.tdnn = TDNNLayer(in_channels, config.init_channels, 5, stride=2)
        channels = config.init_channels
        for i, (n_layers, dilation) in enumerate(zip(config.block_layers, config.block_dilations)):
            self.add_module(f"block{i + 1}", CAMDenseTDNNBlock(n_layers, channels, config, dilation))
            channels += n_layers * config.growth_rate
            self.add_module(f"transit{i + 1}", TransitLayer(channels, channels // 2))
            channels //= 2
        self.out_nonlinear = BNReLU(channels)
        self.dense = DenseLayer(channels * 2, config.embedding_size)
        self.n_blocks = len(config.block_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tdnn(x)
        for i in range(self.n_blocks):
            x = getattr(self, f"transit{i + 1}")(getattr(self, f"block{i + 1}")(x))
        x = self.out_nonlinear(x)
        stats = torch.cat([x.mean(dim=-1), x.std(dim=-1, unbiased=True)], dim=-1)
        return self.dense(stats)


class CAMPPlus(nn.Module):
    def __init__(self, config: CAMPPlusConfig):
        super().__init__()
        self.config = config
        self.head = FCM(config)
        self.xvector = XVector(config, self.head.out_channels)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, T, feat_dim) mean-normalised fbank features (same T for all rows) -> (B, embedding_size)."""
        return self.xvector(self.head(feats.permute(0, 2, 1)))

    def features(self, wav: torch.Tensor) -> torch.Tensor:
        """(T, feat_dim) Kaldi fbank of one 16 kHz clip (L,), minus its mean over time."""
        feats = audio.kaldi_fbank(wav.float(), num_mel_bins=self.config.feat_dim,
                                  sample_frequency=float(self.config.sample_rate))
        return feats - feats.mean(dim=0, keepdim=True)

    def embed(self, wav: torch.Tensor) -> torch.Tensor:
        """(1, embedding_size) x-vector of one 16 kHz clip (L,). Clips are embedded one at a time: zero-padding
        a batch would change the pooled statistics."""
        w = self.head.conv1.weight
        return self(self.features(wav.to(w.device))[None].to(w.dtype))
