"""Windowed streaming S3Gen: a chunk's audio in pieces while T3 is still decoding its speech tokens.

S3Gen is not causal: the flow's conformer encoder and its estimator attend over the whole utterance, each token
looks 3 tokens ahead (PreLookaheadLayer) and the vocoder's convolutions look both ways. So audio cannot simply be
made token by token. A `ChunkStreamer` (one per sentence chunk) instead re-decodes a window of the chunk each
time enough new tokens are there:

    flow over  [voice prompt | left context | tokens not yet final]   (the last `lookahead` tokens' frames dropped:
                                                                       they change when the next tokens come)
    vocoder over [a few frames of left context | new mel frames]       (the last `vocoder_margin` frames are not
                                                                       handed out: they change with more mel)
    the window's audio, crossfaded over `crossfade_ms` with the previous window's held tail.

What keeps re-decoded audio stable from window to window:
  * the flow noise is drawn once per chunk (the chunk's seed generator, enough frames for `max_tokens`) and
    sliced by position, so a frame sees the same noise in every window that decodes it;
  * the vocoder's excitation (harmonic sines + noise, HiFT's SourceModuleHnNSF) is carried: the excitation of
    the samples already handed out is cached and reused, new samples continue each harmonic's phase from where
    the cache ends, and the excitation noise is drawn in fixed-size blocks by sample position;
  * the official fade-in (`speech_to_wav.trim_fade`) applies to the chunk's first samples only.
The last window (`final=True`) decodes everything left, including the held-back lookahead and the variant's
suffix tokens (Turbo: 3 silence tokens), with the flow's end-of-utterance padding, as the non-streamed path does.

The caller (the engine core's scheduler) feeds each chunk's tokens as T3 produces them:

    s = ChunkStreamer(s3gen, conds, seed=chunk_seed, suffix=variant.flow_suffix_tokens, max_tokens=t3_cap)
    every step:  if s.ready(len(tokens)): piece = s.advance(tokens)         # tokens: ALL of the chunk's so far
    at the end:  piece = s.advance(tokens, final=True)                     # always call it once, even with 0 tokens
    batched:     pieces = advance_many([s1, s2, ...], [tokens1, ...], [final1, ...])   (one flow call per group)

`tokens` are valid speech tokens (< 6561; drop T3's special tokens first), the chunk's whole prefix each time
(it must only grow). A piece is float32 numpy at 24 kHz, possibly empty (advance when no window is due); the
pieces concatenated are the chunk's audio, what the engine stores. A chunk with fewer tokens than
`plan.first + plan.lookahead` comes out in one final piece, which is then exactly the non-streamed audio under
the streamer's draws. Every non-final piece is longer than the crossfade. A streamer whose `advance` raised
(e.g. an out-of-range token) is left mid-window: drop it (fail the request).

The streamed audio is not the non-streamed (`pipeline._s3gen`) audio of the same tokens and seed: the
non-streamed path draws its noise for the exact utterance length, in the official order (parity), which a
streamer cannot know in advance. Its faithful reference is the same chunk decoded in one window:
`ChunkStreamer(same args).advance(all_tokens, final=True)` (= tokens_to_mel(noises=...) + mel_to_wav(sources=...)
over all tokens with the streamer's noise and excitation). Measured against that reference with DEFAULT_PLAN
on full-size random weights of the original model (/tmp/refs/a: its 34 valid T3 tokens, and the same repeated
to 102, 200-token / 400-frame voice prompt, CPU float32, one run each):

                                   34 tokens (2 windows)    102 tokens (4 windows)
    mean |log-mel difference|      0.0086                   0.027      (two noise draws of the same tokens: 0.25)
    max |sample difference|        1.7e-3                   3.6e-3     (audio RMS 0.019)
    RMS of the difference          2.2e-4 (1.2 % of RMS)    4.5e-4 (2.4 %)
    largest step |x[i+1]-x[i]|     0.058 at joins           0.057 at joins
                                   0.079 elsewhere          0.083 elsewhere
    S3Gen seconds, streamed        29.8 (one window: 10.3)  48.1 (one window: 15.6)

The difference is not concentrated at the joins (largest there 2.4e-3 of the 3.6e-3) and the joins are no
rougher than the audio itself; it is the windows' flow output, each window decoded without the tokens that
follow it (10 instead of 30 tokens of left context moved the 102-token log-mel distance only from 0.027 to 0.032).
On the tiny checkpoints tests/unit/engine/test_s3gen_stream.py asserts a bound
(relative RMS 2 %, max 5e-3, log-mel 0.05) and that the streamed audio moves > 10x further without the fixed
noise or without the carried excitation.

The price of streaming is the re-decoded flow: every window runs the flow over the whole voice prompt (up to
250 tokens) + `context` + the new tokens, and the prompt dominates on CPU (a window of 15 new tokens cost 9.2 s,
the one-window decode of all 34 tokens 10.3 s). So a streamed chunk costs about (number of windows) x (one flow
call over prompt + ~context + every) against one call over prompt + all its tokens: 2.9x for 34 tokens, 3.1x for
102 on CPU (timings on 2 shared cores, noisy). The vocoder is a few percent of it. Turbo's 2-step flow makes a
window ~10x cheaper. Defaults: `first` 12 tokens (0.48 s of speech; the first window is due at 15 tokens with the
lookahead), `every` 30 (fewer windows: each costs a prompt-dominated flow call), `context` 30 (cheap next to the
prompt; the log-mel distance above), `vocoder_context` 12 / `vocoder_margin` 4 frames (the vocoder's receptive
field is ~±13 frames; at these values the joins show no error above the rest), crossfade 12 ms.
A non-streamed request never creates a streamer: its audio and cost are untouched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .models.s3gen import S3Gen
from .speech_to_wav import SpeechItem, tokens_to_mel, trim_fade


@dataclass(frozen=True)
class WindowPlan:
    """How a chunk is cut into windows (tokens: speech tokens, 25 per second; frames: mel frames, 50 per second).

    first:           tokens past the lookahead before the first window (small: fast first audio)
    every:           tokens past the lookahead between later windows (larger: less re-computation)
    context:         tokens of left context the flow re-decodes before the frames it vocodes (bounded cost)
    lookahead:       tokens whose frames are held back until the next window (the flow's PreLookahead: 3)
    vocoder_context: mel frames re-vocoded left of the first sample a window hands out
    vocoder_margin:  mel frames at the right end of a window's vocoded range that are not handed out yet
    crossfade_ms:    overlap of two windows' audio, faded with a raised cosine (coherent signals: gains sum to 1)
    """
    first: int = 12
    every: int = 30
    context: int = 30
    lookahead: int = 3
    vocoder_context: int = 12
    vocoder_margin: int = 4
    crossfade_ms: float = 12.0

    def __post_init__(self) -> None:
        for name in ("first", "every", "context", "lookahead", "vocoder_context", "vocoder_margin"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"WindowPlan.{name} must be a non-negative int, got {value!r}")
        if self.first < 1 or self.every < 1:
            raise ValueError(f"WindowPlan.first and .every must be >= 1 token, got {self.first}, {self.every}")
        if not (0 <= self.crossfade_ms <= 100):
            raise ValueError(f"WindowPlan.crossfade_ms must lie in [0, 100], got {self.crossfade_ms!r}")
        # every non-final piece must be longer than the crossfade: the first window hands out about
        # (2 first - 1 - vocoder_margin) frames of 20 ms minus one crossfade
        if (2 * self.first - 1 - self.vocoder_margin) * 20.0 < 2 * self.crossfade_ms + 20.0:
            raise ValueError(f"WindowPlan.first ({self.first} tokens) too small for vocoder_margin "
                             f"{self.vocoder_margin} and crossfade_ms {self.crossfade_ms}")
        if self.every * 40.0 < 2 * self.crossfade_ms + 20.0:
            raise ValueError(f"WindowPlan.every ({self.every} tokens) too small for crossfade_ms {self.crossfade_ms}")


DEFAULT_PLAN = WindowPlan()

SOURCE_BLOCK = 24000   # samples per block of excitation noise (drawn in order, indexed by position)


class _Excitation:
    """HiFT's harmonic-plus-noise excitation (SourceModuleHnNSF), made to continue across windows: initial
    phases drawn once, each harmonic's phase carried from the end of the cached samples, noise indexed by sample
    position (blocks of SOURCE_BLOCK drawn in order from the chunk's generator), the samples handed out cached."""

    def __init__(self, s3gen: S3Gen, generator: torch.Generator):
        self.hift = s3gen.mel2wav
        c = self.hift.config
        self.H = c.nb_harmonics + 1
        self.generator = generator
        gdev = generator.device
        u = torch.rand((1, self.H, 1), generator=generator, device=gdev, dtype=torch.float32)
        phase = (-np.pi + u * (2 * np.pi)).reshape(self.H).double()
        phase[0] = 0
        self.phase = phase                                   # (H,) initial phases
        self.cycles = torch.zeros(self.H, dtype=torch.float64, device=gdev)   # phase (cycles mod 1) at `end`
        self.cache = torch.zeros(0)                          # source samples [0, end)
        self.blocks: list[torch.Tensor] = []

    @property
    def end(self) -> int:
        return int(self.cache.numel())

    def _noise(self, a: int, b: int) -> torch.Tensor:
        while len(self.blocks) * SOURCE_BLOCK < b:
            self.blocks.append(torch.randn((1, self.H, SOURCE_BLOCK), generator=self.generator,
                                           device=self.generator.device, dtype=torch.float32)[0])
        i, j = a // SOURCE_BLOCK, (b - 1) // SOURCE_BLOCK + 1
        return torch.cat(self.blocks[i:j], dim=1)[:, a - i * SOURCE_BLOCK:b - i * SOURCE_BLOCK]

    def source(self, f0: torch.Tensor, start: int, commit: int) -> torch.Tensor:
        """f0 (T,) Hz of mel frames from sample `start` (start <= end) -> excitation (1, 1, T*480) of those
        samples: the cached ones as they were, the rest continuing the phases; samples up to `commit` are then
        cached (fixed for every later window)."""
        c = self.hift.config
        P = c.samples_per_frame
        stop = start + P * int(f0.numel())
        if start > self.end:
            raise RuntimeError("excitation asked past its cached end")
        fresh = stop - self.end
        out = [self.cache[start:stop].to(f0.device)]
        if fresh > 0:
            up = F.interpolate(f0.reshape(1, 1, -1).float(), scale_factor=float(P), mode="nearest")[0, 0]
            up = up[self.end - start:].to(self.cycles.device)
            harmonics = torch.arange(1, self.H + 1, dtype=torch.float64, device=up.device)[:, None]
            cycles = self.cycles[:, None] + torch.cumsum(up.double()[None] * harmonics / c.sampling_rate, dim=1)
            theta = 2 * np.pi * torch.remainder(cycles, 1.0)
            sines = c.nsf_alpha * torch.sin(theta + self.phase[:, None])
            uv = (up > c.nsf_voiced_threshold).double()[None]
            amp = uv * c.nsf_sigma + (1 - uv) * c.nsf_alpha / 3
            harm = (sines * uv + amp * self._noise(self.end, stop).double()).float()      # (H, fresh)
            m = self.hift.m_source.l_linear
            merged = torch.tanh(m(harm.T.to(m.weight.device, m.weight.dtype))).reshape(-1)
            out.append(merged.to(f0.device))
            keep = max(0, min(commit, stop) - self.end)
            if keep:
                self.cycles = torch.remainder(cycles[:, keep - 1], 1.0)
                self.cache = torch.cat([self.cache, merged[:keep].cpu().float()])
        return torch.cat(out).reshape(1, 1, -1)


@dataclass
class _Window:
    """One window's flow input, prepared by `ChunkStreamer._prepare` and finished by `ChunkStreamer._finish`."""
    item: SpeechItem
    noise: torch.Tensor         # (80, F) prompt noise then the window's slice of the chunk noise
    first_frame: int            # audio frame (chunk coordinates) of the mel's first frame
    end_frame: int              # audio frames [vocode_from, end_frame) are vocoded
    vocode_from: int
    final: bool


class ChunkStreamer:
    """One chunk's speech tokens -> its audio in pieces (see the module docstring for the protocol).

    s3gen: the loaded S3Gen (its flow solver is the variant's); conds: the voice (gen_prompt_token,
    gen_prompt_feat, gen_embedding: a VoiceConditionals); seed: the chunk's seed (pipeline.chunk_seed);
    suffix: the variant's flow suffix tokens, appended at the end; max_tokens: the most tokens the chunk can
    have (its T3 cap), which sizes the noise drawn once."""

    def __init__(self, s3gen: S3Gen, conds, seed: int, suffix: Sequence[int] = (), max_tokens: int = 1000,
                 plan: WindowPlan = DEFAULT_PLAN):
        if not isinstance(plan, WindowPlan):
            raise TypeError(f"plan must be a WindowPlan, got {type(plan).__name__}")
        if not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens must be a non-negative int, got {max_tokens!r}")
        self.s3gen, self.plan, self.max_tokens = s3gen, plan, max_tokens
        self.suffix = torch.as_tensor(list(suffix), dtype=torch.long)
        self.prompt_token = conds.gen_prompt_token
        self.prompt_feat = conds.gen_prompt_feat
        self.embedding = conds.gen_embedding
        flow = s3gen.flow
        self.ratio = flow.config.token_mel_ratio
        T = int(self.prompt_token.shape[-1])
        fp = int(self.prompt_feat.shape[-2])
        if not (self.ratio * T <= fp <= self.ratio * T + 1):
            raise ValueError(f"conds: gen_prompt_feat has {fp} frames for {T} prompt tokens")
        self.shift = fp - self.ratio * T          # 0, or 1 (the official code keeps an odd clip's extra frame)
        self.P = s3gen.mel2wav.config.samples_per_frame
        self.sr = s3gen.sample_rate
        self.n_fade = int(round(plan.crossfade_ms * self.sr / 1000))
        t = (torch.arange(self.n_fade, dtype=torch.float64) + 0.5) / max(1, self.n_fade)
        self.fade_in = (0.5 - 0.5 * torch.cos(math.pi * t)).float().numpy()
        self.fade_out = 1 - self.fade_in
        # the chunk's draws: flow noise for the longest chunk (the official draw for it), then the excitation
        gen = torch.Generator(device=s3gen.device).manual_seed(int(seed))
        new_frames = self.ratio * (max_tokens + len(self.suffix))
        noise = flow.decoder.draw_noise(self.ratio * T, new_frames, gen, s3gen.device)
        self.prompt_noise, self.noise = noise[:, :self.ratio * T], noise[:, self.ratio * T:]
        self.excitation = _Excitation(s3gen, gen)
        self.n_seen = 0             # tokens the last window saw
        self.stable = 0             # tokens whose frames a window has vocoded (past the lookahead)
        self.emitted = 0            # samples handed out
        self.tail = np.zeros(0, np.float32)   # the next samples, from the last window, to crossfade with
        self.windows = 0
        self.done = False

    # -- the scheduler's questions --------------------------------------------------------------------------
    def ready(self, n_tokens: int) -> bool:
        """Is a (non-final) window due once the chunk has n_tokens tokens? Cheap."""
        if self.done:
            return False
        due = self.plan.first if self.windows == 0 else self.stable + self.plan.every
        return n_tokens - self.plan.lookahead >= due

    def advance(self, tokens: torch.Tensor, final: bool = False) -> np.ndarray:
        """The next audio samples (float32, 24 kHz, possibly empty) given all of the chunk's tokens so far;
        `final=True` once, when the chunk's tokens are complete: flushes everything."""
        return advance_many([self], [tokens], [final])[0]

    # -- the work, in two halves so that several streamers share one flow call --------------------------------
    def _prepare(self, tokens: torch.Tensor, final: bool) -> _Window | None:
        if self.done:
            raise RuntimeError("advance() after the final window")
        tokens = torch.as_tensor(tokens).reshape(-1).long().cpu()
        n = int(tokens.numel())
        if n < self.n_seen:
            raise ValueError(f"tokens: {n} tokens, fewer than the {self.n_seen} seen before (pass the whole prefix)")
        if n > self.max_tokens:
            raise ValueError(f"tokens: {n} tokens, more than max_tokens={self.max_tokens}")
        if not final and not self.ready(n):
            return None
        self.n_seen = n
        p, r = self.plan, self.ratio
        if final:
            empty = n == 0                  # no tokens, no audio (the suffix alone is not vocoded)
            tokens = torch.cat([tokens, self.suffix])
            n = int(tokens.numel())
            stable = n
            end = r * n - self.shift
        else:
            empty = False
            stable = n - p.lookahead
            end = r * stable - self.shift
        vf = max(0, self.emitted // self.P - p.vocoder_context)
        a = max(0, (vf + self.shift) // r - p.context)        # first token the flow decodes
        if empty or end <= vf:
            self.stable = stable
            return _Window(None, None, r * a, max(end, vf), vf, final)   # type: ignore[arg-type]
        item = SpeechItem(tokens[a:], self.prompt_token, self.prompt_feat, self.embedding)
        noise = torch.cat([self.prompt_noise, self.noise[:, r * a:r * n]], dim=1)
        self.stable = stable
        return _Window(item, noise, r * a, end, vf, final)

    def _finish(self, w: _Window, mel: torch.Tensor | None) -> np.ndarray:
        """mel (80, frames) of the window's flow call -> the samples to hand out."""
        self.windows += 1
        if w.final:
            self.done = True
        if mel is None or w.end_frame <= w.vocode_from:
            wav = np.zeros(0, np.float32)
        else:
            hift = self.s3gen.mel2wav
            m = mel[:, w.vocode_from - w.first_frame:w.end_frame - w.first_frame].float()[None]
            f0 = hift.f0_predictor(m)[0]
            start = w.vocode_from * self.P
            commit = w.end_frame * self.P if w.final else (w.end_frame - self.plan.vocoder_margin) * self.P
            source = self.excitation.source(f0, start, commit)
            out = hift.decode(m, source)[0]
            if w.vocode_from == 0:
                fade = trim_fade(self.sr, out.device)
                k = min(fade.numel(), out.numel())
                out[:k] *= fade[:k]
            wav = out.float().cpu().numpy()
        return self._join(wav, w.vocode_from * self.P, w.final)

    def _join(self, wav: np.ndarray, start: int, final: bool) -> np.ndarray:
        """Crossfade the window's audio (from sample `start`) with the held tail, hand out what is final."""
        off = self.emitted - start                  # the window's sample at `emitted`
        if final:
            cut = start + len(wav)
        else:
            cut = start + len(wav) - self.plan.vocoder_margin * self.P - self.n_fade   # end of what is handed out
            if cut - self.emitted < self.n_fade + len(self.tail):     # too little new audio (the plan prevents it)
                return np.zeros(0, np.float32)
        # the tail is n_fade samples (or none before the first piece); the window covers it
        n = min(len(self.tail), max(0, len(wav) - off))
        mixed = self.tail[:n] * self.fade_out[:n] + wav[off:off + n] * self.fade_in[:n]
        piece = np.concatenate([mixed, self.tail[n:], wav[off + n:max(off + n, cut - start)]]).astype(np.float32)
        if final:
            self.tail = np.zeros(0, np.float32)
        else:
            self.tail = wav[cut - start:cut - start + self.n_fade].astype(np.float32)
        self.emitted += len(piece)
        return piece


@torch.inference_mode()
def advance_many(streamers: Sequence[ChunkStreamer], tokens: Sequence[torch.Tensor],
                 finals: Sequence[bool]) -> list[np.ndarray]:
    """`streamer.advance(tokens, final)` for several streamers (of one S3Gen) at once: their windows' flow
    runs in one `tokens_to_mel` call (grouped by length as it groups), the vocoder per streamer."""
    if not (len(streamers) == len(tokens) == len(finals)):
        raise ValueError("streamers, tokens and finals must have the same length")
    if len({id(s.s3gen) for s in streamers}) > 1:
        raise ValueError("streamers: all must use the same S3Gen")
    windows = [s._prepare(t, bool(f)) for s, t, f in zip(streamers, tokens, finals)]
    todo = [i for i, w in enumerate(windows) if w is not None and w.item is not None]
    mels: dict[int, torch.Tensor] = {}
    if todo:
        out = tokens_to_mel(streamers[0].s3gen, [windows[i].item for i in todo],
                            noises=[windows[i].noise for i in todo])
        mels = dict(zip(todo, out))
    return [np.zeros(0, np.float32) if w is None else s._finish(w, mels.get(i))
            for i, (s, w) in enumerate(zip(streamers, windows))]
