"""Streamed synthesis on the tiny-random checkpoints (original and Turbo): the pieces handed to `on_audio` come in
order while the other chunks still decode, concatenate to exactly the request's final audio, carry the same
tokens as the request unstreamed, and differ from its audio only by the per-piece watermark (float noise without
it). A non-streamed request beside streamed ones gives exactly its audio alone; a failing consumer fails its
request alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from chatterbox_serverless.engine.contract import SynthesisParams, SynthesisRequest
from chatterbox_serverless.engine.pipeline import ChatterboxEngine
from chatterbox_serverless.engine.resolve import resolve_checkpoint

# a short first sentence, then longer ones: chunk 0 finishes decoding steps before the others
TEXT = ("Hi there. " + " ".join(f"Sentence number {i} is quite a bit longer than the first." for i in range(3)))


@pytest.fixture(scope="module")
def original_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return resolve_checkpoint("tiny-random", tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def engine(original_dir):
    return ChatterboxEngine(original_dir, device="cpu", max_chunk_chars=60)          # watermark on, as served


@pytest.fixture(scope="module")
def bare(original_dir):
    return ChatterboxEngine(original_dir, device="cpu", max_chunk_chars=60, watermark=False)


def request(stream: bool, text: str = TEXT, seed: int = 12, rid: str = "r") -> SynthesisRequest:
    return SynthesisRequest(text, SynthesisParams(seed=seed), request_id=rid, stream=stream)


class Recorder:
    """on_audio that keeps the pieces, and whether T3 was still decoding when each arrived."""

    def __init__(self, engine):
        self.engine, self.pieces, self.while_decoding = engine, [], []

    def __call__(self, request_id, seq, samples):
        self.pieces.append((request_id, seq, samples.copy()))
        self.while_decoding.append(self.engine.decoder.busy)


def tokens_seen(engine, monkeypatch) -> dict:
    """Record the speech tokens of every chunk S3Gen vocodes, by (request seed, chunk seed)."""
    seen = {}
    original = engine._s3gen

    def recording(chunks):
        for c in chunks:
            seen[c.seed] = c.tokens.tolist()
        return original(chunks)
    monkeypatch.setattr(engine, "_s3gen", recording)
    return seen


def test_pieces_arrive_in_order_while_decoding_and_concatenate_to_the_final_audio(engine, monkeypatch):
    rec = Recorder(engine)
    plain_tokens = tokens_seen(engine, monkeypatch)
    plain = engine.synthesize([request(False)])[0]
    streamed_tokens = tokens_seen(engine, monkeypatch)
    result = engine.synthesize([request(True)], on_audio=rec)[0]
    assert result.error is None and plain.error is None
    assert [s for _, s, _ in rec.pieces] == list(range(len(rec.pieces))) and len(rec.pieces) == result.metrics["chunks"] == 4
    assert {rid for rid, _, _ in rec.pieces} == {"r"}
    assert rec.while_decoding[0] is True                  # the first piece left while later chunks decoded
    assert np.array_equal(np.concatenate([p for _, _, p in rec.pieces]), result.audio)
    assert result.metrics["stream_pieces"] == 4 and 0 < result.metrics["first_audio_s"]
    assert streamed_tokens == plain_tokens and len(plain_tokens) == 4         # the same tokens, chunk by chunk
    assert result.metrics["speech_tokens"] == plain.metrics["speech_tokens"]
    assert len(result.audio) == len(plain.audio)
    diff = np.abs(result.audio - plain.audio)
    # only the watermark differs (each piece marked alone); the bound measured here is 2.4e-3 (rms 1.6e-5)
    assert diff.max() < 0.01 and np.sqrt(np.mean(diff ** 2)) < 1e-4


def test_without_the_watermark_streamed_audio_is_the_unstreamed_audio_to_float_noise(bare):
    plain = bare.synthesize([request(False)])[0].audio
    rec = Recorder(bare)
    streamed = bare.synthesize([request(True)], on_audio=rec)[0].audio
    # chunks vocoded one at a time instead of two per flow call: float32 rounding only
    assert np.abs(streamed - plain).max() < 1e-6


def test_a_non_streamed_request_beside_streamed_ones_is_exactly_its_audio_alone(engine):
    alone = engine.synthesize([request(False, seed=3, rid="n")])[0]
    rec = Recorder(engine)
    batch = engine.synthesize([request(True, seed=1, rid="s1"), request(False, seed=3, rid="n"),
                               request(True, text="One short sentence only.", seed=2, rid="s2")], on_audio=rec)
    assert all(r.error is None for r in batch)
    assert np.array_equal(batch[1].audio, alone.audio)
    assert {rid for rid, _, _ in rec.pieces} == {"s1", "s2"}
    by = {rid: [p for r, _, p in rec.pieces if r == rid] for rid in ("s1", "s2")}
    assert len(by["s2"]) == 1                                       # one chunk: one piece, when it is done
    for rid, res in (("s1", batch[0]), ("s2", batch[2])):
        assert np.array_equal(np.concatenate(by[rid]), res.audio)


def test_stream_without_a_consumer_is_not_streamed(engine):
    plain = engine.synthesize([request(False)])[0]
    unconsumed = engine.synthesize([request(True)])[0]
    assert np.array_equal(plain.audio, unconsumed.audio) and "stream_pieces" not in unconsumed.metrics


def test_a_consumer_that_raises_fails_its_request_alone(engine):
    def on_audio(request_id, seq, samples):
        if request_id == "bad":
            raise ValueError("the client went away")
    batch = engine.synthesize([request(True, rid="bad"), request(True, seed=5, rid="good")], on_audio=on_audio)
    assert batch[0].error == "the client went away"
    assert batch[1].error is None and len(batch[1].audio) > 0


def test_turbo_streams_too(tmp_path_factory):
    turbo = ChatterboxEngine(resolve_checkpoint("tiny-random-turbo", tmp_path_factory.mktemp("turbo")),
                             device="cpu", max_chunk_chars=60)
    text = "Hello there [laugh], how are you? A second sentence [sigh] that is longer than the first one."
    plain = turbo.synthesize([SynthesisRequest(text, SynthesisParams(seed=2), request_id="t")])[0]
    rec = Recorder(turbo)
    streamed = turbo.synthesize([SynthesisRequest(text, SynthesisParams(seed=2), request_id="t", stream=True)],
                                on_audio=rec)[0]
    assert plain.error is None and streamed.error is None and len(rec.pieces) == 2
    assert np.array_equal(np.concatenate([p for _, _, p in rec.pieces]), streamed.audio)
    assert streamed.metrics["speech_tokens"] == plain.metrics["speech_tokens"]
    assert len(streamed.audio) == len(plain.audio) and np.abs(streamed.audio - plain.audio).max() < 0.01
