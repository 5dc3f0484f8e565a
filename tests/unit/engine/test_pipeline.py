"""The whole engine on a tiny random checkpoint: batching, isolation, determinism, long text."""
import numpy as np
import pytest

from chatterbox_serverless.engine.checkpoint import CheckpointError
from chatterbox_serverless.engine.resolve import resolve_checkpoint
from chatterbox_serverless.engine.pipeline import ChatterboxEngine, chunk_seed
from chatterbox_serverless.engine.contract import SynthesisParams, SynthesisRequest, VoiceAudio


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return resolve_checkpoint("tiny-random", tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def engine(ckpt):
    return ChatterboxEngine(ckpt, device="cpu", watermark=False, max_chunk_chars=60)


def voice(freq=220.0, seconds=2.0, sr=16000):
    t = np.arange(int(sr * seconds)) / sr
    return VoiceAudio((0.3 * np.sin(2 * np.pi * freq * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32), sr)


def test_batch_gives_what_each_request_gives_alone(engine):
    reqs = [SynthesisRequest("Hello there."),
            SynthesisRequest("Hi!", SynthesisParams(seed=3, cfg_weight=0.0, temperature=0.5)),
            SynthesisRequest("Another voice speaks here.", SynthesisParams(exaggeration=1.5), voice=voice())]
    together = engine.synthesize(reqs)
    for req, res in zip(reqs, together):
        alone = engine.synthesize([req])[0]
        assert res.error is None and alone.error is None
        assert res.metrics["speech_tokens"] == alone.metrics["speech_tokens"]
        assert res.audio.shape == alone.audio.shape
        np.testing.assert_array_equal(res.audio, alone.audio)      # bit-identical on CPU (S3Gen per request)
        assert res.audio.dtype == np.float32 and len(res.audio) > 0


def test_same_seed_same_bytes_other_seed_other_audio(engine):
    req = SynthesisRequest("Same seed, same audio.", SynthesisParams(seed=7))
    a, b = engine.synthesize([req])[0], engine.synthesize([req])[0]
    assert a.audio.tobytes() == b.audio.tobytes()
    c = engine.synthesize([SynthesisRequest("Same seed, same audio.", SynthesisParams(seed=8))])[0]
    assert c.audio.shape != a.audio.shape or not np.array_equal(c.audio, a.audio)


def test_a_failing_request_fails_alone(engine):
    bad_voice = VoiceAudio(np.full(16000, np.nan, dtype=np.float32), 16000)
    res = engine.synthesize([SynthesisRequest("Fine."), SynthesisRequest("Broken voice.", voice=bad_voice),
                             SynthesisRequest("Also fine.")])
    assert res[0].error is None and res[2].error is None
    assert res[1].audio is None and res[1].error


def test_voice_cache_hits_for_the_same_clip(engine):
    v = voice(330.0)
    before = engine.voices.stats()
    engine.synthesize([SynthesisRequest("One.", voice=v), SynthesisRequest("Two.", voice=v)])
    after = engine.voices.stats()
    assert after["misses"] == before["misses"] + 1
    assert after["hits"] >= before["hits"] + 1


def test_long_text_is_chunked_and_joined(engine):
    text = " ".join(f"Sentence {i} is here." for i in range(12))        # ~250 chars, chunks of <= 60
    res = engine.synthesize([SynthesisRequest(text)])[0]
    assert res.error is None
    assert res.metrics["chunks"] >= 4
    # one continuous clip: 480 samples per mel frame, 2 frames per token, minus one crossfade per boundary
    fade = int(0.05 * engine.sample_rate)
    expected = res.metrics["speech_tokens"] * 960 - (res.metrics["chunks"] - 1) * fade
    assert len(res.audio) == expected


def test_chunk_seeds_are_distinct_and_first_is_the_request_seed():
    assert chunk_seed(42, 0) == 42
    assert len({chunk_seed(42, k) for k in range(50)}) == 50


def test_missing_model_is_one_clear_sentence(tmp_path):
    with pytest.raises(CheckpointError, match="not a Chatterbox checkpoint"):
        resolve_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match="--model"):
        resolve_checkpoint("no-such-thing")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "absent"))


def test_hub_download_failure_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="could not download .*--model DIR"):
        resolve_checkpoint("ResembleAI/chatterbox")


def test_watermark_on_by_default(ckpt):
    e = ChatterboxEngine(ckpt, device="cpu", max_chunk_chars=60)
    assert e.watermarker is not None
    res = e.synthesize([SynthesisRequest("Watermarked.")])[0]
    assert res.error is None and len(res.audio) > 0


def test_bfloat16_runs_on_cpu_and_float16_is_refused(ckpt):
    e = ChatterboxEngine(ckpt, device="cpu", dtype="bfloat16", watermark=False)
    res = e.synthesize([SynthesisRequest("Half precision.")])[0]
    assert res.error is None and np.isfinite(res.audio).all() and len(res.audio) > 0
    assert e.s3gen.flow.decoder.estimator.attention in ("sdpa", "sliced")     # measured at load
    with pytest.raises(ValueError, match="float16"):
        ChatterboxEngine(ckpt, device="cpu", dtype="float16")


def test_flow_attention_kernels_give_the_same_audio(ckpt, engine):
    assert engine.s3gen.flow.decoder.estimator.attention == "sdpa"       # float32: the exact kernel
    sliced = ChatterboxEngine(ckpt, device="cpu", watermark=False, max_chunk_chars=60, flow_attention="sliced")
    assert sliced.s3gen.flow.decoder.estimator.attention == "sliced"
    reqs = [SynthesisRequest("Sliced attention.", SynthesisParams(seed=4)), SynthesisRequest("Two.")]
    for a, b in zip(engine.synthesize(reqs), sliced.synthesize(reqs)):
        assert a.error is None and b.error is None
        np.testing.assert_allclose(a.audio, b.audio, atol=1e-4)


def test_models_loaded_under_inference_mode_still_run(ckpt):
    import torch
    with torch.inference_mode():
        e = ChatterboxEngine(ckpt, device="cpu", watermark=False)
        res = e.synthesize([SynthesisRequest("Loaded in inference mode.")])[0]
    assert res.error is None and len(res.audio) > 0


def test_t3_prefix_cache_outlives_a_batch(engine):
    engine.synthesize([SynthesisRequest("First batch.")])
    decoder = engine.decoder
    assert len(decoder.prefix_cache) >= 1          # the built-in voice's prefix is kept for the next batch
    engine.synthesize([SynthesisRequest("Second batch.")])
    assert engine.decoder is decoder and not decoder.busy


def test_compiled_t3_gives_the_same_speech(ckpt, engine):
    compiled = ChatterboxEngine(ckpt, device="cpu", watermark=False, max_chunk_chars=60, compile=True)
    assert compiled.t3.tfmr._compiled_layers is not None        # compiled (and warmed up) when loaded
    reqs = [SynthesisRequest("Compiled decoding.", SynthesisParams(seed=4)),
            SynthesisRequest("Two requests, so two rows or more.", SynthesisParams(seed=5))]
    for a, b in zip(engine.synthesize(reqs), compiled.synthesize(reqs)):
        assert a.error is None and b.error is None
        assert a.metrics["speech_tokens"] == b.metrics["speech_tokens"]
        np.testing.assert_allclose(a.audio, b.audio, atol=1e-4)


def test_engine_options_read_compile_from_flag_or_environment(monkeypatch):
    import argparse
    from chatterbox_serverless.engine.options import add_engine_arguments

    def parse(*argv):
        p = argparse.ArgumentParser()
        add_engine_arguments(p)
        return p.parse_args(list(argv))
    monkeypatch.delenv("CHATTERBOX_COMPILE", raising=False)
    assert parse().compile is False and parse("--compile").compile is True
    monkeypatch.setenv("CHATTERBOX_COMPILE", "1")
    assert parse().compile is True
