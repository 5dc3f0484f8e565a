"""Temperature 0 = greedy decoding: the argmax after CFG and the repetition penalty, per row of a batch."""
import pytest
import torch

from chatterbox_serverless.engine.models.t3 import T3
from chatterbox_serverless.engine.sampling import (
    SamplingParams, apply_cfg, apply_repetition_penalty, process_logits, sample)
from chatterbox_serverless.engine.t3_decoder import T3Decoder, T3Request
from chatterbox_serverless.engine.tiny import write_tiny_checkpoint
from chatterbox_serverless.engine.contract import SynthesisParams, SynthesisRequest

EOS, BOS = 6562, 6561


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-random")


@pytest.fixture(scope="module")
def t3(ckpt):
    return T3.from_checkpoint(ckpt)


def params(n, **kw):
    base = dict(cfg_weight=[0.5] * n, repetition_penalty=[1.2] * n, temperature=[0.8] * n, min_p=[0.05] * n,
                top_p=[1.0] * n)
    base.update(kw)
    return SamplingParams.from_lists("cpu", **base)


def test_temperature_zero_is_a_point_mass_on_the_penalised_cfg_argmax_and_leaves_other_rows_alone():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 50, generator=g) * 3, torch.randn(3, 50, generator=g) * 3
    seen = torch.rand(3, 50, generator=g) < 0.2
    p = params(3, temperature=[0.0, 0.8, 1.3], top_p=[0.5, 0.9, 1.0], min_p=[0.3, 0.05, 0.0])
    probs = process_logits(cond, uncond, seen, p)
    assert torch.isfinite(probs).all()
    expected = apply_repetition_penalty(apply_cfg(cond, uncond, p.cfg_weight), seen, p.repetition_penalty).argmax(-1)
    one_hot = torch.zeros(50)
    one_hot[expected[0]] = 1.0
    assert torch.equal(probs[0], one_hot)
    # rows with temperature > 0 are exactly what they are in a batch without a greedy row
    rest = process_logits(cond[1:], uncond[1:], seen[1:],
                          params(2, temperature=[0.8, 1.3], top_p=[0.9, 1.0], min_p=[0.05, 0.0]))
    assert torch.equal(probs[1:], rest)


def test_greedy_rows_take_the_argmax_and_draw_nothing():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(2, 30, generator=g), -1)
    probs[0] = 0
    probs[0, 17] = 1
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    state = gens[0].get_state()
    out = sample(probs, gens, greedy=torch.tensor([True, False]))
    assert out[0].item() == 17
    assert torch.equal(gens[0].get_state(), state)                    # no random draw for the greedy row
    assert out[1].item() == torch.multinomial(probs[1:], 1, generator=torch.Generator().manual_seed(6)).item()


@pytest.fixture(scope="module")
def voice(ckpt):
    from chatterbox_serverless.engine.conditioning import load_builtin_voice
    return load_builtin_voice(ckpt / "conds.pt")


def request(voice, text, temperature, seed, **kw):
    return T3Request(text_ids=[ord(c) % 90 + 7 for c in text], speaker_emb=voice.speaker_emb,
                     prompt_tokens=voice.t3_prompt_tokens, max_new_tokens=20, record=True,
                     params=SynthesisParams(temperature=temperature, seed=seed, **kw))


def by_hand_argmax(res, cfg_weight, penalty):
    """The greedy tokens recomputed from the recorded raw logits: CFG, repetition penalty over the history
    (BOS included), argmax."""
    seen = torch.zeros(1, res.logits.shape[-1], dtype=torch.bool)
    seen[0, BOS] = True
    out = []
    for step in range(res.logits.shape[0]):
        c, u = res.logits[step, 0][None], res.logits[step, -1][None]
        l = apply_cfg(c, u, torch.tensor([cfg_weight]))
        l = apply_repetition_penalty(l, seen, torch.tensor([penalty]))
        tok = int(l.argmax(-1))
        out.append(tok)
        seen[0, tok] = True
    return out


def test_a_batch_mixing_greedy_and_sampled_rows_decodes_and_each_row_equals_itself_alone(t3, voice):
    greedy = request(voice, "Greedy row.", 0.0, seed=1)
    greedy_other_seed = request(voice, "Greedy row.", 0.0, seed=99)
    hot = request(voice, "A sampled row here.", 0.8, seed=2)
    hotter = request(voice, "Another one", 1.5, seed=3, top_p=0.9, min_p=0.1, cfg_weight=0.0)
    together = T3Decoder(t3, max_rows=16).run([hot, greedy, hotter, greedy_other_seed])
    alone = [T3Decoder(t3).run([r])[0] for r in (hot, greedy, hotter, greedy_other_seed)]
    for a, b in zip(together, alone):
        assert a.generated.tolist() == b.generated.tolist()
        assert torch.isfinite(a.probs).all()
    g = together[1]
    assert g.generated.tolist() == by_hand_argmax(g, 0.5, 1.2)
    assert torch.equal(g.probs.amax(-1), torch.ones(len(g.generated)))      # a point mass every step
    assert g.generated.tolist() == together[3].generated.tolist()             # greedy: the seed does not matter
    assert len(set(together[0].generated.tolist())) > 1                        # the sampled row still samples


def test_temperature_zero_synthesizes_through_the_pipeline(ckpt):
    from chatterbox_serverless.engine.pipeline import ChatterboxEngine
    engine = ChatterboxEngine(ckpt, device="cpu", watermark=False)
    reqs = [SynthesisRequest("Greedy please.", SynthesisParams(temperature=0.0, seed=4)),
            SynthesisRequest("Sampled please.", SynthesisParams(temperature=0.8, seed=4))]
    first, second = engine.synthesize(reqs), engine.synthesize(reqs)
    for a, b in zip(first, second):
        assert a.error is None and b.error is None and len(a.audio) > 0
        assert a.audio.tobytes() == b.audio.tobytes()
