import numpy as np

from chatterbox_serverless.engine.chunking import crossfade_join, max_speech_tokens, split_text


def test_short_text_is_one_chunk():
    assert split_text("  Hello   there.  ") == ["Hello there."]
    assert split_text("") == []


def test_long_text_splits_at_sentences_and_bounds_length():
    sentences = [f"This is sentence number {i}, which has a few words in it." for i in range(60)]
    text = " ".join(sentences)
    chunks = split_text(text, max_chars=200)
    assert len(chunks) > 1
    assert all(len(c) <= 200 for c in chunks)
    assert all(c.endswith(".") for c in chunks)          # whole sentences only
    assert " ".join(chunks) == text                       # nothing lost or reordered


def test_overlong_sentence_cut_at_clauses_then_spaces():
    words = " ".join(["word"] * 200)
    text = f"Start, {words}; end"
    chunks = split_text(text, max_chars=100)
    assert all(len(c) <= 100 for c in chunks)
    assert " ".join(chunks).split() == text.split()
    assert split_text("x" * 250, max_chars=100) == ["x" * 100, "x" * 100, "x" * 50]


def test_crossfade_join_length_and_continuity():
    sr = 1000
    a, b = np.ones(300, np.float32), np.ones(200, np.float32)
    out = crossfade_join([a, b], sr, fade_seconds=0.05)
    assert len(out) == 300 + 200 - 50
    # equal-power fade of two equal constant signals peaks at sqrt(2) in the middle, never drops below 1
    assert out.min() >= 0.999 and out.max() <= np.sqrt(2) + 1e-6
    assert crossfade_join([], sr).size == 0
    assert np.array_equal(crossfade_join([a], sr), a)


def test_max_speech_tokens_bounded():
    assert max_speech_tokens(3) < max_speech_tokens(30) <= 1000
    assert max_speech_tokens(10_000) == 1000
