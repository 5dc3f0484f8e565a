"""Chatterbox Turbo on tiny random checkpoints (`tiny-random-turbo`), and the variant seam around it: the variant
recognised from files and repo ids, strict loading errors naming the file, batch-vs-alone equivalence, tags kept
whole through chunking and tokenisation, greedy decoding, Turbo's sampling order, loudness, short references."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from chatterbox_serverless.engine import audio
from chatterbox_serverless.engine.checkpoint import CheckpointError
from chatterbox_serverless.engine.chunking import split_text
from chatterbox_serverless.engine.contract import SynthesisParams, SynthesisRequest, VoiceAudio
from chatterbox_serverless.engine.models.t3 import T3, T3Config
from chatterbox_serverless.engine.pipeline import ChatterboxEngine
from chatterbox_serverless.engine.resolve import resolve_checkpoint
from chatterbox_serverless.engine.sampling import TurboChain, TurboSamplingParams, process_logits_turbo
from chatterbox_serverless.engine.t3_decoder import T3Decoder, T3Request, generate, teacher_force
from chatterbox_serverless.engine.text import TAG, BPETokenizer, GPT2FrontEnd, normalize_text_turbo
from chatterbox_serverless.engine.tiny import TURBO_TAGS, synthetic_voice, write_tiny_checkpoint
from chatterbox_serverless.engine.variants import (ORIGINAL, TURBO, detect_variant, variant_for_files,
                                                   variant_for_repo)


@pytest.fixture(scope="module")
def turbo_dir(tmp_path_factory):
    return resolve_checkpoint("tiny-random-turbo", tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def original_dir(tmp_path_factory):
    return resolve_checkpoint("tiny-random", tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def engine(turbo_dir):
    return ChatterboxEngine(turbo_dir, device="cpu", watermark=False, max_chunk_chars=60)


@pytest.fixture
def damaged(turbo_dir, tmp_path):
    """A fresh copy of the tiny Turbo checkpoint, to damage."""
    return Path(shutil.copytree(turbo_dir, tmp_path / "ckpt"))


@dataclass(frozen=True)
class TurboParams(SynthesisParams):        # the contract's parameters with Turbo's top_k
    top_k: int = 1000


def voice(seconds: float, seed: int = 0) -> VoiceAudio:
    return VoiceAudio(synthetic_voice(seconds=seconds, seed=seed), 24000)


# ------------------------------------------------------------------------------------- variant recognition

def test_variant_is_recognised_from_the_checkpoint_files(turbo_dir, original_dir, tmp_path):
    assert detect_variant(turbo_dir) is TURBO and detect_variant(original_dir) is ORIGINAL
    assert (turbo_dir / "t3_turbo_v1.safetensors").is_file() and (turbo_dir / "s3gen_meanflow.safetensors").is_file()
    assert not (turbo_dir / "tokenizer.json").exists() and (turbo_dir / "vocab.json").is_file()   # the HF layout
    e = ChatterboxEngine(turbo_dir, device="cpu", watermark=False)
    assert e.variant is TURBO and e.t3.cfg.backbone == "gpt2" and e.t3.cfg.conditioning == "prompt"
    assert e.s3gen.flow.config.solver == "meanflow" and e.s3gen.flow.config.n_timesteps == 2
    assert e.voice_variant.startswith("chatterbox:turbo:")
    assert ChatterboxEngine(original_dir, device="cpu", watermark=False).voice_variant.startswith("chatterbox:original:")
    with pytest.raises(CheckpointError, match="not a Chatterbox checkpoint: it has no t3_cfg.safetensors or "
                                              "t3_turbo_v1.safetensors"):
        resolve_checkpoint(str(tmp_path))
    both = Path(shutil.copytree(turbo_dir, tmp_path / "both"))
    shutil.copy(original_dir / "t3_cfg.safetensors", both)
    with pytest.raises(CheckpointError, match="several models"):
        detect_variant(both)


def test_a_turbo_directory_missing_a_file_names_it(damaged):
    (damaged / "s3gen_meanflow.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"s3gen_meanflow\.safetensors missing .*turbo"):
        resolve_checkpoint(str(damaged))


def test_the_text_files_are_either_layout(damaged):
    """vocab.json + merges.txt (the official repo) or one tokenizer.json (the reference dumps); neither: refused."""
    BPETokenizer(damaged).tokenizer.save(str(damaged / "tokenizer.json"))
    (damaged / "merges.txt").unlink()
    assert resolve_checkpoint(str(damaged)) == damaged                   # tokenizer.json is enough
    (damaged / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="merges.txt missing"):
        resolve_checkpoint(str(damaged))


def test_repo_ids_name_their_variant_and_only_its_files_are_downloaded(tmp_path, monkeypatch):
    assert variant_for_repo("ResembleAI/chatterbox-turbo") is TURBO
    assert variant_for_repo("resembleai/Chatterbox") is ORIGINAL and variant_for_repo("someone/else") is None
    assert variant_for_files(["x", "t3_turbo_v1.safetensors"]) is TURBO
    assert variant_for_files(["t3_cfg.safetensors", "t3_turbo_v1.safetensors"]) is None
    patterns = TURBO.download_patterns()
    assert "s3gen.safetensors" not in patterns and "t3_cfg.safetensors" not in patterns
    assert {"t3_turbo_v1.safetensors", "s3gen_meanflow.safetensors", "ve.safetensors", "vocab.json", "merges.txt",
            "added_tokens.json", "tokenizer.json", "conds.pt"} <= set(patterns)
    import huggingface_hub
    calls = []

    def offline(**kwargs):
        calls.append(kwargs)
        raise OSError("no network here")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match=r"could not download 'ResembleAI/chatterbox-turbo' .*--model DIR"):
        resolve_checkpoint("ResembleAI/chatterbox-turbo")
    assert [c["allow_patterns"] for c in calls] == [patterns, patterns]
    assert calls[1].get("local_files_only") is True          # the offline cache is tried


def test_repo_from_the_local_cache_is_used_offline(turbo_dir, monkeypatch):
    import huggingface_hub

    def cached(**kwargs):
        if not kwargs.get("local_files_only"):
            raise OSError("offline")
        return str(turbo_dir)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached)
    assert resolve_checkpoint("ResembleAI/chatterbox-turbo") == turbo_dir


# ------------------------------------------------------------------------------------------- strict loading

def _edit(path: Path, fn) -> None:
    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path))


def test_missing_key_in_the_t3_file_is_named(damaged):
    _edit(damaged / "t3_turbo_v1.safetensors", lambda sd: sd.pop("tfmr.h.1.mlp.c_fc.bias"))
    with pytest.raises(CheckpointError, match=r"t3_turbo_v1\.safetensors.*missing key.*tfmr\.h\.1\.mlp\.c_fc\.bias"):
        ChatterboxEngine(damaged, device="cpu", watermark=False)


def test_unexpected_key_in_the_t3_file_is_named(damaged):
    def add(sd):
        sd["cond_enc.perceiver.pre_attention_query"] = torch.zeros(1, 4, 32)      # the original's conditioning
    _edit(damaged / "t3_turbo_v1.safetensors", add)
    with pytest.raises(CheckpointError, match=r"t3_turbo_v1\.safetensors.*unexpected key.*cond_enc\.perceiver"):
        ChatterboxEngine(damaged, device="cpu", watermark=False)


def test_a_flow_without_the_meanflow_mixer_is_refused_naming_the_file(damaged, original_dir):
    _edit(damaged / "s3gen_meanflow.safetensors",
          lambda sd: sd.pop("flow.decoder.estimator.time_embed_mixer.weight"))
    with pytest.raises(CheckpointError, match=r"s3gen_meanflow\.safetensors.*missing.*time_embed_mixer"):
        ChatterboxEngine(damaged, device="cpu", watermark=False)


def test_the_original_t3_in_turbo_clothes_is_refused(damaged, original_dir):
    shutil.copy(original_dir / "t3_cfg.safetensors", damaged / "t3_turbo_v1.safetensors")
    with pytest.raises(CheckpointError, match=r"t3_turbo_v1\.safetensors.*gpt2/prompt.*missing key"):
        ChatterboxEngine(damaged, device="cpu", watermark=False)


def test_tag_ids_that_disagree_with_the_vocabulary_are_refused(damaged):
    added = json.loads((damaged / "added_tokens.json").read_text())
    added["[laugh]"] += 100
    (damaged / "added_tokens.json").write_text(json.dumps(added))
    with pytest.raises(CheckpointError, match=r"added_tokens\.json: '\[[a-z ]+\]' should have id \d+, the vocab"):
        ChatterboxEngine(damaged, device="cpu", watermark=False)


# ------------------------------------------------------------------------------------ text, tags, chunking

def test_tags_are_one_id_each_wherever_they_stand(turbo_dir):
    fe = GPT2FrontEnd(turbo_dir)
    added = json.loads((turbo_dir / "added_tokens.json").read_text())
    assert sorted(fe.tokenizer.tags) == sorted(TURBO_TAGS)
    for tag in TURBO_TAGS:
        for text in (f"{tag} Hello there.", f"Hello {tag} there.", f"Hello there.{tag}", f"x{tag}y{tag}"):
            ids = fe.encode(fe.normalize(text))
            assert ids.count(added[tag]) == text.count(tag), (tag, text)
            assert fe.tokenizer.decode(ids) == fe.normalize(text)        # nothing lost around it


def test_both_tokenizer_layouts_give_the_same_ids(turbo_dir, tmp_path):
    """vocab.json + merges.txt + added_tokens.json (the official repo) and the same tokenizer as tokenizer.json
    (the reference dumps)."""
    from tokenizers import Tokenizer
    base = BPETokenizer(turbo_dir)
    one = tmp_path / "one"
    one.mkdir()
    base.tokenizer.save(str(one / "tokenizer.json"))
    single = BPETokenizer(one)
    assert single.source == "tokenizer.json" and base.source.startswith("vocab.json")
    for text in ("Hi there, Sarah [chuckle] here!", "[clear throat] Numbers 12,345 and émigré café 😀",
                 "hello<|endoftext|>world", "[unknown] [laugh][laugh]"):
        assert single.encode(text) == base.encode(text) == Tokenizer.from_file(str(one / "tokenizer.json")).encode(text).ids


def test_turbo_normalisation_keeps_its_own_list():
    assert normalize_text_turbo("hello... world; ok - fine") == "Hello... world; ok - fine."   # kept by Turbo
    assert normalize_text_turbo("wait: “yes” — no…") == 'Wait, "yes" - no,'
    assert normalize_text_turbo("[laugh] hi") == "[laugh] hi."


@pytest.mark.parametrize("max_chars", [8, 15, 20, 23, 30, 41, 60])
def test_chunking_never_cuts_a_tag(max_chars):
    text = ("Well [clear throat] this is a long sentence without any stop [laugh] at all and it goes on "
            "[whispering] and on, with [sigh] clauses; and [gasp]more.")
    chunks = split_text(text, max_chars)
    tags = [t for c in chunks for t in TAG.findall(c)]
    assert tags == TAG.findall(text)                                      # every tag whole, in order
    assert not any(ch in TAG.sub("", c) for c in chunks for ch in "[]")   # no half of a tag anywhere
    assert "".join(chunks).replace(" ", "") == text.replace(" ", "")      # nothing lost


def test_tags_survive_the_engine_path(engine):
    """The ids T3 gets for a chunked request hold each tag's id once per tag."""
    added = {t: engine.text.tokenizer.tokenizer.token_to_id(t) for t in TURBO_TAGS}
    text = "[sigh] First part of the text goes here. Second [clear throat] part follows it. [laugh]"
    chunks = engine._plan(0, SynthesisRequest(text, TurboParams(seed=3)))
    assert len(chunks) > 1
    ids = [i for c in chunks for i in c.t3.text_ids]
    for tag in ("[sigh]", "[clear throat]", "[laugh]"):
        assert ids.count(added[tag]) == 1


# --------------------------------------------------------------------------------------- sampling, greedy

def _hf_order(logits: torch.Tensor, history: list[int], t: float, k: int, p: float, penalty: float) -> torch.Tensor:
    """transformers' processors one row at a time, in Turbo's order, written out plainly."""
    x = logits.clone().double().float()
    if t > 0 and t != 1.0:
        x = x / t
    if k > 0:
        kth = torch.topk(x, min(k, x.numel())).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p < 1.0:
        s, idx = torch.sort(x, descending=False)
        cum = s.softmax(-1).cumsum(-1)
        rm = cum <= (1 - p)
        rm[-1] = False
        x = x.masked_fill(rm.scatter(0, idx, rm), float("-inf"))
    if penalty != 1.0:
        ids = torch.tensor(history)
        sc = x.gather(0, ids)
        x = x.scatter(0, ids, torch.where(sc < 0, sc * penalty, sc / penalty))
    return torch.softmax(x, -1)


def test_turbo_chain_is_temperature_top_k_top_p_then_penalty():
    g = torch.Generator().manual_seed(0)
    V = 6563
    logits = torch.randn(4, V, generator=g) * 3
    settings = [(0.8, 1000, 0.95, 1.2), (1.0, 50, 1.0, 1.5), (0.5, 0, 0.7, 1.0), (1.3, 6563, 0.9, 2.0)]
    histories = [[6561], [5, 5, 17], [1, 2, 3], [6561, 40]]
    seen = torch.zeros(4, V, dtype=torch.bool)
    for r, h in enumerate(histories):
        seen[r, h] = True
    params = TurboSamplingParams.from_lists("cpu", temperature=[s[0] for s in settings], top_k=[s[1] for s in settings],
                                            top_p=[s[2] for s in settings], repetition_penalty=[s[3] for s in settings])
    probs = process_logits_turbo(logits, seen, params)
    for r, (s, h) in enumerate(zip(settings, histories)):
        want = _hf_order(logits[r], h, *s)
        assert torch.equal((probs[r] > 0), (want > 0)), r
        assert torch.allclose(probs[r], want, atol=1e-7), r
    # penalty after truncation: a penalised token that top_k removed stays removed
    assert probs[1][logits[1] < torch.topk(logits[1], 50).values[-1]].sum() == 0


def test_history_is_start_then_the_generated_tokens(turbo_dir):
    """The official history: [START] for the first draw, then the tokens drawn so far (START no longer)."""
    m = T3.from_checkpoint(turbo_dir, filename="t3_turbo_v1.safetensors",
                           config=TURBO.architecture(json.loads((turbo_dir / "serverless_config.json").read_text())))
    conds = torch.load(turbo_dir / "conds.pt", weights_only=True)["t3"]
    req = T3Request(text_ids=[5, 6, 7], speaker_emb=conds["speaker_emb"], prompt_tokens=conds["cond_prompt_speech_tokens"],
                    params=TurboParams(temperature=0.9, top_p=1.0, top_k=0, repetition_penalty=3.0, seed=1),
                    max_new_tokens=3)
    forced = [100, 6561, 100]
    res = teacher_force(m, req, forced, chain=TurboChain())
    raw = res.logits[:, 0]
    hist = [[6561], [100], [100, 6561]]
    for s in range(3):
        want = _hf_order(raw[s], hist[s], 0.9, 0, 1.0, 3.0)
        assert torch.allclose(res.probs[s], want, atol=1e-7), s


def test_temperature_zero_is_greedy_and_ignores_the_seed(engine):
    reqs = [SynthesisRequest("Greedy [laugh] words here.", TurboParams(temperature=0.0, seed=s)) for s in (1, 2, 99)]
    out = [r.audio for r in engine.synthesize(reqs)]
    plans = [engine._plan(0, r)[0].t3 for r in reqs]
    tokens = [engine.decoder.run([p])[0].generated for p in plans]
    assert torch.equal(tokens[0], tokens[1]) and torch.equal(tokens[0], tokens[2])
    sampled = engine.decoder.run([engine._plan(0, SynthesisRequest("Greedy [laugh] words here.",
                                                                   TurboParams(temperature=0.8, seed=1)))[0].t3])[0]
    assert not torch.equal(sampled.generated, tokens[0])
    assert len(out[0]) > 0


def test_greedy_is_the_limit_of_the_chain():
    """t -> 0: with top_p < 1 the raw argmax; with top_p = 1 the penalised argmax among the top_k."""
    logits = torch.tensor([[5.0, 4.9, 1.0, -2.0], [5.0, 4.9, 1.0, -2.0]])
    seen = torch.tensor([[True, False, False, False]] * 2)
    params = TurboSamplingParams.from_lists("cpu", temperature=[0.0, 0.0], top_k=[1000, 1000], top_p=[0.95, 1.0],
                                            repetition_penalty=[1.2, 1.2])
    probs = process_logits_turbo(logits, seen, params)
    assert probs.argmax(-1).tolist() == [0, 1] and probs.max(-1).values.tolist() == [1.0, 1.0]
    near = TurboSamplingParams.from_lists("cpu", temperature=[1e-3, 1e-3], top_k=[1000, 1000], top_p=[0.95, 1.0],
                                          repetition_penalty=[1.2, 1.2])
    assert process_logits_turbo(logits, seen, near).argmax(-1).tolist() == [0, 1]


# -------------------------------------------------------------------------------------- batching, caching

def test_a_request_gives_the_same_audio_alone_or_batched(engine):
    reqs = [SynthesisRequest("Hello there [laugh], how are you today?", TurboParams(seed=1)),
            SynthesisRequest("A second, longer request. It is split into chunks [sigh] of sixty characters.",
                             TurboParams(seed=2, temperature=0.6, top_p=0.8, top_k=200, repetition_penalty=1.5)),
            SynthesisRequest("Another voice.", TurboParams(seed=3), voice=voice(6.5, seed=4)),
            SynthesisRequest("Greedy.", TurboParams(seed=4, temperature=0.0), voice=voice(7.0, seed=5))]
    batched = engine.synthesize(reqs)
    assert all(r.error is None for r in batched), [r.error for r in batched]
    for req, got in zip(reqs, batched):
        alone = engine.synthesize([req])[0]
        assert np.array_equal(alone.audio, got.audio)
        assert alone.metrics["speech_tokens"] == got.metrics["speech_tokens"]


def test_t3_tokens_alone_equal_batched_and_the_voice_prefix_is_cached(turbo_dir):
    m = T3.from_checkpoint(turbo_dir, filename="t3_turbo_v1.safetensors",
                           config=TURBO.architecture(json.loads((turbo_dir / "serverless_config.json").read_text())))
    g = torch.Generator().manual_seed(0)
    voices = [(torch.randn(1, m.cfg.speaker_embed_size, generator=g), torch.randint(0, 6561, (1, n), generator=g))
              for n in (40, 25)]
    reqs = [T3Request(text_ids=list(range(3, 3 + n)), speaker_emb=voices[v][0], prompt_tokens=voices[v][1],
                      params=TurboParams(seed=s, temperature=0.0 if s == 3 else 0.8), max_new_tokens=12 + s)
            for s, (v, n) in enumerate([(0, 5), (1, 9), (0, 7), (1, 4)])]
    dec = T3Decoder(m, chain=TurboChain())
    batched = dec.run(reqs)
    assert len(dec.prefix_cache) == 2                                       # one entry per voice
    assert sorted(kv[0][0].shape[1] for kv in dec.prefix_cache.values()) == [1 + 25, 1 + 40]   # speaker + prompt
    for r, b in zip(reqs, batched):
        fresh = T3Decoder(m, chain=TurboChain(), prefix_cache_size=0).run([r])[0]
        assert torch.equal(fresh.generated, b.generated)
    # a request's exaggeration does not split Turbo's cache (Turbo ignores it)
    dec.run([replace(reqs[0], params=replace(reqs[0].params, exaggeration=1.5))])
    assert len(dec.prefix_cache) == 2


def test_cached_steps_equal_one_forward_of_the_whole_row(turbo_dir):
    """Teacher-forced logits == one causal forward over [speaker | prompt | text | START | tokens...]."""
    m = T3.from_checkpoint(turbo_dir, filename="t3_turbo_v1.safetensors",
                           config=TURBO.architecture(json.loads((turbo_dir / "serverless_config.json").read_text())))
    g = torch.Generator().manual_seed(1)
    spk, prompt = torch.randn(1, m.cfg.speaker_embed_size, generator=g), torch.randint(0, 6561, (1, 30), generator=g)
    r = T3Request(text_ids=[7, 8, 9, 10], speaker_emb=spk, prompt_tokens=prompt, params=TurboParams(seed=0),
                  max_new_tokens=5)
    tokens = [17, 4000, 17, 250, 6561]
    forced = teacher_force(m, r, tokens, chain=TurboChain())
    with torch.inference_mode():
        cond = m.conditioning(spk, prompt, torch.zeros(1))[0]
        seq = torch.cat((cond, m.text_emb(torch.tensor(r.text_ids)), m.speech_emb(torch.tensor([6561, *tokens[:-1]]))))
        h = m.tfmr(seq[None], m.tfmr.new_cache(1, seq.shape[0]), slice(0, 1), [0])
        logits = m.logits(h[0, cond.shape[0] + len(r.text_ids):])
    assert torch.allclose(forced.logits[:, 0], logits, atol=1e-5)


def test_gpt2_heads_default_to_64_dimensions():
    """A GPT-2 checkpoint of another width (e.g. GPT-2 small, 768 = 12 x 64) loads without a configuration."""
    cfg = replace(T3Config.tiny_turbo(), hidden_size=128, num_heads=2, head_dim=64)
    sd = T3(cfg).state_dict()
    read = T3Config.from_state_dict(sd, {"backbone": "gpt2", "conditioning": "prompt"})
    assert (read.num_heads, read.head_dim, read.num_layers, read.max_positions) == (2, 64, 2, cfg.max_positions)
    T3.from_state_dict(sd, {"backbone": "gpt2", "conditioning": "prompt"}, what="T3 (t3_turbo_v1.safetensors)")


# ----------------------------------------------------------------------------------------- reference audio

def test_a_reference_of_5_s_or_less_fails_its_request_alone(engine):
    ok, short = engine.synthesize([SynthesisRequest("Fine.", TurboParams(seed=1), voice=voice(6.0)),
                                   SynthesisRequest("Too short.", TurboParams(seed=1), voice=voice(5.0))])
    assert ok.error is None and short.audio is None
    assert "too short (5.00 s)" in short.error and "more than 5 s" in short.error


def test_loudness_matches_pyloudnorm_and_normalises_to_minus_27():
    for sr, expected in ((48000, -3.051680789520695), (24000, -3.063455882076539)):   # pyloudnorm 0.2.0's values
        t = np.arange(sr * 3) / sr
        sine = np.sin(2 * np.pi * 997 * t).astype(np.float32)
        assert abs(audio.integrated_loudness(sine, sr) - expected) < 1e-6
        scaled = audio.normalize_loudness(0.05 * sine, sr)
        assert scaled.dtype == np.float32 and abs(audio.integrated_loudness(scaled, sr) + 27.0) < 1e-4
    quiet = np.full(24000, 1e-6, dtype=np.float32)                         # under the -70 LUFS gate: left alone
    assert audio.integrated_loudness(quiet, 24000) == float("-inf")
    assert audio.normalize_loudness(quiet, 24000) is quiet


def test_turbo_front_end_scales_loudness_before_everything(engine):
    """The same clip at two levels gives the same conditionals (up to float rounding): it is scaled to -27 LUFS
    first; its T3 prompt is Turbo's (up to 15 s / 375 tokens, not the original's 6 s / 150)."""
    clip = synthetic_voice(seconds=6.5, seed=9)
    a = engine.voices.front_end.compute(clip, 24000)
    b = engine.voices.front_end.compute(clip * 0.25, 24000)
    assert torch.allclose(a.gen_prompt_feat, b.gen_prompt_feat, atol=1e-4)
    assert torch.equal(a.t3_prompt_tokens, b.t3_prompt_tokens)
    assert 150 < a.t3_prompt_tokens.shape[1] <= 6.5 * 25 + 1            # all of 6.5 s at 25 tokens/s
