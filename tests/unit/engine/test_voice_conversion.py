"""Voice conversion (engine/vc.py) on tiny random weights: conversion, batching, isolation, seeds, targets,
watermark, loading. Parity with the official ChatterboxVC on full-size weights: `run_vc_parity` on a
`dump_reference.py --model vc` dump (tests/system)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from chatterbox_serverless.engine.checkpoint import CheckpointError
from chatterbox_serverless.engine.conditioning import VoiceFrontEnd, save_builtin_voice
from chatterbox_serverless.engine.contract import PreparedVoice, SynthesisParams, SynthesisRequest, VoiceAudio
from chatterbox_serverless.engine.resolve import resolve_checkpoint
from chatterbox_serverless.engine.tiny import synthetic_voice
from chatterbox_serverless.engine.vc import (TargetFrontEnd, VoiceConversionEngine, is_vc_checkpoint,
                                             load_target_voice, load_vc_engine, make_tiny_vc)
from chatterbox_serverless.engine.watermark import Watermarker

SAMPLES_PER_TOKEN = 960     # 40 ms at 24 kHz


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_vc(tmp_path_factory.mktemp("vc") / "tiny-vc")


@pytest.fixture(scope="module")
def engine(ckpt):
    return load_vc_engine(ckpt, device="cpu", watermark=False)


def source(seconds=1.2, sr=16000, seed=3):
    return VoiceAudio(synthetic_voice(sr, seconds, seed=seed), sr)


def target(seconds=2.0, sr=24000, seed=5):
    return VoiceAudio(synthetic_voice(sr, seconds, seed=seed), sr)


def convert(engine, **kw):
    (res,) = engine.synthesize([SynthesisRequest("", **kw)])
    assert res.error is None, res.error
    return res


def test_converts_to_the_length_of_the_source(engine):
    assert engine.model == "chatterbox-vc" and engine.sample_rate == 24000
    for seconds, sr in ((1.2, 16000), (2.0, 44100)):
        res = convert(engine, source=source(seconds, sr))
        n = res.metrics["speech_tokens"]
        assert abs(n - 25 * seconds) <= 1                       # 25 S3 tokens a second, any input rate
        assert res.audio.shape == (n * SAMPLES_PER_TOKEN,) and res.audio.dtype == np.float32
        assert np.isfinite(res.audio).all() and np.abs(res.audio).max() > 0
        assert res.metrics["audio_seconds"] == pytest.approx(n * 0.04)


def test_batch_gives_what_each_request_gives_alone(engine):
    reqs = [SynthesisRequest("", source=source(1.0, seed=1), request_id="a"),
            SynthesisRequest("", SynthesisParams(seed=9), source=source(1.6, 22050, seed=2), voice=target()),
            SynthesisRequest("", source=source(0.8, seed=4), voice=target(seed=6))]
    together = engine.synthesize(reqs)
    for req, res in zip(reqs, together):
        alone = engine.synthesize([req])[0]
        assert res.error is None and alone.error is None
        np.testing.assert_array_equal(res.audio, alone.audio)   # bit-identical on CPU (S3Gen per request)
        assert res.metrics["batch_size"] == 3


def test_bad_requests_fail_alone_with_clear_errors(engine):
    nan_source = VoiceAudio(np.full(16000, np.nan, np.float32), 16000)
    reqs = [SynthesisRequest("hello"),                                             # no source
            SynthesisRequest("", source=source(0.2)),                              # too short
            SynthesisRequest("", source=nan_source),
            SynthesisRequest("", source=source(), voice=VoiceAudio(np.zeros(24000, np.float32), 24000)),  # silent
            SynthesisRequest("", source=source()),
            SynthesisRequest("", source=source(), voice=PreparedVoice("chatterbox:original:x", b"..."))]
    res = engine.synthesize(reqs)
    assert "source" in res[0].error and "speech to convert" in res[0].error
    assert "too short" in res[1].error
    assert "NaN" in res[2].error
    assert "silent" in res[3].error
    assert res[4].error is None and len(res[4].audio) > 0
    assert "another model variant" in res[5].error
    assert all(r.audio is None for i, r in enumerate(res) if i != 4)


def test_too_long_a_source_is_refused(ckpt):
    short_bound = VoiceConversionEngine(ckpt, device="cpu", watermark=False, max_source_seconds=1.0)
    res = short_bound.synthesize([SynthesisRequest("", source=source(1.5)), SynthesisRequest("", source=source(0.9))])
    assert "too long" in res[0].error and "1 s" in res[0].error
    assert res[1].error is None


def test_same_seed_same_audio_other_seed_other_audio(engine):
    a = convert(engine, source=source(), params=SynthesisParams(seed=7))
    b = convert(engine, source=source(), params=SynthesisParams(seed=7))
    c = convert(engine, source=source(), params=SynthesisParams(seed=8))
    assert a.audio.tobytes() == b.audio.tobytes()
    assert not np.array_equal(a.audio, c.audio)


def test_target_by_clip_by_prepared_voice_and_default(engine, ckpt):
    default = convert(engine, source=source()).audio
    by_clip = convert(engine, source=source(), voice=target()).audio
    assert not np.array_equal(default, by_clip)
    prepared = engine.prepare_voice(target())
    assert prepared.variant == engine.voice_variant and prepared.variant.startswith("chatterbox:vc:")
    np.testing.assert_array_equal(convert(engine, source=source(), voice=prepared).audio, by_clip)
    # the default target is conds.pt's gen part: the same as giving its tensors
    builtin = load_target_voice(ckpt / "conds.pt")
    assert torch.equal(engine.builtin_voice.prompt_feat, builtin.prompt_feat)


def test_target_front_end_is_the_tts_front_ends_s3gen_part(tmp_path):
    """The VC target of a clip equals the gen_* conditionals the TTS front end computes from it (same networks)."""
    ckpt = resolve_checkpoint("tiny-random", tmp_path)
    tts = VoiceFrontEnd.load(ckpt)
    vc = TargetFrontEnd(tts.tokenizer, tts.speaker_encoder)
    for seconds, sr in ((3.0, 24000), (12.5, 44100)):          # shorter and longer than the 10 s used
        clip = synthetic_voice(sr, seconds, seed=11)
        with torch.inference_mode():
            a, b = tts.compute(clip, sr), vc.compute(clip, sr)
        assert torch.equal(a.gen_prompt_token, b.prompt_token)
        assert torch.equal(a.gen_prompt_feat, b.prompt_feat)
        assert torch.equal(a.gen_embedding, b.embedding)


def test_watermark_is_applied(ckpt, engine):
    marked = VoiceConversionEngine(ckpt, device="cpu", watermark=True)
    a = convert(marked, source=source(), params=SynthesisParams(seed=3)).audio
    b = convert(engine, source=source(), params=SynthesisParams(seed=3)).audio
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, Watermarker().apply(b, 24000))


def test_abort_cancels_the_request_before_its_s3gen(engine):
    engine.abort("x")          # held until the batch that holds it returns
    res = engine.synthesize([SynthesisRequest("", source=source(), request_id="x"),
                             SynthesisRequest("", source=source(), request_id="y")])
    assert res[0].error == "cancelled" and res[1].error is None
    assert engine.synthesize([SynthesisRequest("", source=source(), request_id="x")])[0].error is None


def test_the_original_checkpoint_serves_vc(tmp_path):
    ckpt = resolve_checkpoint("tiny-random", tmp_path)
    assert not is_vc_checkpoint(ckpt)
    res = convert(load_vc_engine(ckpt, device="cpu", watermark=False), source=source())
    assert len(res.audio) == res.metrics["speech_tokens"] * SAMPLES_PER_TOKEN


def test_loading_errors_name_the_file(ckpt, tmp_path):
    assert is_vc_checkpoint(ckpt)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not is_vc_checkpoint(empty)
    with pytest.raises(CheckpointError, match="s3gen.safetensors is missing"):
        load_vc_engine(empty, device="cpu", watermark=False)

    extra = tmp_path / "extra"
    shutil.copytree(ckpt, extra)
    sd = load_file(str(extra / "s3gen.safetensors"))
    sd["flow.unexpected.weight"] = torch.zeros(2)
    save_file(sd, str(extra / "s3gen.safetensors"))
    with pytest.raises(CheckpointError, match=r"s3gen\.safetensors.*unexpected key.*flow\.unexpected\.weight"):
        load_vc_engine(extra, device="cpu", watermark=False)

    bad_conds = tmp_path / "bad-conds"
    shutil.copytree(ckpt, bad_conds)
    torch.save({"t3": {}}, str(bad_conds / "conds.pt"))
    with pytest.raises(CheckpointError, match=r"conds\.pt.*'gen'"):
        load_vc_engine(bad_conds, device="cpu", watermark=False)


def test_without_conds_a_request_must_bring_a_target(ckpt, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(ckpt, bare)
    (bare / "conds.pt").unlink()
    engine = load_vc_engine(bare, device="cpu", watermark=False)
    res = engine.synthesize([SynthesisRequest("", source=source()), SynthesisRequest("", source=source(), voice=target())])
    assert "voice" in res[0].error and "reference audio" in res[0].error
    assert res[1].error is None


def test_conds_pt_of_the_original_layout_is_read(ckpt, tmp_path, engine):
    """An original-layout conds.pt ({'t3', 'gen'}) gives the same default target as the VC layout ({'gen'})."""
    from chatterbox_serverless.engine.conditioning import VoiceConditionals
    t = load_target_voice(ckpt / "conds.pt")
    conds = VoiceConditionals(torch.zeros(1, 256), torch.zeros(1, 10, dtype=torch.long), t.prompt_token,
                              t.prompt_feat, t.embedding)
    save_builtin_voice(conds, tmp_path / "conds.pt")
    u = load_target_voice(tmp_path / "conds.pt")
    assert torch.equal(t.prompt_token, u.prompt_token) and torch.equal(t.prompt_feat, u.prompt_feat)
    assert torch.equal(t.embedding, u.embedding)


def test_the_batched_path_is_the_per_request_path_within_float_noise(ckpt, engine):
    """s3gen_per_request=False (CUDA's default): the whole batch in one S3Gen call per flow group; on CPU a
    request's audio moves only by float rounding (speech_to_wav's docstring), and a bad request still fails alone."""
    batched = VoiceConversionEngine(ckpt, device="cpu", watermark=False, s3gen_per_request=False, max_flow_batch=None)
    reqs = [SynthesisRequest("", source=source(1.0, seed=1)), SynthesisRequest("hi"),
            SynthesisRequest("", SynthesisParams(seed=9), source=source(1.3, seed=2))]   # one flow call for both
    res = batched.synthesize(reqs)
    assert res[1].error and res[0].error is None and res[2].error is None
    for req, r in zip(reqs[::2], res[::2]):
        alone = engine.synthesize([req])[0]
        np.testing.assert_allclose(r.audio, alone.audio, atol=1e-5)


def test_load_vc_engine_takes_the_tts_engines_options(ckpt):
    e = load_vc_engine(ckpt, device="cpu", watermark=False, max_chunk_chars=100, max_rows=4, max_flow_batch=1)
    assert e.max_flow_batch == 1
    with pytest.raises(TypeError):
        load_vc_engine(ckpt, device="cpu", watermark=False, no_such_option=1)


def test_model_specs_load_the_voice_conversion_engine(tmp_path):
    """`--model tiny-random-vc`, `vc=DIR` and a directory holding S3Gen alone all load VoiceConversionEngine."""
    from chatterbox_serverless.engine.pipeline import load_engine
    from chatterbox_serverless.engine.vc import VoiceConversionEngine
    tiny = load_engine("tiny-random-vc", data_dir=tmp_path, device="cpu")
    assert isinstance(tiny, VoiceConversionEngine) and tiny.model == "chatterbox-vc"
    for spec in (f"vc={tmp_path / 'tiny-random-vc'}", str(tmp_path / "tiny-random-vc")):
        assert isinstance(load_engine(spec, data_dir=tmp_path, device="cpu"), VoiceConversionEngine)
