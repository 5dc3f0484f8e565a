"""Voice encoder (VE): a speaker embedding for T3 from 16 kHz speech.

3-layer LSTM over 160-frame partials of a 40-band mel (no log), last hidden state -> Linear -> ReLU ->
L2-normalise; the partial embeddings are averaged and L2-normalised again. Keys = `ve.safetensors`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import audio


@dataclass
class VoiceEncoderConfig:
    num_mels: int = 40
    hidden_size: int = 256
    embed_size: int = 256
    num_layers: int = 3
    sample_rate: int = 16_000
    n_fft: int = 400
    hop: int = 160
    fmax: float = 8000.0
    partial_frames: int = 160
    rate: float = 1.3            # partials per second: step = round(sample_rate / rate / partial_frames) frames
    min_coverage: float = 0.8    # a last partial is kept when at least this fraction of it is real frames
    trim_top_db: float = 20.0

    @classmethod
    def tiny(cls) -> "VoiceEncoderConfig":
        return cls(num_mels=40, hidden_size=32, embed_size=32, num_layers=2)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], overrides: dict | None = None) -> "VoiceEncoderConfig":
        hidden = sd["lstm.weight_hh_l0"].shape[1]
        cfg = dict(num_mels=sd["lstm.weight_ih_l0"].shape[1], hidden_size=hidden, embed_size=sd["proj.weight"].shape[0],
                   num_layers=sum(1 for k in sd if k.startswith("lstm.weight_ih_l")))
        known = {f.name for f in fields(cls)}
        cfg.update({k: v for k, v in (overrides or {}).items() if k in known and k not in cfg})
        return cls(**cfg)

    @property
    def frame_step(self) -> int:
        return int(np.round((self.sample_rate / self.rate) / self.partial_frames))


class VoiceEncoder(nn.Module):
    def __init__(self, config: VoiceEncoderConfig):
        super().__init__()
        self.config = config
        self.lstm = nn.LSTM(config.num_mels, config.hidden_size, num_layers=config.num_layers, batch_first=True)
        self.proj = nn.Linear(config.hidden_size, config.embed_size)
        # Only used in training (cosine-similarity scaling), but part of the checkpoint.
        self.similarity_weight = nn.Parameter(torch.tensor([10.0]))
        self.similarity_bias = nn.Parameter(torch.tensor([-5.0]))

    def forward(self, partials: torch.Tensor) -> torch.Tensor:
        """(B, partial_frames, num_mels) mels -> (B, embed_size) L2-normalised embeddings."""
        _, (hidden, _) = self.lstm(partials)
        emb = F.relu(self.proj(hidden[-1]))
        return emb / torch.linalg.norm(emb, dim=1, keepdim=True)

    def partial_windows(self, n_frames: int) -> tuple[int, int]:
        """(number of partials, frames needed) for an utterance of n_frames mel frames."""
        win, step = self.config.partial_frames, self.config.frame_step
        n_wins, remainder = divmod(max(n_frames - win + step, 0), step)
        if n_wins == 0 or (remainder + (win - step)) / win >= self.config.min_coverage:
            n_wins += 1
        return n_wins, win + step * (n_wins - 1)

    def embed_mels(self, mels: list[torch.Tensor], max_batch: int = 32) -> torch.Tensor:
        """Utterance embeddings (B, embed_size) of B mels (T_i, num_mels): partials (zero-padded at the end when
        the last one is short), embedded, averaged per utterance, L2-normalised."""
        device = self.proj.weight.device
        step, win = self.config.frame_step, self.config.partial_frames
        partials, counts = [], []
        for mel in mels:
            if mel.shape[0] == 0:
                raise ValueError("empty mel: the voice encoder needs audio")
            n, target = self.partial_windows(mel.shape[0])
            mel = mel.to(device=device, dtype=torch.float32)
            if target > mel.shape[0]:
                mel = torch.cat([mel, mel.new_zeros(target - mel.shape[0], mel.shape[1])])
            partials.extend(mel[i * step:i * step + win] for i in range(n))
            counts.append(n)
        stacked = torch.stack(partials)
        n_chunks = int(np.ceil(len(stacked) / max_batch))
        embeds = torch.cat([self(chunk) for chunk in stacked.chunk(n_chunks)])
        out = torch.stack([e.mean(dim=0) for e in embeds.split(counts)])
        return out / torch.linalg.norm(out, dim=1, keepdim=True)

    def embed_wav(self, wav: np.ndarray) -> torch.Tensor:
        """(1, embed_size) speaker embedding of one clip at config.sample_rate: silence trimmed (top_db), mel,
        partials."""
        c = self.config
        trimmed = audio.trim_silence(np.asarray(wav, dtype=np.float32), top_db=c.trim_top_db)
        if trimmed.shape[0] <= c.n_fft // 2:
            raise ValueError("the reference audio is silent or too short for the voice encoder")
        mel = audio.voice_encoder_mel(trimmed, sr=c.sample_rate, n_fft=c.n_fft, hop=c.hop, n_mels=c.num_mels,
                                      fmax=c.fmax)
        return self.embed_mels([torch.from_numpy(mel)])
