"""Chatterbox Multilingual on the tiny random checkpoint (`tiny-random-multilingual`): the variant recognised from
files and `--model` specs, strict loading of the torch-saved files, the language in the text front-end (token,
validation, Korean jamo, the packages of other languages), non-Latin sentence splitting, batch-vs-alone
equivalence, and the alignment analyser's stopping on constructed cases."""
from __future__ import annotations

import dataclasses
import shutil
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from chatterbox_serverless.engine import catalog
from chatterbox_serverless.engine.alignment import AlignmentAnalyzer, apply_decisions
from chatterbox_serverless.engine.checkpoint import CheckpointError
from chatterbox_serverless.engine.chunking import split_text
from chatterbox_serverless.engine.contract import SynthesisParams, SynthesisRequest
from chatterbox_serverless.engine.models.t3 import T3
from chatterbox_serverless.engine.pipeline import ChatterboxEngine
from chatterbox_serverless.engine.resolve import resolve_checkpoint
from chatterbox_serverless.engine.t3_decoder import T3Decoder, T3Request
from chatterbox_serverless.engine.text_multilingual import (MultilingualFrontEnd, decompose_hangul,
                                                            normalize_text_multilingual)
from chatterbox_serverless.engine.variants import (MULTILINGUAL, ORIGINAL, VARIANTS, detect_variant,
                                                   variant_for_files, variant_for_repo)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def mtl_dir(data):
    return resolve_checkpoint("tiny-random-multilingual", data)


@pytest.fixture(scope="module")
def original_dir(data):
    return resolve_checkpoint("tiny-random", data)


@pytest.fixture(scope="module")
def engine(mtl_dir):
    return ChatterboxEngine(mtl_dir, device="cpu", watermark=False, max_chunk_chars=60)


@pytest.fixture(scope="module")
def front(mtl_dir):
    return MultilingualFrontEnd(mtl_dir)


@pytest.fixture
def damaged(mtl_dir, tmp_path):
    return Path(shutil.copytree(mtl_dir, tmp_path / "ckpt"))


# ------------------------------------------------------------------------------------------- the variant

def test_variant_from_files_and_specs(mtl_dir, original_dir, data, tmp_path):
    assert detect_variant(mtl_dir) is MULTILINGUAL
    assert {p.name for p in mtl_dir.iterdir()} >= {"ve.pt", "s3gen.pt", "t3_mtl23ls_v2.safetensors", "conds.pt",
                                                  "grapheme_mtl_merged_expanded_v1.json", "Cangjie5_TC.json"}
    assert all(catalog.API_MODELS[v.name] == v.api_model for v in VARIANTS.values())
    assert MULTILINGUAL.api_model == "chatterbox-multilingual"
    assert catalog.variant_of_spec(str(mtl_dir)) == "multilingual"
    # the official repo holds both models' files: the original, unless the spec names the Multilingual
    both = Path(shutil.copytree(mtl_dir, tmp_path / "both"))
    for f in ("t3_cfg.safetensors", "s3gen.safetensors", "ve.safetensors", "tokenizer.json"):
        shutil.copy(original_dir / f, both)
    assert detect_variant(both) is ORIGINAL and catalog.variant_of_spec(str(both)) == "original"
    assert resolve_checkpoint(str(both), data) == both
    view = resolve_checkpoint(f"multilingual={both}", data)
    assert view != both and detect_variant(view) is MULTILINGUAL and not (view / "t3_cfg.safetensors").exists()
    assert resolve_checkpoint(f"multilingual={both}", data) == view               # the same view again
    assert resolve_checkpoint(f"multilingual={mtl_dir}", data) == mtl_dir           # nothing to hide: itself
    assert detect_variant(both, "multilingual") is MULTILINGUAL
    assert variant_for_repo("ResembleAI/chatterbox") is ORIGINAL
    assert variant_for_files(["t3_cfg.safetensors", "t3_mtl23ls_v2.safetensors"]) is ORIGINAL
    assert variant_for_files(["x", "t3_mtl23ls_v2.safetensors"]) is MULTILINGUAL
    with pytest.raises(CheckpointError, match="tiny-random is the original model, not multilingual"):
        resolve_checkpoint("multilingual=tiny-random", data)
    with pytest.raises(CheckpointError, match="no t3_mtl23ls_v2.safetensors"):
        resolve_checkpoint(f"multilingual={original_dir}", data)
    with pytest.raises(CheckpointError, match="not a model variant"):
        resolve_checkpoint("klingon=ResembleAI/chatterbox", data)


def test_the_prefix_downloads_only_the_multilingual_files(mtl_dir, data, monkeypatch):
    import huggingface_hub
    calls = []

    def fake(**kwargs):
        calls.append(kwargs)
        return str(mtl_dir)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert resolve_checkpoint("multilingual=ResembleAI/chatterbox", data) == mtl_dir
    patterns = calls[0]["allow_patterns"]
    assert patterns == MULTILINGUAL.download_patterns() and calls[0]["repo_id"] == "ResembleAI/chatterbox"
    assert {"ve.pt", "s3gen.pt", "t3_mtl23ls_v2.safetensors", "grapheme_mtl_merged_expanded_v1.json", "conds.pt",
            "Cangjie5_TC.json"} == set(patterns)
    with pytest.raises(CheckpointError, match="no t3_cfg.safetensors"):        # the original's files asked for
        resolve_checkpoint("ResembleAI/chatterbox", data)


def test_engine_loads_the_multilingual_parts(engine):
    assert engine.variant is MULTILINGUAL and engine.model == "chatterbox-multilingual"
    assert engine.t3.cfg.alignment_stop and engine.t3.cfg.text_vocab_size == engine.text.vocab_size
    assert engine.t3.cfg.text_vocab_size < 2454                                   # sizes from the tensors
    assert engine.decoder.alignment is not None
    assert engine.voice_variant.startswith("chatterbox:multilingual:")


# ----------------------------------------------------------------------------------------- strict loading

def _edit_pt(path: Path, fn) -> None:
    sd = torch.load(str(path), weights_only=True)
    fn(sd)
    torch.save(sd, str(path))


def test_loading_errors_name_the_file_and_key(damaged):
    sd = torch.load(str(damaged / "s3gen.pt"), weights_only=True)
    key = next(k for k in sd if k.startswith("flow.") and k.endswith(".weight"))
    _edit_pt(damaged / "s3gen.pt", lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match=rf"s3gen\.pt.*missing key.*{key.replace('.', '[.]')}"):
        MULTILINGUAL.load(damaged)


def test_unexpected_key_and_unreadable_files_are_named(damaged):
    _edit_pt(damaged / "ve.pt", lambda sd: sd.update({"extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"ve\.pt.*unexpected key.*extra\.weight"):
        MULTILINGUAL.load(damaged)
    (damaged / "ve.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"ve\.pt is not readable torch data"):
        MULTILINGUAL.load(damaged)
    torch.save({"a": "string"}, str(damaged / "ve.pt"))
    with pytest.raises(CheckpointError, match=r"ve\.pt is not a state dict"):
        MULTILINGUAL.load(damaged)
    (damaged / "grapheme_mtl_merged_expanded_v1.json").unlink()
    with pytest.raises(CheckpointError, match="grapheme_mtl_merged_expanded_v1.json missing"):
        resolve_checkpoint(str(damaged))


def test_tiny_alignment_heads_must_exist(damaged):
    import json
    config = json.loads((damaged / "serverless_config.json").read_text())
    config["t3"]["alignment_heads"] = [[12, 15]]
    (damaged / "serverless_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"alignment head.*\(12, 15\).*alignment_heads"):
        MULTILINGUAL.load(damaged)


# ---------------------------------------------------------------------------------------------- language

def test_the_language_token_leads_the_text(front):
    vocab = front.tokenizer.get_vocab()
    ids = front.encode(front.normalize("Hallo Welt"), "de")
    assert ids[0] == vocab["[de]"] and vocab["[SPACE]"] in ids
    assert front.prepare("Hallo Welt.", "de") == "[de]hallo welt."                    # lowercase
    assert front.encode("hi.", None) == front.encode("hi.", "en") == front.encode("hi.", "EN")
    assert front.encode("hi.")[0] == vocab["[en]"]
    assert front.prepare("Café", "fr") == "[fr]" + unicodedata.normalize("NFKD", "café")  # NFKD: e + combining
    assert normalize_text_multilingual("你好。") == "你好。" and normalize_text_multilingual("hallo") == "Hallo."


def test_language_is_validated(engine, original_dir):
    res = engine.synthesize([SynthesisRequest("Hallo.", language="xx"), SynthesisRequest("Hallo.", language="de")])
    assert "language 'xx'" in res[0].error and res[1].error is None
    original = ChatterboxEngine(original_dir, device="cpu", watermark=False)
    res = original.synthesize([SynthesisRequest("Hello.", language="de"), SynthesisRequest("Hello.", language="en"),
                               SynthesisRequest("Hello.")])
    assert "language 'de'" in res[0].error and "English only" in res[0].error
    assert res[1].error is None and res[2].error is None
    np.testing.assert_array_equal(res[1].audio, res[2].audio)


def test_korean_is_decomposed_into_jamo(front):
    assert decompose_hangul("한국어 ") == "\u1112\u1161\u11ab\u1100\u116e\u11a8\u110b\u1165"
    assert decompose_hangul("abc 가") == "abc \u1100\u1161"
    # NFKD already decomposes the syllables; the result is the same either way
    assert front.prepare("한국어", "ko") == "[ko]" + decompose_hangul("한국어")
    ids = front.encode("안녕하세요.", "ko")
    assert 1 not in ids                                      # every jamo is in the vocabulary: no [UNK]


def test_non_latin_sentences_are_split():
    text = "你好。我们走吧！「他说。」然后呢？" * 3
    chunks = split_text(text, 20)
    assert "".join(chunks) == text and all(len(c) <= 20 for c in chunks)
    assert chunks[0].endswith("你好。") and chunks[1].startswith("我们")
    assert split_text("यह एक वाक्य है। यह दूसरा वाक्य है। और यह तीसरा।", 20) == [
        "यह एक वाक्य है।", "यह दूसरा वाक्य है।", "और यह तीसरा।"]
    assert split_text("مرحبا كيف حالك؟ أنا بخير، شكرا لك. وأنت؟", 20) == [
        "مرحبا كيف حالك؟", "أنا بخير، شكرا لك.", "وأنت؟"]


def test_a_language_whose_package_is_missing_names_the_extra(mtl_dir, engine, monkeypatch, tmp_path):
    for module in ("pykakasi", "spacy_pkuseg", "dicta_onnx"):
        monkeypatch.setitem(sys.modules, module, None)          # import fails as if not installed
    front = MultilingualFrontEnd(mtl_dir)
    with pytest.raises(ValueError, match=r"'ja'.*pykakasi.*pip install 'chatterbox-serverless\[multilingual-ja\]'"):
        front.encode("こんにちは。", "ja")
    with pytest.raises(ValueError, match=r"spacy_pkuseg.*chatterbox-serverless\[multilingual-zh\]"):
        front.encode("你好。", "zh")
    with pytest.raises(ValueError, match=r"dicta_onnx.*chatterbox-serverless\[multilingual-he\]"):
        front.encode("שלום.", "he")
    no_table = Path(shutil.copytree(mtl_dir, tmp_path / "no-table"))
    (no_table / "Cangjie5_TC.json").unlink()
    with pytest.raises(ValueError, match=r"Cangjie5_TC\.json.*not fetched"):
        MultilingualFrontEnd(no_table).encode("你好。", "zh")
    res = engine.synthesize([SynthesisRequest("こんにちは。", language="ja"), SynthesisRequest("Hej.", language="sv")])
    assert "multilingual-ja" in res[0].error and res[1].error is None               # that request alone fails


def test_chinese_cangjie_codes_from_the_checkpoint_table(mtl_dir, monkeypatch):
    class Segmenter:            # spacy_pkuseg stand-in: one word per character pair
        def cut(self, text):
            return [text[i:i + 2] for i in range(0, len(text), 2)]
    fake = type(sys)("spacy_pkuseg")
    fake.pkuseg = Segmenter
    monkeypatch.setitem(sys.modules, "spacy_pkuseg", fake)
    front = MultilingualFrontEnd(mtl_dir)
    assert front.prepare("你好我们", "zh") == ("[zh][cj_o][cj_n][cj_f][cj_.][cj_v][cj_n][cj_d][cj_.] "
                                              "[cj_h][cj_q][cj_i][cj_.][cj_o][cj_a][cj_n][cj_.]")


# ---------------------------------------------------------------------------------------- batch vs alone

def test_batch_and_alone_give_the_same_tokens_and_audio(engine):
    reqs = [SynthesisRequest("Guten Tag. Wie geht es Ihnen heute?", language="de", request_id="a",
                             params=SynthesisParams(seed=3, repetition_penalty=2.0)),
            SynthesisRequest("안녕하세요, 잘 지내세요?", language="ko", request_id="b", params=SynthesisParams(seed=5)),
            SynthesisRequest("Bonjour à tous.", language="fr", request_id="c",
                             params=SynthesisParams(seed=7, cfg_weight=0.0))]
    alone = [engine.synthesize([r])[0] for r in reqs]
    together = engine.synthesize(reqs)
    for a, b in zip(alone, together):
        assert a.error is None and b.error is None
        assert a.metrics["speech_tokens"] == b.metrics["speech_tokens"]
        np.testing.assert_array_equal(a.audio, b.audio)


# ------------------------------------------------------------------------------------ alignment stopping

def _chunk(rows: list[int], S: int) -> torch.Tensor:
    """Attention rows peaked at the given text positions."""
    a = torch.full((len(rows), S), 0.01)
    for i, p in enumerate(rows):
        a[i, p] = 1.0
    return a


def _feed(an: AlignmentAnalyzer, positions: list[list[int]], tokens: list[int]):
    out = []
    for k, rows in enumerate(positions):
        an.pending = _chunk(rows, an.n_text)
        out.append(an.step([6561, *tokens[:k]]))
    return out


def test_the_stop_token_is_suppressed_until_the_end_of_the_text():
    an = AlignmentAnalyzer(n_text=10)
    steps = [[0, 0]] + [[min(k, 9)] for k in range(1, 12)]
    decisions = _feed(an, steps, list(range(100, 112)))
    suppressed = [s for s, _ in decisions]
    assert suppressed[:7] == [True] * 7 and not any(suppressed[7:])       # position 7 = S - 3: no longer
    assert not any(f for _, f in decisions) and an.complete and an.completed_at == 9
    assert an.alignment.shape == (13, 10)
    short = AlignmentAnalyzer(n_text=5)                                      # 5 positions or fewer: never
    assert _feed(short, [[0, 0]], [])[0] == (False, False)


def test_the_monotonic_mask_and_discontinuities():
    an = AlignmentAnalyzer(n_text=20)
    _feed(an, [[0, 0], [15]], [100])           # beyond the frame: masked, the argmax stays near the start
    assert an.text_position <= 2
    an2 = AlignmentAnalyzer(n_text=20)
    _feed(an2, [[0, 0]] + [[0]] * 8 + [[9]], list(range(100, 110)))
    assert an2.text_position == 0              # a jump of 7 or more is ignored
    an3 = AlignmentAnalyzer(n_text=20)
    _feed(an3, [[0, 0]] + [[k] for k in range(1, 7)] + [[1]], list(range(100, 110)))
    assert an3.text_position == 6              # ... and so is one of -4 or less


def test_a_long_tail_forces_the_stop_token():
    an = AlignmentAnalyzer(n_text=8)
    steps = [[0, 0]] + [[min(k, 7)] for k in range(1, 15)]
    decisions = _feed(an, steps, list(range(100, 120)))
    forced = [f for _, f in decisions]
    first = forced.index(True)
    assert an.forced == "long tail" and not any(forced[:first])
    assert an.completed_at == 7 and first == 11   # the 5th frame on the last column since completion


def test_repeated_tokens_force_the_stop_token():
    an = AlignmentAnalyzer(n_text=30)
    steps = [[0, 0]] + [[k] for k in range(1, 6)]
    decisions = _feed(an, steps, [100, 101, 102, 102, 103])
    assert [f for _, f in decisions] == [False, False, False, False, True, False]
    assert an.forced == "token repetition"


def test_attention_going_back_forces_the_stop_token():
    an = AlignmentAnalyzer(n_text=12)
    steps = [[0, 0]] + [[k] for k in range(1, 10)] + [[2]] * 8
    decisions = _feed(an, steps, list(range(100, 140)))
    assert an.forced == "alignment repetition" and any(f for _, f in decisions)


def test_decisions_written_into_the_raw_logits_give_the_official_cfg_logits():
    cond, uncond = torch.randn(2, 50), torch.randn(2, 50)
    w = 0.5
    c, u = cond.clone(), uncond.clone()
    apply_decisions(c, u, 0, suppress=True, force=False, stop_token=7)
    apply_decisions(c, u, 1, suppress=False, force=True, stop_token=7)
    cfg = c + w * (c - u)
    official = cond + w * (cond - uncond)
    official[0, 7] = -2 ** 15
    official[1] = -2 ** 15
    official[1, 7] = 2 ** 15
    torch.testing.assert_close(cfg, official, rtol=0, atol=0)


def test_the_decoder_stops_on_a_repeated_token(mtl_dir):
    """A model whose greedy choice is always the same token: with the analyser the request ends at the second
    one (the stop token forced at the step after two equal tokens), without it it runs to max_new_tokens."""
    from chatterbox_serverless.engine.checkpoint import read_config
    from chatterbox_serverless.engine.conditioning import load_builtin_voice
    config = MULTILINGUAL.architecture(read_config(mtl_dir))
    conds = load_builtin_voice(mtl_dir / "conds.pt")
    front = MultilingualFrontEnd(mtl_dir)
    req = T3Request(text_ids=front.encode("hallo welt.", "de"), speaker_emb=conds.speaker_emb,
                    prompt_tokens=conds.t3_prompt_tokens, params=SynthesisParams(temperature=0.0),
                    max_new_tokens=20, record=True)
    results = []
    for stop in (True, False):
        t3 = T3.from_checkpoint(mtl_dir, config={**config, "t3": {**config["t3"], "alignment_stop": stop}},
                                filename=MULTILINGUAL.t3_file)
        favourite = torch.zeros(t3.cfg.speech_vocab_size)
        favourite[1000] = 100.0
        t3.logits = lambda hidden, t3=t3: T3.logits(t3, hidden) + favourite      # always 1000, greedily
        with torch.inference_mode():
            results.append(T3Decoder(t3, max_rows=4).run([dataclasses.replace(req)])[0])
    res, plain = results
    assert res.generated.tolist() == [1000, 1000, 6562] and res.stop_reason == "eos"
    assert res.speech_tokens.tolist() == [1000, 1000]
    assert res.probs[-1, 6562] == 1 and res.probs[0, 6562] == 0                 # forced; suppressed before
    assert res.alignment.shape == (4, len(req.text_ids) + 2)                   # two rows for the prefill
    assert torch.isfinite(res.alignment).all() and (res.alignment >= 0).all()
    assert plain.generated.tolist() == [1000] * 20 and plain.stop_reason == "max_new_tokens" and plain.alignment is None
