"""Library voices at the engine: `prepare_voice` serialises the conditionals a clip gives, a request carrying them
(PreparedVoice) speaks exactly as the clip given as reference audio, and the bytes are checked."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from chatterbox_serverless.engine.conditioning import (VoiceConditionals, conditionals_from_bytes,
                                                       conditionals_to_bytes)
from chatterbox_serverless.engine.contract import PreparedVoice, SynthesisParams, SynthesisRequest, VoiceAudio

pipeline = pytest.importorskip("chatterbox_serverless.engine.pipeline")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    torch.set_num_threads(1)
    return pipeline.load_engine("tiny-random", data_dir=tmp_path_factory.mktemp("tiny"), device="cpu")


def clip(seed: int = 0) -> VoiceAudio:
    rng = np.random.default_rng(seed)
    return VoiceAudio((0.2 * rng.standard_normal(24000 * 2)).astype(np.float32), 24000)


def test_serialised_conditionals_round_trip_exactly():
    g = torch.Generator().manual_seed(0)
    conds = VoiceConditionals(torch.randn(1, 256, generator=g), torch.randint(0, 6561, (1, 37), generator=g),
                              torch.randint(0, 6561, (1, 50), generator=g), torch.randn(1, 101, 80, generator=g),
                              torch.randn(1, 192, generator=g), emotion_adv=0.7)
    back = conditionals_from_bytes(conditionals_to_bytes(conds))
    for name in ("speaker_emb", "t3_prompt_tokens", "gen_prompt_token", "gen_prompt_feat", "gen_embedding"):
        a, b = getattr(conds, name), getattr(back, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert back.emotion_adv == 0.7
    with pytest.raises(ValueError, match="unreadable"):
        conditionals_from_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match="unreadable"):
        conditionals_from_bytes(conditionals_to_bytes(conds)[:100])


def test_a_prepared_voice_speaks_as_its_clip(engine):
    voice = clip()
    prepared = engine.prepare_voice(voice)
    assert prepared.variant == engine.voice_variant and prepared.variant.startswith("chatterbox:")
    params = SynthesisParams(seed=3)
    a, b, c = engine.synthesize([SynthesisRequest("Hello there.", params, voice=voice),
                                 SynthesisRequest("Hello there.", params, voice=prepared),
                                 SynthesisRequest("Hello there.", params, voice=engine.prepare_voice(clip(1)))])
    assert a.error is None and b.error is None and c.error is None
    assert np.array_equal(a.audio, b.audio)
    assert not (len(a.audio) == len(c.audio) and np.array_equal(a.audio, c.audio))   # another clip: another voice


def test_another_variants_conditionals_fail_their_request_alone(engine):
    prepared = engine.prepare_voice(clip())
    ok, wrong, garbage = engine.synthesize([
        SynthesisRequest("Hi.", voice=prepared), SynthesisRequest("Hi.", voice=PreparedVoice("other:1", prepared.data)),
        SynthesisRequest("Hi.", voice=PreparedVoice(engine.voice_variant, b"not safetensors"))])
    assert ok.error is None
    assert "another model variant" in wrong.error
    assert "unreadable" in garbage.error
