"""The batched S3Gen path the pipeline calls: speech tokens -> mel (`tokens_to_mel`) -> 24 kHz waveform
(`mel_to_wav`), exactly as the official `S3Gen.inference` does one request at a time.

`tokens_to_mel` batches requests of different lengths and different voices into one flow call (one estimator
call per Euler step for all CFG rows of all requests); each request's noise comes from its own generator
(or is given, for parity). Requests of very different lengths are split into groups to bound the padding
(pure waste on CPU). `mel_to_wav` runs the vocoder batched only over mels of equal length (padding would
change the tail of a non-causal vocoder), then applies the official fade-in: the first 20 ms zeroed, a raised
cosine over the next 20 ms.

Batching is exact in arithmetic but not in rounding: with other rows beside it (another batch size, another
padded length, a key mask), a row's matrix products and convolutions run in another order or another kernel,
and its output moves by float noise (measured on CPU, tiny-random checkpoint, 3 requests vs one: 7e-8 in
float32, 7e-5 = two 16-bit steps in bfloat16), enough to change encoded bytes. The pipeline therefore calls
these functions once per request on CPU, where batching S3Gen gains nothing (the estimator is arithmetic-bound
there), so a request's audio is bit-identical alone or in any batch. On CUDA, where batching pays, it calls
them once for the whole batch, and a request's audio may differ from its audio alone by at most
`CUDA_BATCH_ATOL[dtype]` (max absolute difference of the float samples, amplitude <= 0.99; float32 2e-3 = 66
16-bit steps, bfloat16 / float16 3e-2), the bound asserted by
tests/unit/engine/test_batch_invariance.py::test_cuda_batched_s3gen_stays_within_the_stated_bound. That bound
is an allowance for cuDNN's TF32 convolutions and per-shape kernel choice, not yet a measurement: no GPU was at
hand when it was written, so the test prints the measured difference; tighten the bound from it.

Random draws follow the official order (flow noise, then the vocoder's harmonic phases and noise): passing
the same generator, seeded s, to both reproduces what the official code draws after torch.manual_seed(s).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Generator, Sequence

import torch

from .models.flow import run_steps
from .models.s3gen import S3Gen

# Max |batched - alone| of a request's float samples on CUDA (see the module docstring), per compute dtype.
CUDA_BATCH_ATOL = {"float32": 2e-3, "bfloat16": 3e-2, "float16": 3e-2}


@dataclass
class SpeechItem:
    """One request for S3Gen: its speech tokens and its voice's S3Gen conditioning."""
    tokens: torch.Tensor          # (N,) int, valid speech tokens (< 6561)
    prompt_token: torch.Tensor    # (1, T) int, S3 tokens of the voice's reference
    prompt_feat: torch.Tensor     # (1, 2T, 80) float, the reference's mel
    embedding: torch.Tensor       # (1, 192) float, CAMPPlus x-vector

    @classmethod
    def from_conditionals(cls, tokens: torch.Tensor, conds) -> "SpeechItem":
        """From a VoiceConditionals (engine/conditioning.py): gen_prompt_token, gen_prompt_feat, gen_embedding."""
        return cls(tokens, conds.gen_prompt_token, conds.gen_prompt_feat, conds.gen_embedding)


def _groups(lengths: list[int], max_waste: float, max_batch: int | None = None) -> list[list[int]]:
    """Indices grouped by similar length (sorted), so that padded frames stay under max_waste x real frames,
    at most max_batch requests a group."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (max_batch is None or len(groups[-1]) < max_batch):
            g = groups[-1]
            real = sum(lengths[j] for j in g) + lengths[i]
            if lengths[i] * (len(g) + 1) <= (1 + max_waste) * real:
                g.append(i)
                continue
        groups.append([i])
    return groups


def flow_groups(items: Sequence[SpeechItem], max_waste: float = 0.25, max_batch: int | None = None
                ) -> list[list[int]]:
    """How `tokens_to_mel` batches `items` into flow calls (indices, by similar prompt + speech length). A caller
    that runs the groups one at a time (the engine core: one group is one unit of S3Gen work) gets exactly what
    one `tokens_to_mel` call over all items gives."""
    return _groups([int(it.prompt_token.shape[-1]) + int(it.tokens.shape[-1]) for it in items], max_waste, max_batch)


def tokens_to_mel(s3gen: S3Gen, items: Sequence[SpeechItem],
                  generators: Sequence[torch.Generator | None] | None = None,
                  noises: Sequence[torch.Tensor] | None = None,
                  n_timesteps: int | None = None, max_waste: float = 0.25,
                  max_batch: int | None = None) -> list[torch.Tensor]:
    """Mels (80, 2N) of the requests, in order. Noise: `noises[i]` ((1, 80, F) or (80, F), F >= 2(T+N) frames
    of prompt + speech), or drawn from `generators[i]` (None: the global RNG). `max_batch`: requests per flow
    call at most (None: no bound)."""
    return run_steps(tokens_to_mel_steps(s3gen, items, generators, noises, n_timesteps, max_waste, max_batch))


@torch.inference_mode()
def tokens_to_mel_steps(s3gen: S3Gen, items: Sequence[SpeechItem],
                        generators: Sequence[torch.Generator | None] | None = None,
                        noises: Sequence[torch.Tensor] | None = None,
                        n_timesteps: int | None = None, max_waste: float = 0.25,
                        max_batch: int | None = None) -> Generator[None, None, list[torch.Tensor]]:
    """`tokens_to_mel` as a generator that pauses between the flow's steps (models/flow.py `steps`: after the
    encoder, after each solver step) and returns the mels: the engine core runs one step at a time, so a long
    request's vocoding gives way to a short one's between two steps, with the same result."""
    if not items:
        return []
    dev, flow = s3gen.device, s3gen.flow
    ratio, mels_dim = flow.config.token_mel_ratio, flow.config.output_size
    lengths = [int(it.prompt_token.shape[-1]) + int(it.tokens.shape[-1]) for it in items]
    noise_list = []
    for i, it in enumerate(items):
        frames = ratio * lengths[i]
        if noises is not None:
            n = noises[i].reshape(mels_dim, -1)
            if n.shape[1] < frames:
                raise ValueError(f"noise for item {i} has {n.shape[1]} frames, needs {frames}")
        else:
            g = generators[i] if generators is not None else None
            new_frames = ratio * int(it.tokens.shape[-1])
            n = flow.decoder.draw_noise(frames - new_frames, new_frames, g, dev)
        noise_list.append(n[:, :frames].to(dev, torch.float32))

    out: list[torch.Tensor | None] = [None] * len(items)
    for group in flow_groups(items, max_waste, max_batch):
        B, L = len(group), max(lengths[i] for i in group)
        Fp = max(int(items[i].prompt_feat.shape[-2]) for i in group)
        tokens = torch.zeros(B, L, dtype=torch.long, device=dev)
        prompt_feat = torch.zeros(B, Fp, mels_dim, device=dev)
        noise = torch.zeros(B, mels_dim, ratio * L, device=dev)
        prompt_frames, embedding = [], []
        for b, i in enumerate(group):
            it = items[i]
            row = torch.cat([it.prompt_token.reshape(-1), it.tokens.reshape(-1)]).to(dev, torch.long)
            tokens[b, :row.numel()] = row
            pf = it.prompt_feat.reshape(-1, mels_dim).to(dev, torch.float32)
            prompt_feat[b, :pf.shape[0]] = pf
            prompt_frames.append(pf.shape[0])
            noise[b, :, :noise_list[i].shape[1]] = noise_list[i]
            embedding.append(it.embedding.reshape(1, -1).to(dev, torch.float32))
        mel = yield from flow.steps(tokens, torch.tensor([lengths[i] for i in group], device=dev), prompt_feat,
                                    torch.tensor(prompt_frames, device=dev), torch.cat(embedding), noise,
                                    n_timesteps)
        for b, i in enumerate(group):
            out[i] = mel[b, :, prompt_frames[b]:ratio * lengths[i]].float()
    return out  # type: ignore[return-value]


def trim_fade(sample_rate: int, device=None) -> torch.Tensor:
    """The official fade-in: zeros over sr/50 samples, then (cos(linspace(pi, 0, sr/50)) + 1) / 2."""
    n = sample_rate // 50
    fade = torch.zeros(2 * n)
    fade[n:] = (torch.cos(torch.linspace(torch.pi, 0, n)) + 1) / 2
    return fade.to(device)


@torch.inference_mode()
def mel_to_wav(s3gen: S3Gen, mels: Sequence[torch.Tensor],
               generators: Sequence[torch.Generator | None] | None = None,
               sources: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Waveforms (W,) float32 on the model's device, fade-in applied, one per mel (80, T): W = 480 T at 24 kHz.
    The excitation is `sources[i]` ((1, 1, W) or (W,)) when given, else drawn from `generators[i]`."""
    hift = s3gen.mel2wav
    dev = s3gen.device
    fade = trim_fade(hift.config.sampling_rate, dev)
    out: list[torch.Tensor | None] = [None] * len(mels)
    by_len: dict[int, list[int]] = {}
    for i, m in enumerate(mels):
        by_len.setdefault(int(m.shape[-1]), []).append(i)
    for T, group in by_len.items():
        if T == 0:
            for i in group:
                out[i] = torch.zeros(0, device=dev)
            continue
        mel = torch.stack([mels[i].reshape(-1, T) for i in group]).to(dev, torch.float32)
        src = None if sources is None else torch.stack([sources[i].reshape(1, -1) for i in group]).to(dev)
        gens = [generators[i] if generators is not None else None for i in group]
        wav, _ = hift(mel, gens, source=src)
        n = min(fade.numel(), wav.shape[1])
        wav[:, :n] *= fade[:n]
        for b, i in enumerate(group):
            out[i] = wav[b]
    return out  # type: ignore[return-value]


def parity_outputs(ckpt_dir: Path, ref: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """This engine's versions of flow.mel, hift.f0, hift.wav, out.wav, out.watermarked, fed the recorded
    inputs (tokens, conditioning, flow noise; the recorded mel and excitation for the vocoder), with the flow
    solver of the checkpoint's variant (Turbo: 2 meanflow steps; its flow.tokens hold the 3 silence tokens)."""
    from .checkpoint import read_config
    from .variants import detect_variant
    from .watermark import Watermarker
    variant = detect_variant(ckpt_dir)
    s3gen = S3Gen.from_checkpoint(ckpt_dir, config=variant.architecture(read_config(ckpt_dir)),
                                  filename=variant.s3gen_file)
    item = SpeechItem(ref["flow.tokens"], ref["cond.gen_prompt_token"], ref["cond.gen_prompt_feat"],
                      ref["cond.gen_embedding"])
    out = {"flow.mel": tokens_to_mel(s3gen, [item], noises=[ref["flow.noise"]])[0][None]}
    mel, source = ref["flow.mel"], ref["hift.source"]
    out["hift.f0"] = s3gen.mel2wav.f0_predictor(mel)
    out["hift.wav"] = s3gen.mel2wav.decode(mel, source)
    out["out.wav"] = mel_to_wav(s3gen, [mel[0]], sources=[source])[0][None]
    sr = s3gen.sample_rate
    out["out.watermarked"] = torch.from_numpy(Watermarker().apply(out["out.wav"][0].cpu().numpy(), sr))
    return out

