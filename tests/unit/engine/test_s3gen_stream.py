"""Windowed streaming S3Gen (engine/s3gen_stream.py) on tiny random checkpoints, original and Turbo: windows come
before the end, the pieces make the chunk's audio, it stays within the stated bound of the same chunk decoded in
one window (and would not without the fixed noise or the carried excitation), short chunks come in one piece,
batched windows give the same audio, bad input is refused naming the parameter."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from chatterbox_serverless.engine.audio import s3gen_prompt_mel
from chatterbox_serverless.engine.resolve import resolve_checkpoint
from chatterbox_serverless.engine.s3gen_stream import ChunkStreamer, WindowPlan, advance_many
from chatterbox_serverless.engine.speech_to_wav import SpeechItem, mel_to_wav, tokens_to_mel
from chatterbox_serverless.engine.variants import detect_variant

SEED, CAP = 5, 200
# streamed vs the same chunk in one window, tiny checkpoints (measured: original 4e-3 relative RMS, 9e-4 max;
# Turbo 4e-6, 2e-6): relative RMS of the difference, max |difference|, mean |log-mel difference|
BOUND = {"tiny-random": (0.02, 5e-3, 0.05), "tiny-random-turbo": (0.02, 5e-3, 0.05)}


@pytest.fixture(scope="module", params=["tiny-random", "tiny-random-turbo"])
def parts(request, tmp_path_factory):
    d = resolve_checkpoint(request.param, tmp_path_factory.mktemp("data"))
    p = detect_variant(d).load(d)
    p.spec = request.param
    return p


def _tokens(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 6561, (n,), generator=torch.Generator().manual_seed(seed))


def _streamer(parts, plan: WindowPlan = WindowPlan()) -> ChunkStreamer:
    return ChunkStreamer(parts.s3gen, parts.builtin_voice, SEED, parts.flow_suffix_tokens, CAP, plan)


def _stream(parts, tokens, plan: WindowPlan = WindowPlan(), after_window=None):
    """(tokens seen, piece) for each window, T3-style: asked after every token, final at the end."""
    s = _streamer(parts, plan)
    out = []
    for n in range(len(tokens) + 1):
        if s.ready(n):
            out.append((n, s.advance(tokens[:n])))
            if after_window:
                after_window(s)
    out.append((len(tokens), s.advance(tokens, final=True)))
    return s, out


def _whole(parts, tokens) -> np.ndarray:
    return _streamer(parts).advance(tokens, final=True)


def _distance(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    d = a - b
    logmel = (s3gen_prompt_mel(torch.from_numpy(a)) - s3gen_prompt_mel(torch.from_numpy(b))).abs().mean()
    return float(np.sqrt(np.mean(d ** 2)) / np.sqrt(np.mean(b ** 2))), float(np.abs(d).max()), float(logmel)


def test_windows_come_before_the_end_and_the_pieces_make_the_chunk(parts):
    plan = WindowPlan()
    tokens = _tokens(70)
    s, pieces = _stream(parts, tokens, plan)
    seen = [n for n, _ in pieces]
    assert seen[0] == plan.first + plan.lookahead              # the first window as soon as it is due
    assert seen[1] == plan.first + plan.every + plan.lookahead
    assert len(pieces) >= 3 and all(len(p) > s.n_fade for _, p in pieces)   # none shorter than the crossfade
    out = np.concatenate([p for _, p in pieces])
    frames = 2 * (70 + len(parts.flow_suffix_tokens)) - s.shift
    assert out.dtype == np.float32 and len(out) == 480 * frames == len(_whole(parts, tokens))
    # the same request streams the same pieces (noise and excitation come from the chunk's seed)
    _, again = _stream(parts, tokens, plan)
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(pieces, again))
    assert not s.ready(100)
    with pytest.raises(RuntimeError):
        s.advance(tokens, final=True)


def test_one_window_is_the_non_streamed_path_with_the_streamers_draws(parts):
    """The reference the bound is stated against: tokens_to_mel(noises=...) + mel_to_wav(sources=...)."""
    tokens = _tokens(40)
    s = _streamer(parts)
    wav = s.advance(tokens, final=True)
    item = SpeechItem.from_conditionals(torch.cat([tokens, torch.tensor(parts.flow_suffix_tokens, dtype=torch.long)]),
                                        parts.builtin_voice)
    mel = tokens_to_mel(parts.s3gen, [item], noises=[torch.cat([s.prompt_noise, s.noise], dim=1)])
    expected = mel_to_wav(parts.s3gen, mel, sources=[s.excitation.cache])[0].numpy()
    np.testing.assert_array_equal(wav, expected)


def test_streamed_stays_within_the_bound_and_would_not_without_fixed_noise_or_carried_source(parts):
    tokens = _tokens(70)
    whole = _whole(parts, tokens)
    streamed = np.concatenate([p for _, p in _stream(parts, tokens)[1]])
    rel, peak, logmel = _distance(streamed, whole)
    print(f"{parts.spec}: relative RMS {rel:.2e}, max {peak:.2e}, log-mel L1 {logmel:.2e}")
    bound = BOUND[parts.spec]
    assert rel <= bound[0] and peak <= bound[1] and logmel <= bound[2]

    def new_noise(s):          # every window its own flow noise
        s.noise = torch.randn(s.noise.shape, generator=torch.Generator().manual_seed(s.windows))

    def new_source(s):         # every window its own excitation phases and noise (the cache alone carried)
        g = torch.Generator().manual_seed(s.windows)
        e = s.excitation
        e.cycles = torch.rand(e.H, dtype=torch.float64, generator=g)
        e.blocks = [torch.randn(b.shape, generator=g) for b in e.blocks]

    for spoil in (new_noise, new_source):
        spoiled = np.concatenate([p for _, p in _stream(parts, tokens, after_window=spoil)[1]])
        assert _distance(spoiled, whole)[0] > 10 * rel, spoil.__name__


def test_joins_are_smooth(parts):
    s, pieces = _stream(parts, _tokens(70))
    out = np.concatenate([p for _, p in pieces])
    jumps = np.abs(np.diff(out))
    near = np.zeros(len(jumps), bool)
    for b in np.cumsum([len(p) for _, p in pieces])[:-1]:
        near[b - 2:b + s.n_fade + 1] = True
    assert jumps[near].max() <= jumps[~near].max()


@pytest.mark.parametrize("n", [0, 1, 5, 14])
def test_short_chunks_come_in_one_final_piece(parts, n):
    tokens = _tokens(n)
    s, pieces = _stream(parts, tokens)
    assert len(pieces) == 1 and s.windows == 1
    if n == 0:   # no tokens, no audio (as the non-streamed path: the suffix alone is not vocoded)
        assert len(pieces[0][1]) == 0
    else:
        np.testing.assert_array_equal(pieces[0][1], _whole(parts, tokens))


def test_batched_windows_give_each_streamers_audio(parts):
    toks = [_tokens(40, 1), _tokens(55, 2), _tokens(12, 3)]
    alone = [np.concatenate([p for _, p in _stream(parts, t)[1]]) for t in toks]
    streamers = [_streamer(parts) for _ in toks]
    got: list[list[np.ndarray]] = [[] for _ in toks]
    for n in range(56):
        finals = [n == len(t) for t in toks]
        active = [i for i, s in enumerate(streamers) if not s.done and (finals[i] or s.ready(n))]
        if active:
            pieces = advance_many([streamers[i] for i in active], [toks[i][:n] for i in active],
                                  [finals[i] for i in active])
            for i, p in zip(active, pieces):
                got[i].append(p)
    for a, g in zip(alone, got):
        np.testing.assert_allclose(np.concatenate(g), a, atol=1e-5)   # batching moves rows by float noise only


def test_bad_input_is_refused_naming_the_parameter(parts):
    with pytest.raises(ValueError, match="first"):
        WindowPlan(first=0)
    with pytest.raises(ValueError, match="context"):
        WindowPlan(context=-1)
    with pytest.raises(ValueError, match="crossfade_ms"):
        WindowPlan(crossfade_ms=500)
    with pytest.raises(ValueError, match="max_tokens"):
        ChunkStreamer(parts.s3gen, parts.builtin_voice, 0, max_tokens=-1)
    s = ChunkStreamer(parts.s3gen, parts.builtin_voice, 0, max_tokens=20)
    with pytest.raises(ValueError, match="max_tokens"):
        s.advance(_tokens(21))
    s.advance(_tokens(16))
    with pytest.raises(ValueError, match="tokens"):
        s.advance(_tokens(10))
    with pytest.raises(ValueError, match="speech tokens"):
        ChunkStreamer(parts.s3gen, parts.builtin_voice, 0, max_tokens=20).advance(torch.tensor([6561]), final=True)
