"""S3Gen (flow + HiFT) on tiny random configs: strict loading, batch == alone, seeds, shapes."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from chatterbox_serverless.engine.checkpoint import CheckpointError
from chatterbox_serverless.engine.models.flow import FlowConfig
from chatterbox_serverless.engine.models.hift import HiFTConfig
from chatterbox_serverless.engine.models.s3gen import S3Gen, S3GenConfig
from chatterbox_serverless.engine.speech_to_wav import SpeechItem, mel_to_wav, tokens_to_mel, trim_fade


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = S3Gen(S3GenConfig.tiny())
    # non-trivial values where the default init is constant
    for name, p in model.named_parameters():
        if name.endswith(("pos_bias_u", "pos_bias_v", ".alpha")):
            p.data.uniform_(0.5, 1.5)
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


def _overrides() -> dict:
    """What tensor shapes cannot tell, as serverless_config.json carries it (JSON: tuples become lists)."""
    c = S3GenConfig.tiny()
    sections = {"s3tokenizer": c.tokenizer, "campplus": c.speaker_encoder, "flow": c.flow, "hift": c.mel2wav}
    return json.loads(json.dumps({k: dataclasses.asdict(v) for k, v in sections.items()}))


@pytest.fixture(scope="module")
def s3gen(tiny_state) -> S3Gen:
    return S3Gen.from_state_dict(tiny_state, _overrides())


def _voice(seed: int, prompt_tokens: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 6561, (1, prompt_tokens), generator=g),
            torch.randn(1, 2 * prompt_tokens, 80, generator=g) - 5, torch.randn(1, dim, generator=g))


def _items(dim: int) -> list[SpeechItem]:
    voices = [_voice(1, 6, dim), _voice(2, 9, dim), _voice(3, 4, dim)]
    lengths = [7, 3, 11]
    g = torch.Generator().manual_seed(5)
    return [SpeechItem(torch.randint(0, 6561, (n,), generator=g), *voices[i]) for i, n in enumerate(lengths)]


def test_state_dict_keys_are_the_official_layout(s3gen, tiny_state):
    keys = set(tiny_state)
    assert {k.split(".")[0] for k in keys} == {"tokenizer", "speaker_encoder", "flow", "mel2wav"}
    assert "flow.decoder.estimator.mid_blocks.0.1.0.attn1.to_out.0.bias" in keys
    assert "flow.decoder.estimator.down_blocks.0.0.block1.block.2.weight" in keys   # LayerNorm at index 2
    assert "flow.encoder.encoders.0.self_attn.pos_bias_u" in keys
    assert "mel2wav.conv_pre.parametrizations.weight.original0" in keys
    assert "mel2wav.resblocks.0.activations1.0.alpha" in keys
    assert not any(k.endswith(("stft_window", "trim_fade")) for k in keys)
    # after loading, weight norm is folded into plain weights
    assert not any("parametrizations" in k for k in s3gen.state_dict())


def test_config_is_read_back_from_shapes(tiny_state):
    cfg = S3GenConfig.from_state_dict(tiny_state, _overrides())
    tiny = S3GenConfig.tiny()
    assert cfg == tiny
    # without overrides, only what shapes cannot tell falls back to the official values
    hift = HiFTConfig.from_state_dict({k[8:]: v for k, v in tiny_state.items() if k.startswith("mel2wav.")})
    assert dataclasses.replace(hift, resblock_dilation_sizes=tiny.mel2wav.resblock_dilation_sizes) == tiny.mel2wav
    assert FlowConfig.from_state_dict({k[5:]: v for k, v in tiny_state.items() if k.startswith("flow.")},
                                      {"decoder": {"num_heads": 2}, "encoder": {"attention_heads": 2}}) == tiny.flow
    assert HiFTConfig().samples_per_frame == 480 == tiny.mel2wav.samples_per_frame


def test_strict_loading_names_the_bad_keys(tiny_state, tmp_path):
    for key in ("flow.encoder.encoders.0.norm_ff.bias", "flow.encoder.up_layer.conv.weight",
                "mel2wav.resblocks.0.convs2.0.parametrizations.weight.original1"):
        missing = {k: v for k, v in tiny_state.items() if k != key}
        with pytest.raises(CheckpointError, match=r"missing key\(s\): " + key.replace(".", r"\.")):
            S3Gen.from_state_dict(missing, _overrides())
    extra = dict(tiny_state, **{"mel2wav.bogus.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): mel2wav\.bogus\.weight"):
        S3Gen.from_state_dict(extra, _overrides())
    bad = dict(tiny_state)
    bad["flow.encoder_proj.bias"] = torch.zeros(81)
    with pytest.raises(CheckpointError, match=r"wrong shape.*flow\.encoder_proj\.bias"):
        S3Gen.from_state_dict(bad, _overrides())
    # a good file round-trips through a checkpoint directory
    save_file(tiny_state, str(tmp_path / "s3gen.safetensors"))
    (tmp_path / "serverless_config.json").write_text(json.dumps(_overrides()))
    loaded = S3Gen.from_checkpoint(tmp_path)
    w = loaded.flow.decoder.estimator.final_proj.weight
    assert torch.equal(w, tiny_state["flow.decoder.estimator.final_proj.weight"])


def test_flow_batch_equals_alone_across_lengths_and_voices(s3gen):
    items = _items(s3gen.config.flow.spk_embed_dim)
    seeds = [11, 12, 13]
    alone = [tokens_to_mel(s3gen, [it], [torch.Generator().manual_seed(s)])[0] for it, s in zip(items, seeds)]
    batched = tokens_to_mel(s3gen, items, [torch.Generator().manual_seed(s) for s in seeds], max_waste=100.0)
    for it, a, b in zip(items, alone, batched):
        assert a.shape == (80, 2 * it.tokens.numel())
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # default grouping (bounded padding), and groups of at most two, give the same
    grouped = tokens_to_mel(s3gen, items, [torch.Generator().manual_seed(s) for s in seeds])
    pairs = tokens_to_mel(s3gen, items, [torch.Generator().manual_seed(s) for s in seeds], max_waste=100.0,
                          max_batch=2)
    for a, b, c in zip(alone, grouped, pairs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)


def test_flow_groups_bound_padding_and_batch_size():
    from chatterbox_serverless.engine.speech_to_wav import _groups
    assert _groups([10, 100, 11, 12, 98], max_waste=0.25) == [[0, 2, 3], [4, 1]]
    assert _groups([10, 100, 11, 12, 98], max_waste=0.25, max_batch=2) == [[0, 2], [3], [4, 1]]
    assert _groups([5] * 5, max_waste=0.0, max_batch=None) == [[0, 1, 2, 3, 4]]


def test_flow_seed_determinism_and_recorded_noise(s3gen):
    item = _items(s3gen.config.flow.spk_embed_dim)[0]
    a = tokens_to_mel(s3gen, [item], [torch.Generator().manual_seed(3)])[0]
    b = tokens_to_mel(s3gen, [item], [torch.Generator().manual_seed(3)])[0]
    c = tokens_to_mel(s3gen, [item], [torch.Generator().manual_seed(4)])[0]
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    frames = 2 * (item.prompt_token.shape[1] + item.tokens.numel())
    noise = torch.randn((1, 80, frames), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(tokens_to_mel(s3gen, [item], noises=[noise])[0], a, rtol=0, atol=0)


def test_flow_rejects_invalid_tokens(s3gen):
    item = _items(s3gen.config.flow.spk_embed_dim)[0]
    item.tokens = torch.tensor([1, 6561, 2])
    with pytest.raises(ValueError, match="6561"):
        tokens_to_mel(s3gen, [item])


def test_vocoder_batch_equals_alone_and_fade(s3gen):
    g = torch.Generator().manual_seed(0)
    mels = [torch.randn(80, 6, generator=g) - 4, torch.randn(80, 6, generator=g) - 4, torch.randn(80, 4, generator=g)]
    seeds = [1, 2, 3]
    alone = [mel_to_wav(s3gen, [m], [torch.Generator().manual_seed(s)])[0] for m, s in zip(mels, seeds)]
    batched = mel_to_wav(s3gen, mels, [torch.Generator().manual_seed(s) for s in seeds])
    for m, a, b in zip(mels, alone, batched):
        assert b.shape == (480 * m.shape[1],) and b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert torch.all(b[:480] == 0) and b.abs().max() <= 0.99
    again = mel_to_wav(s3gen, mels[:1], [torch.Generator().manual_seed(1)])[0]
    assert torch.equal(again, alone[0])
    other = mel_to_wav(s3gen, mels[:1], [torch.Generator().manual_seed(2)])[0]
    assert not torch.equal(other, alone[0])


def test_vocoder_recorded_source_and_short_inputs(s3gen):
    hift = s3gen.mel2wav
    fade = trim_fade(24000)
    assert fade.shape == (960,) and torch.all(fade[:480] == 0) and fade[-1] == 1
    for frames in (3, 1):     # 1 frame: shorter than the fade
        mel = torch.randn(80, frames) - 4
        f0, source = hift.source(mel[None], [torch.Generator().manual_seed(9)])
        assert f0.shape == (1, frames) and source.shape == (1, 1, 480 * frames)
        wav = mel_to_wav(s3gen, [mel], sources=[source])[0]
        expect = hift.decode(mel[None], source)[0]
        n = min(960, expect.numel())
        expect[:n] *= fade[:n]
        torch.testing.assert_close(wav, expect, rtol=0, atol=0)
    assert mel_to_wav(s3gen, [torch.zeros(80, 0)])[0].numel() == 0


def test_bfloat16_runs_the_vocoders_convolutions_in_bfloat16_and_its_source_in_float32(tiny_state, tmp_path):
    save_file(tiny_state, tmp_path / "s3gen.safetensors")
    (tmp_path / "serverless_config.json").write_text(json.dumps(_overrides()))
    exact = S3Gen.from_checkpoint(tmp_path, dtype=torch.float32)
    fast = S3Gen.from_checkpoint(tmp_path, dtype=torch.bfloat16)
    hift = fast.mel2wav
    assert hift.conv_pre.weight.dtype == hift.resblocks[0].convs1[0].weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for m in (hift.f0_predictor, hift.m_source, hift.conv_post)
               for p in m.parameters())
    assert exact.mel2wav.conv_pre.weight.dtype == torch.float32
    mel = torch.randn(80, 40, generator=torch.Generator().manual_seed(3)) - 4
    a = mel_to_wav(exact, [mel], [torch.Generator().manual_seed(1)])[0]
    b = mel_to_wav(fast, [mel], [torch.Generator().manual_seed(1)])[0]
    assert b.dtype == torch.float32 and b.shape == a.shape
    snr = 10 * torch.log10(a.pow(2).mean() / (b - a).pow(2).mean())
    assert 20 < snr < 80, snr           # bfloat16 rounding: close to float32, not equal


def test_end_to_end_tiny_tokens_to_wav(s3gen):
    items = _items(s3gen.config.flow.spk_embed_dim)[:2]
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    wavs = mel_to_wav(s3gen, tokens_to_mel(s3gen, items, gens), gens)
    for it, w in zip(items, wavs):
        assert w.shape == (2 * 480 * it.tokens.numel(),)
        assert torch.isfinite(w).all()


def test_encoder_padding_is_exact(s3gen):
    """The conformer encoder on a right-padded batch gives each row what it gives alone (the padded frames
    are zeroed after the input embedding, so the 3-frame lookahead conv sees zeros past the end)."""
    enc = s3gen.flow.encoder
    g = torch.Generator().manual_seed(0)
    lengths = [9, 4, 6]
    x = torch.randn(3, 9, enc.config.input_size, generator=g)
    for b, n in enumerate(lengths):
        x[b, n:] = 0
    with torch.inference_mode():
        h, h_len = enc(x, torch.tensor(lengths))
        assert h_len.tolist() == [18, 8, 12]
        for b, n in enumerate(lengths):
            alone, _ = enc(x[b:b + 1, :n], torch.tensor([n]))
            torch.testing.assert_close(h[b, :2 * n], alone[0], rtol=1e-5, atol=1e-5)


def test_sliced_attention_matches_sdpa_with_padded_keys():
    import torch.nn.functional as F
    from chatterbox_serverless.engine.models.flow_decoder import sliced_attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 37, 16, generator=g) for _ in range(3))
    key_mask = torch.ones(3, 1, 1, 37, dtype=torch.bool)
    key_mask[1, ..., 30:] = False
    key_mask[2, ..., 5:] = False
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    # slices of one (row, head) pair, of five, and all at once
    for slice_bytes in (1, 5 * 37 * 37 * 4, 1 << 30):
        torch.testing.assert_close(sliced_attention(q, k, v, key_mask, slice_bytes=slice_bytes), want,
                                   rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sliced_attention(q, k, v, None), F.scaled_dot_product_attention(q, k, v),
                               rtol=1e-5, atol=1e-6)
    low = sliced_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), key_mask).float()
    assert ((low - want).norm() / want.norm()) < 2e-2


def test_flow_with_sliced_attention_is_batch_exact_and_equals_sdpa(s3gen):
    est = s3gen.flow.decoder.estimator
    items = _items(s3gen.config.flow.spk_embed_dim)
    seeds = [11, 12, 13]
    sdpa = tokens_to_mel(s3gen, items, [torch.Generator().manual_seed(s) for s in seeds], max_waste=100.0)
    est.attention = "sliced"
    try:
        assert est.attention == "sliced"
        alone = [tokens_to_mel(s3gen, [it], [torch.Generator().manual_seed(s)])[0] for it, s in zip(items, seeds)]
        batched = tokens_to_mel(s3gen, items, [torch.Generator().manual_seed(s) for s in seeds], max_waste=100.0)
    finally:
        est.attention = "sdpa"
    for a, b, c in zip(alone, batched, sdpa):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="sdpa"):
        est.attention = "fast"


def test_pick_attention_keeps_sdpa_where_exactness_or_cuda_matter():
    from chatterbox_serverless.engine.models.flow_decoder import pick_attention
    assert pick_attention(2, 16, "cpu", torch.float32) == "sdpa"
    assert pick_attention(2, 16, "cuda", torch.bfloat16) == "sdpa"      # decided without touching the device
    assert pick_attention(2, 16, "cpu", torch.bfloat16, frames=64) in ("sdpa", "sliced")
