"""Voice front-ends on tiny random models: strict loading, shapes, determinism, batch-vs-alone, the voice cache,
and the conds.pt format."""
import json
import pickle
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from chatterbox_serverless.engine.checkpoint import CheckpointError, load_strict
from chatterbox_serverless.engine.conditioning import (VoiceCache, VoiceConditionals, VoiceFrontEnd,
                                                       load_builtin_voice, load_voice_modules, save_builtin_voice,
                                                       voice_key)
from chatterbox_serverless.engine.models.campplus import CAMPPlus, CAMPPlusConfig
from chatterbox_serverless.engine.models.s3tokenizer import S3TokenizerConfig, S3TokenizerV2
from chatterbox_serverless.engine.models.voice_encoder import VoiceEncoder, VoiceEncoderConfig
from chatterbox_serverless.engine.contract import VoiceAudio


def voice(sr: int, seconds: float, seed: int = 0) -> np.ndarray:
    """Speech-like test signal: harmonics of a wandering pitch, syllable envelope, a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    sig = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.2 + 0.8 * np.sin(2 * np.pi * 2.7 * t) ** 2)
    sig = sig + 0.02 * rng.standard_normal(t.shape)
    return (0.3 * sig / np.abs(sig).max()).astype(np.float32)


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point() and not name.endswith(("_mel_filters", "window")):
                if name.endswith("running_var"):
                    t.copy_(0.5 + torch.rand(t.shape, generator=g))
                else:
                    t.copy_(0.3 * torch.randn(t.shape, generator=g))
    return module.eval()


@pytest.fixture(scope="module")
def tiny_modules():
    torch.manual_seed(0)
    ve = randomize(VoiceEncoder(VoiceEncoderConfig.tiny()), 1)
    tok = randomize(S3TokenizerV2(S3TokenizerConfig.tiny()), 2)
    spk = randomize(CAMPPlus(CAMPPlusConfig.tiny()), 3)
    return ve, tok, spk


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_modules):
    ve, tok, spk = tiny_modules
    d = tmp_path_factory.mktemp("tiny_ckpt")
    save_file({k: v.contiguous() for k, v in ve.state_dict().items()}, str(d / "ve.safetensors"))
    s3 = {f"tokenizer.{k}": v for k, v in tok.state_dict().items()}
    s3.update({f"speaker_encoder.{k}": v for k, v in spk.state_dict().items()})
    s3["flow.some.weight"] = torch.zeros(3)          # other S3Gen parts are not the front end's business
    save_file({k: v.contiguous() for k, v in s3.items()}, str(d / "s3gen.safetensors"))
    (d / "serverless_config.json").write_text(json.dumps({"s3tokenizer": {"n_head": 2}}))
    return d


@pytest.fixture(scope="module")
def front_end(tiny_modules):
    return VoiceFrontEnd(*tiny_modules)


# --------------------------------------------------------------------------------------------------- loading

def test_load_from_checkpoint_dir_matches_modules(tiny_ckpt, tiny_modules, front_end):
    loaded = VoiceFrontEnd.load(tiny_ckpt, "cpu")
    assert loaded.tokenizer.config == tiny_modules[1].config
    assert loaded.speaker_encoder.config == tiny_modules[2].config
    assert loaded.ve.config == tiny_modules[0].config
    x = voice(24000, 2.0)
    a, b = loaded.compute(x, 24000), front_end.compute(x, 24000)
    for f in ("speaker_emb", "t3_prompt_tokens", "gen_prompt_token", "gen_prompt_feat", "gen_embedding"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_tokenizer_head_count_must_come_from_config(tmp_path, tiny_ckpt):
    for f in ("ve.safetensors", "s3gen.safetensors"):
        (tmp_path / f).write_bytes((tiny_ckpt / f).read_bytes())
    with pytest.raises(CheckpointError, match="n_head"):   # 64 wide does not split into the official 20 heads
        load_voice_modules(tmp_path)


@pytest.mark.parametrize("which", ["ve", "tok", "spk"])
def test_strict_loading_names_the_key(which, tiny_modules):
    module = dict(zip(("ve", "tok", "spk"), tiny_modules))[which]
    sd = dict(module.state_dict())
    fresh = type(module)(module.config)
    victim = sorted(k for k in sd if k.endswith("weight"))[-1]
    missing = {k: v for k, v in sd.items() if k != victim}
    with pytest.raises(CheckpointError, match=f"missing.*{victim}"):
        load_strict(fresh, missing, what=which)
    with pytest.raises(CheckpointError, match="unexpected.*bogus.key"):
        load_strict(fresh, {**sd, "bogus.key": torch.zeros(1)}, what=which)
    with pytest.raises(CheckpointError, match=f"wrong shape.*{victim}"):
        load_strict(fresh, {**sd, victim: torch.zeros(2, 2)}, what=which)
    load_strict(fresh, sd, what=which)


def test_tokenizer_mel_buffers_are_optional(tiny_modules):
    tok = tiny_modules[1]
    sd = {k: v for k, v in tok.state_dict().items() if k not in ("_mel_filters", "window")}
    fresh = S3TokenizerV2(tok.config)
    load_strict(fresh, sd, what="tokenizer")
    assert torch.equal(fresh._mel_filters, tok._mel_filters) and torch.equal(fresh.window, tok.window)


def test_configs_from_state_dict(tiny_modules):
    ve, tok, spk = tiny_modules
    assert VoiceEncoderConfig.from_state_dict(ve.state_dict()) == ve.config
    assert S3TokenizerConfig.from_state_dict(tok.state_dict(), {"n_head": 2}) == tok.config
    assert CAMPPlusConfig.from_state_dict(spk.state_dict()) == spk.config
    official = CAMPPlusConfig()
    assert CAMPPlusConfig.from_state_dict(CAMPPlus(official).state_dict()) == official


def test_missing_key_in_config_inference_is_a_checkpoint_error(tmp_path, tiny_ckpt, tiny_modules):
    sd = {k: v for k, v in tiny_modules[0].state_dict().items() if k != "proj.weight"}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "ve.safetensors"))
    for f in ("s3gen.safetensors", "serverless_config.json"):
        (tmp_path / f).write_bytes((tiny_ckpt / f).read_bytes())
    with pytest.raises(CheckpointError, match="proj.weight"):
        load_voice_modules(tmp_path)


# --------------------------------------------------------------------------------------------------- compute

@pytest.mark.parametrize("sr,seconds", [(24000, 12.0), (22050, 3.0), (16000, 7.0)])
def test_compute_shapes(front_end, sr, seconds):
    c = front_end.compute(voice(sr, seconds), sr)
    gen_s = min(seconds, 10.0)
    t = int(np.ceil(gen_s * 25))
    assert c.speaker_emb.shape == (1, 32) and c.speaker_emb.dtype == torch.float32
    assert torch.allclose(c.speaker_emb.norm(dim=1), torch.ones(1), atol=1e-5)
    assert c.t3_prompt_tokens.shape == (1, min(150, int(np.ceil(min(seconds, 6.0) * 25))))
    assert c.t3_prompt_tokens.dtype == torch.int64
    assert c.gen_prompt_feat.shape == (1, 2 * c.gen_prompt_token.shape[1], 80)
    assert abs(c.gen_prompt_token.shape[1] - t) <= 1
    assert c.gen_embedding.shape == (1, 24)
    for tokens in (c.t3_prompt_tokens, c.gen_prompt_token):
        assert tokens.min() >= 0 and tokens.max() < 3 ** 8


def test_odd_number_of_prompt_frames_is_kept_as_official(front_end, tmp_path):
    c = front_end.compute(voice(24000, 301 * 480 / 24000), 24000)   # 301 mel frames, 151 tokens cut to 150
    assert c.gen_prompt_feat.shape == (1, 301, 80) and c.gen_prompt_token.shape == (1, 150)
    save_builtin_voice(c, tmp_path / "odd.pt")
    assert load_builtin_voice(tmp_path / "odd.pt").gen_prompt_feat.shape == (1, 301, 80)


def test_compute_is_deterministic_and_handles_stereo(front_end):
    x = voice(24000, 2.5)
    a, b = front_end.compute(x, 24000), front_end.compute(x.copy(), 24000)
    s = front_end.compute(np.stack([x, x], axis=1), 24000)
    for f in ("speaker_emb", "t3_prompt_tokens", "gen_prompt_token", "gen_prompt_feat", "gen_embedding"):
        assert torch.equal(getattr(a, f), getattr(b, f))
        assert torch.equal(getattr(a, f), getattr(s, f))


def test_compute_rejects_bad_audio(front_end):
    with pytest.raises(ValueError, match="too short"):
        front_end.compute(voice(24000, 0.2), 24000)
    with pytest.raises(ValueError, match="NaN"):
        front_end.compute(np.full(24000, np.nan, np.float32), 24000)
    with pytest.raises(ValueError, match="silent"):
        front_end.compute(np.zeros(48000, np.float32), 24000)
    with pytest.raises(ValueError, match="sample rate"):
        front_end.compute(voice(24000, 1.0), 0)


def test_tokenizer_batch_equals_alone(tiny_modules):
    tok = tiny_modules[1]
    a, b = torch.from_numpy(voice(16000, 2.0, 1)), torch.from_numpy(voice(16000, 1.3, 2))
    mels = [tok.log_mel(a), tok.log_mel(b)]
    lens = torch.tensor([m.shape[1] for m in mels])
    batch = torch.zeros(2, mels[0].shape[0], int(lens.max()))
    for i, m in enumerate(mels):
        batch[i, :, :m.shape[1]] = m
    with torch.inference_mode():
        hb, lb = tok.encode(batch, lens)
        for i, m in enumerate(mels):
            h1, l1 = tok.encode(m[None], lens[i:i + 1])
            assert int(lb[i]) == int(l1[0]) == h1.shape[1]
            # float32 rounding only (values up to ~40; the GEMMs of a batch and of one clip sum in another order,
            # 1.5e-5 apart at most on an AVX2-only CPU); padding leaking in would differ by whole units
            assert torch.allclose(hb[i, :h1.shape[1]], h1[0], atol=1e-4, rtol=1e-5)
        codes, code_lens = tok.tokenize([a, b])
        assert torch.equal(codes[1, :code_lens[1]], tok.tokenize([b])[0][0])


def test_voice_encoder_partials_and_batch(tiny_modules):
    ve = tiny_modules[0]
    assert ve.config.frame_step == 77 and ve.partial_windows(160) == (1, 160)
    assert ve.partial_windows(50) == (1, 160)                     # short: one zero-padded partial
    n, target = ve.partial_windows(1000)
    assert target == 160 + 77 * (n - 1) and 1000 - 77 < target <= 1000 + 77
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.rand(400, 40, generator=g), torch.rand(250, 40, generator=g)
    with torch.inference_mode():
        both = ve.embed_mels([m1, m2])
        assert torch.allclose(both[0], ve.embed_mels([m1])[0], atol=1e-6)
        assert torch.allclose(both[1], ve.embed_mels([m2])[0], atol=1e-6)
    assert torch.allclose(both.norm(dim=1), torch.ones(2), atol=1e-5)


def test_campplus_uses_running_stats_in_any_mode(tiny_modules):
    spk = tiny_modules[2]
    wav = torch.from_numpy(voice(16000, 1.5))
    with torch.inference_mode():
        a = spk.embed(wav)
        spk.train()
        b = spk.embed(wav)
        spk.eval()
    assert a.shape == (1, 24) and torch.equal(a, b)


# ------------------------------------------------------------------------------------------------------ cache

class FakeFrontEndForTests:
    def __init__(self, delay: float = 0.0):
        self.calls = 0
        self.delay = delay
        self._lock = threading.Lock()

    def compute(self, samples, sample_rate):
        with self._lock:
            self.calls += 1
        time.sleep(self.delay)
        v = float(np.asarray(samples).sum()) + sample_rate
        return VoiceConditionals(torch.full((1, 4), v), torch.zeros(1, 3, dtype=torch.long),
                                 torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 4, 80), torch.zeros(1, 5))


def test_cache_hits_misses_and_lru_eviction():
    fe = FakeFrontEndForTests()
    cache = VoiceCache(fe, max_entries=2)
    a = VoiceAudio(np.ones(10, np.float32), 16000)
    b = VoiceAudio(np.full(10, 2, np.float32), 16000)
    c = VoiceAudio(np.full(10, 3, np.float32), 16000)
    ca = cache.get(a)
    assert cache.get(VoiceAudio(a.samples.copy(), 16000)) is ca           # same content: hit
    assert cache.get(VoiceAudio(a.samples, 24000)) is not ca              # other rate: miss
    assert (cache.hits, cache.misses, fe.calls) == (1, 2, 2)
    cache.get(b)                      # evicts the least recently used: (a, 24000)
    cache.get(a)                      # hit, a becomes most recent
    cache.get(c)                      # evicts b
    assert len(cache) == 2
    calls = fe.calls
    cache.get(a)
    assert fe.calls == calls
    cache.get(b)
    assert fe.calls == calls + 1
    assert cache.stats() == dict(entries=2, max_entries=2, hits=cache.hits, misses=cache.misses)
    with pytest.raises(ValueError):
        VoiceCache(fe, max_entries=0)


def test_cache_computes_a_voice_once_under_concurrency():
    fe = FakeFrontEndForTests(delay=0.05)
    cache = VoiceCache(fe, max_entries=4)
    v = VoiceAudio(np.ones(100, np.float32), 16000)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(v))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fe.calls == 1 and len(results) == 8 and all(r is results[0] for r in results)
    assert (cache.hits, cache.misses) == (7, 1)


def test_cache_failure_is_not_cached():
    class Failing(FakeFrontEndForTests):
        def compute(self, samples, sample_rate):
            super().compute(samples, sample_rate)
            raise ValueError("bad clip")
    fe = Failing()
    cache = VoiceCache(fe)
    v = VoiceAudio(np.ones(10, np.float32), 16000)
    for _ in range(2):
        with pytest.raises(ValueError, match="bad clip"):
            cache.get(v)
    assert fe.calls == 2 and len(cache) == 0


def test_voice_key():
    x = np.arange(5, dtype=np.float32)
    assert voice_key(x, 16000) == voice_key(x.copy(), 16000)
    assert voice_key(x, 16000) != voice_key(x, 24000)
    assert voice_key(x, 16000) != voice_key(x[::-1], 16000)


# --------------------------------------------------------------------------------------------------- conds.pt

def test_conds_pt_round_trip_and_official_layout(tmp_path, front_end):
    c = front_end.compute(voice(24000, 3.0), 24000)
    c.emotion_adv = 0.7
    path = tmp_path / "conds.pt"
    save_builtin_voice(c, path)
    raw = torch.load(str(path), weights_only=True)
    assert set(raw) == {"t3", "gen"}
    assert set(raw["t3"]) == {"speaker_emb", "clap_emb", "cond_prompt_speech_tokens", "cond_prompt_speech_emb",
                              "emotion_adv"}
    assert set(raw["gen"]) == {"prompt_token", "prompt_token_len", "prompt_feat", "prompt_feat_len", "embedding"}
    assert raw["t3"]["emotion_adv"].shape == (1, 1, 1) and raw["gen"]["prompt_feat_len"] is None
    assert int(raw["gen"]["prompt_token_len"][0]) == c.gen_prompt_token.shape[1]
    back = load_builtin_voice(path)
    for f in ("speaker_emb", "t3_prompt_tokens", "gen_prompt_token", "gen_prompt_feat", "gen_embedding"):
        assert torch.equal(getattr(back, f), getattr(c, f))
    assert back.emotion_adv == pytest.approx(0.7)


def test_conds_pt_bad_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_builtin_voice(junk)

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"t3": Evil(), "gen": {}}, f, protocol=2)
    with pytest.raises(CheckpointError):          # weights_only loading refuses arbitrary objects
        load_builtin_voice(evil)
    wrong = tmp_path / "wrong.pt"
    torch.save({"t3": {"speaker_emb": torch.zeros(1, 4), "cond_prompt_speech_tokens": torch.zeros(1, 3).long()},
                "gen": {"prompt_token": torch.zeros(1, 5).long(), "prompt_feat": torch.zeros(1, 7, 80),
                        "embedding": torch.zeros(1, 3)}}, str(wrong))
    with pytest.raises(CheckpointError, match="2 mel frames per token"):
        load_builtin_voice(wrong)
