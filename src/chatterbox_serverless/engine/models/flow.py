"""S3Gen's token-to-mel flow: CausalMaskedDiffWithXvec (CosyVoice 2) with its conditional flow-matching solver.

speech tokens [prompt | new] -> input_embedding (masked) -> UpsampleConformerEncoder (x2 frames) -> encoder_proj
= mu (80 per frame); x-vector -> L2-normalise -> spk_embed_affine_layer = spks (80); cond = the prompt mel in
the prompt frames, zeros after. Then the solver (`FlowConfig.solver`, the variant's choice):
  "cfg-cosine" (the original): 10 Euler steps from noise on the cosine schedule t = 1 - cos(pi/2 s), each calling
      the estimator once on the conditional rows and the unconditional rows (mu = spks = cond = 0) together:
      v = 1.7 v_cond - 0.7 v_uncond;
  "meanflow" (Turbo, a distilled estimator): 2 Euler steps on a linear schedule, t = 0 -> 0.5 -> 1, the estimator
      called once per step on the conditional rows only, with the step's start and end times (t, r).
The caller keeps the frames after the prompt.

Everything is batched over requests of different lengths and voices (right padding + masks).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generator, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .flow_decoder import ConditionalDecoder, FlowDecoderConfig
from .flow_encoder import FlowEncoderConfig, UpsampleConformerEncoder

R = TypeVar("R")


@dataclass
class FlowConfig:
    vocab_size: int = 6561
    input_size: int = 512          # token embedding width (= encoder input)
    output_size: int = 80          # mel bins
    spk_embed_dim: int = 192
    token_mel_ratio: int = 2
    n_timesteps: int = 10
    inference_cfg_rate: float = 0.7
    solver: str = "cfg-cosine"     # or "meanflow"
    encoder: FlowEncoderConfig = field(default_factory=FlowEncoderConfig)
    decoder: FlowDecoderConfig = field(default_factory=FlowDecoderConfig)

    @classmethod
    def tiny(cls) -> "FlowConfig":
        enc, dec = FlowEncoderConfig.tiny(), FlowDecoderConfig.tiny()
        return cls(vocab_size=6561, input_size=enc.input_size, output_size=dec.out_channels, spk_embed_dim=16,
                   encoder=enc, decoder=dec)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], overrides: dict | None = None) -> "FlowConfig":
        """`sd` holds the flow's keys without the `flow.` prefix. `overrides` may hold top-level fields and
        `encoder` / `decoder` dicts."""
        overrides = dict(overrides or {})
        def part(config_cls, prefix: str, section: str):
            try:
                return config_cls.from_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)},
                                                  overrides.pop(section, None))
            except KeyError as e:     # name the absent tensor with its full key
                raise KeyError(prefix + e.args[0]) from None

        vocab, width = sd["input_embedding.weight"].shape
        out, spk = sd["spk_embed_affine_layer.weight"].shape
        values = dict(vocab_size=vocab, input_size=width, output_size=out, spk_embed_dim=spk,
                      encoder=part(FlowEncoderConfig, "encoder.", "encoder"),
                      decoder=part(FlowDecoderConfig, "decoder.estimator.", "decoder"))
        values.update({k: v for k, v in overrides.items() if k in cls.__dataclass_fields__})
        return cls(**values)


SOLVERS = ("cfg-cosine", "meanflow")


class CausalConditionalCFM(nn.Module):
    """Holds the estimator (key prefix `decoder.estimator.`) and runs the Euler solver of `config.solver`."""

    def __init__(self, config: FlowConfig):
        super().__init__()
        if config.solver not in SOLVERS:
            raise ValueError(f"flow solver {config.solver!r}: one of {', '.join(SOLVERS)}")
        if (config.solver == "meanflow") != config.decoder.meanflow:
            raise ValueError("the meanflow solver needs the meanflow estimator, and only it")
        self.config = config
        self.estimator = ConditionalDecoder(config.decoder)

    def draw_noise(self, prompt_frames: int, new_frames: int, generator: torch.Generator | None,
                   device: torch.device) -> torch.Tensor:
        """The solver's initial x (80, prompt_frames + new_frames), drawn as the official code draws it: one
        randn over all frames (CFM), except for meanflow, where S3Gen.flow_inference first draws the new frames'
        noise itself, then the CFM draws over all frames and the first draw replaces the new frames."""
        n = self.config.output_size
        dev = generator.device if generator is not None else device
        if self.config.solver != "meanflow":
            return torch.randn((1, n, prompt_frames + new_frames), generator=generator, device=dev)[0]
        new = torch.randn((1, n, new_frames), generator=generator, device=dev)[0]
        z = torch.randn((1, n, prompt_frames + new_frames), generator=generator, device=dev)[0]
        z[:, prompt_frames:] = new
        return z

    def forward(self, noise: torch.Tensor, mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor,
                cond: torch.Tensor, n_timesteps: int | None = None) -> torch.Tensor:
        """noise, mu, cond (B, 80, T); mask (B, 1, T) 0/1; spks (B, 80). Returns the sample (B, 80, T)."""
        return run_steps(self.steps(noise, mu, mask, spks, cond, n_timesteps))

    def steps(self, noise: torch.Tensor, mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor,
              cond: torch.Tensor, n_timesteps: int | None = None) -> Generator[None, None, torch.Tensor]:
        """`forward` as a generator that pauses after each Euler step (one estimator call) and returns the
        sample: a caller may interleave other work between the steps (the engine core) and gets the same
        result, the same operations running in the same order."""
        n = n_timesteps or self.config.n_timesteps
        if self.config.solver == "meanflow":
            return (yield from self._meanflow(noise, mu, mask, spks, cond, n))
        cfg = self.config.inference_cfg_rate
        B, T = mu.size(0), mu.size(2)
        t_span = torch.linspace(0, 1, n + 1, device=mu.device, dtype=mu.dtype)
        t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)
        t_embs = self.estimator.time_embedding(t_span[:-1]).unsqueeze(1)       # (n, 1, time_embed_dim)
        # conditional rows then unconditional rows (mu = spks = cond = 0), one estimator call per step
        static = torch.cat([mu, spks[:, :, None].expand(B, spks.size(1), T), cond], dim=1)
        static = torch.cat([static, torch.zeros_like(static)], dim=0)
        mask2 = torch.cat([mask, mask], dim=0)
        key_mask = self.estimator.key_mask(mask2)
        x = noise
        for i in range(n):
            inp = torch.cat([torch.cat([x, x], dim=0), static], dim=1)
            v = self.estimator(inp, mask2, t_embs[i], key_mask)
            v = (1.0 + cfg) * v[:B] - cfg * v[B:]
            x = x + (t_span[i + 1:i + 2] - t_span[i:i + 1]) * v
            if i + 1 < n:
                yield
        return x

    def _meanflow(self, noise, mu, mask, spks, cond, n: int) -> torch.Tensor:
        """`basic_euler` of the official CausalConditionalCFM: linear t_span, estimator(x, t, r), no CFG."""
        B, T = mu.size(0), mu.size(2)
        t_span = torch.linspace(0, 1, n + 1, device=mu.device, dtype=mu.dtype)
        t_embs = self.estimator.time_embedding(t_span[:-1], t_span[1:]).unsqueeze(1)   # (n, 1, time_embed_dim)
        static = torch.cat([mu, spks[:, :, None].expand(B, spks.size(1), T), cond], dim=1)
        key_mask = self.estimator.key_mask(mask)
        x = noise
        for i in range(n):
            v = self.estimator(torch.cat([x, static], dim=1), mask, t_embs[i], key_mask)
            x = x + (t_span[i + 1:i + 2] - t_span[i:i + 1]) * v
            if i + 1 < n:
                yield
        return x


class CausalMaskedDiffWithXvec(nn.Module):
    def __init__(self, config: FlowConfig):
        super().__init__()
        c = self.config = config
        self.input_embedding = nn.Embedding(c.vocab_size, c.input_size)
        self.spk_embed_affine_layer = nn.Linear(c.spk_embed_dim, c.output_size)
        self.encoder = UpsampleConformerEncoder(c.encoder)
        self.encoder_proj = nn.Linear(c.encoder.output_size, c.output_size)
        self.decoder = CausalConditionalCFM(c)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor, prompt_feat: torch.Tensor,
                prompt_frames: torch.Tensor, embedding: torch.Tensor, noise: torch.Tensor,
                n_timesteps: int | None = None) -> torch.Tensor:
        """tokens (B, L): each row [prompt tokens | new tokens], right-padded, `lengths` (B,) real lengths;
        prompt_feat (B, Fp, 80) right-padded prompt mels with `prompt_frames` (B,) real frames;
        embedding (B, spk_embed_dim) x-vectors; noise (B, 80, ratio*L) (only each row's first ratio*length
        frames matter). Returns the mel (B, 80, ratio*L), prompt frames included, zeros past each row's end."""
        return run_steps(self.steps(tokens, lengths, prompt_feat, prompt_frames, embedding, noise, n_timesteps))

    def steps(self, tokens: torch.Tensor, lengths: torch.Tensor, prompt_feat: torch.Tensor,
              prompt_frames: torch.Tensor, embedding: torch.Tensor, noise: torch.Tensor,
              n_timesteps: int | None = None) -> Generator[None, None, torch.Tensor]:
        """`forward` as a generator that pauses after the encoder and after each solver step but the last, and
        returns the mel (see CausalConditionalCFM.steps)."""
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise ValueError(f"speech tokens must lie in [0, {self.config.vocab_size}); drop special tokens first")
        dtype = self.input_embedding.weight.dtype
        spks = self.spk_embed_affine_layer(F.normalize(embedding.to(dtype), dim=1))
        ratio = self.config.token_mel_ratio
        T = ratio * tokens.size(1)
        h_lengths = lengths * ratio
        mu = torch.zeros(tokens.size(0), self.config.output_size, T, device=tokens.device, dtype=dtype)
        # The encoder runs once per request, row by row at the row's own length: its attention scores are
        # (heads, T, 2T) per row, too big to batch for long requests, and it costs little next to the solver.
        for b, n in enumerate(lengths.tolist()):
            x = self.input_embedding(tokens[b:b + 1, :n].long())
            h, _ = self.encoder(x, lengths[b:b + 1])
            mu[b, :, :ratio * n] = self.encoder_proj(h)[0].transpose(0, 1)
        frames = torch.arange(T, device=mu.device)[None, :]
        mel_mask = (frames < h_lengths[:, None]).to(dtype)[:, None, :]           # (B, 1, T)
        cond = torch.zeros_like(mu)
        fp = min(prompt_feat.size(1), T)
        prompt_mask = (frames[:, :fp] < prompt_frames[:, None]).to(dtype)[:, None, :]
        cond[:, :, :fp] = prompt_feat[:, :fp].transpose(1, 2).to(dtype) * prompt_mask
        yield
        return (yield from self.decoder.steps(noise[:, :, :T].to(dtype), mu, mel_mask, spks, cond, n_timesteps))


def run_steps(steps: Generator[None, None, R]) -> R:
    """Run a generator of steps (`steps` above) to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
