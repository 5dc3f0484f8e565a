"""Aborting a request while the engine runs its batch (tiny-random, float32, CPU): T3 drops it at its next decoding
step (its rows retired: `rows_in_use` drops then, and a waiting request takes them), its S3Gen work is skipped,
its result is the error "cancelled", and the other requests of the batch give exactly their audio alone, for the
original and the Turbo variants, in the batch path and the streamed one."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from chatterbox_serverless.engine.contract import SynthesisParams, SynthesisRequest
from chatterbox_serverless.engine.pipeline import ChatterboxEngine
from chatterbox_serverless.engine.resolve import resolve_checkpoint
from chatterbox_serverless.engine.t3_decoder import T3Decoder, T3Request

TEXTS = {"a": "The first request speaks a short sentence.",
         "b": "The second one is going to be cancelled while it decodes.",
         "c": "And a third request, decoded beside the others."}


@pytest.fixture(scope="module", params=["tiny-random", "tiny-random-turbo"])
def engine(request, tmp_path_factory):
    torch.set_num_threads(1)
    return ChatterboxEngine(resolve_checkpoint(request.param, tmp_path_factory.mktemp("data")), device="cpu",
                            dtype="float32")


def req(rid: str, seed: int, stream: bool = False) -> SynthesisRequest:
    return SynthesisRequest(TEXTS[rid], SynthesisParams(seed=seed), request_id=rid, stream=stream)


class AbortAfter:
    """Wraps the engine's decoder.step: after `steps` steps, aborts `rid` from another thread; records the rows in
    use after each step and the step at which the decoder returned the request as aborted."""

    def __init__(self, engine, monkeypatch, rid: str, steps: int):
        self.engine, self.rid, self.steps = engine, rid, steps
        self.rows, self.aborted_at, self.n = [], None, 0
        decoder = engine.decoder
        original = decoder.step

        def step():
            if self.n == self.steps:
                t = threading.Thread(target=engine.abort, args=(rid,))
                t.start()
                t.join()
            out = original()
            self.n += 1
            self.rows.append(decoder.rows_in_use)
            if any(r.request.request_id == rid and r.stop_reason == "aborted" for r in out):
                self.aborted_at = self.n
            return out
        monkeypatch.setattr(decoder, "step", step)


def vocoded(engine, monkeypatch) -> list[str]:
    seen = []
    original = engine._s3gen

    def recording(chunks):
        seen.extend(c.t3.request_id for c in chunks)
        return original(chunks)
    monkeypatch.setattr(engine, "_s3gen", recording)
    return seen


@pytest.mark.parametrize("stream", [False, True])
def test_an_aborted_request_stops_at_the_next_step_and_the_others_are_unchanged(engine, monkeypatch, stream):
    alone = {rid: engine.synthesize([req(rid, seed)])[0] for rid, seed in (("a", 1), ("c", 3))}
    rows_per = engine.decoder.chain.rows_needed(SynthesisParams())
    spy = AbortAfter(engine, monkeypatch, "b", steps=4)
    s3gen = vocoded(engine, monkeypatch)
    pieces = []
    out = engine.synthesize([req("a", 1, stream), req("b", 2, stream), req("c", 3, stream)],
                            on_audio=(lambda rid, seq, x: pieces.append(rid)) if stream else None)
    assert spy.aborted_at == 5                          # the first step after the abort
    assert spy.rows[3] == 3 * rows_per and spy.rows[4] == 2 * rows_per     # its rows freed at that step
    assert out[1].error == "cancelled" and out[1].audio is None
    assert "b" not in s3gen and "b" not in pieces
    for i, rid in ((0, "a"), (2, "c")):
        assert out[i].error is None
        assert np.array_equal(out[i].audio, alone[rid].audio)
    # the abort does not outlive the batch: the same id runs normally afterwards
    again = engine.synthesize([req("b", 2)])[0]
    assert again.error is None and len(again.audio) > 0


def test_the_decoder_frees_the_rows_and_a_waiting_request_takes_them(engine):
    t3, chain = engine.t3, engine.parts.chain
    conds = engine.builtin_voice
    rows_per = chain.rows_needed(SynthesisParams())

    def t3req(rid, seed):
        return T3Request(text_ids=engine.text.encode(engine.text.normalize(TEXTS["a"])),
                         speaker_emb=conds.speaker_emb, prompt_tokens=conds.t3_prompt_tokens,
                         params=SynthesisParams(seed=seed), max_new_tokens=60, request_id=rid)

    alone = T3Decoder(t3, max_rows=2 * rows_per, chain=chain).run([t3req("x", 1)])[0]
    dec = T3Decoder(t3, max_rows=2 * rows_per, chain=chain)     # room for two: "w" waits
    x, y, w = t3req("x", 1), t3req("y", 2), t3req("w", 4)
    for r in (x, y, w):
        dec.submit(r)
    results = {}
    for _ in range(3):
        results.update((r.request.request_id, r) for r in dec.step())
    assert dec.rows_in_use == 2 * rows_per and list(dec.waiting) == [w]
    dec.abort("y")
    out = dec.step()
    assert [(r.request.request_id, r.stop_reason) for r in out if r.stop_reason == "aborted"] == [("y", "aborted")]
    assert len(out[0].generated) == 3 and out[0].speech_tokens.numel() == 0
    assert not dec.waiting and dec.rows_in_use == 2 * rows_per        # "w" admitted into the freed rows
    while dec.busy:
        results.update((r.request.request_id, r) for r in dec.step())
    assert torch.equal(results["x"].generated, alone.generated)
    assert results["w"].stop_reason in ("eos", "max_new_tokens")
