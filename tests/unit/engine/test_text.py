import json

import pytest

from chatterbox_serverless.engine.checkpoint import CheckpointError
from chatterbox_serverless.engine.text import EMPTY_TEXT_REPLACEMENT, TextTokenizer, normalize_text


# Expected values checked against chatterbox-tts 0.1.7 `tts.punc_norm`.
@pytest.mark.parametrize("raw, expected", [
    ("", EMPTY_TEXT_REPLACEMENT),
    ("hello world", "Hello world."),
    ("Hello   there\n  friend!", "Hello there friend!"),
    ("wait... what", "Wait,  what."),
    ("wait\u2026 what?", "Wait,  what?"),
    ("note: this", "Note, this."),
    ("a - b", "A, b."),
    ("a; b", "A,  b."),
    ("em\u2014dash and en\u2013dash", "Em-dash and en-dash."),
    ("x , y", "X, y."),
    ("\u201cquoted\u201d and \u2018single\u2019", "\"quoted\" and 'single'."),
    ("trailing spaces   ", "Trailing spaces."),
    ("ends with dash -", "Ends with dash -"),
    ("Already fine.", "Already fine."),
    ("1 apple", "1 apple."),
    # reference b of the official dump (chatterbox-tts 0.1.7 punc_norm output)
    ("Hello there; this is a second test - with other settings...",
     "Hello there,  this is a second test, with other settings,"),
    ("Welcome to Chatterbox TTS, where your text turns into captivating audio effortlessly.",
     "Welcome to Chatterbox TTS, where your text turns into captivating audio effortlessly."),
])
def test_normalize_text_matches_official_rules(raw, expected):
    assert normalize_text(raw) == expected


def test_normalize_text_only_capitalises_a_lowercase_first_character():
    # the first character is a smart quote, so nothing is capitalised (official behaviour)
    assert normalize_text("\u201chi\u201d") == '"hi".'


def _write_char_tokenizer(path, specials=("[STOP]", "[UNK]", "[SPACE]")):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {tok: i for i, tok in enumerate(specials)}
    for c in "abcdefghijklmnopqrstuvwxyzH.,!":
        vocab[c] = len(vocab)
    while len(vocab) < 255:
        vocab[f"[unused{len(vocab)}]"] = len(vocab)
    vocab["[START]"] = 255
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]" if "[UNK]" in vocab else None))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.add_special_tokens([s for s in (*specials, "[START]")])
    tok.save(str(path))
    return vocab


def test_tokenizer_encodes_spaces_as_space_token(tmp_path):
    vocab = _write_char_tokenizer(tmp_path / "tokenizer.json")
    tok = TextTokenizer(tmp_path / "tokenizer.json")
    assert (tok.start_id, tok.stop_id, tok.space_id, tok.unk_id) == (255, 0, 2, 1)
    ids = tok.encode("Hi there.")
    assert ids == [vocab["H"], vocab["i"], 2, vocab["t"], vocab["h"], vocab["e"], vocab["r"], vocab["e"], vocab["."]]
    assert tok.decode(ids) == "Hi there."
    assert tok.encode("a?") == [vocab["a"], 1]          # unknown character -> [UNK]


def test_tokenizer_rejects_files_without_special_tokens(tmp_path):
    _write_char_tokenizer(tmp_path / "tokenizer.json", specials=("[STOP]", "[UNK]"))
    with pytest.raises(CheckpointError, match=r"tokenizer.json is not a Chatterbox text tokenizer.*\[SPACE\]"):
        TextTokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(CheckpointError, match="absent.json is missing"):
        TextTokenizer(tmp_path / "absent.json")
    (tmp_path / "garbage.json").write_text("not json {")
    with pytest.raises(CheckpointError, match="garbage.json is not a tokenizers file"):
        TextTokenizer(tmp_path / "garbage.json")


def test_tokenizer_on_reference_layout_file(tmp_path):
    """The official file is a BPE model; any tokenizers model works the same way."""
    from tokenizers import Tokenizer, models
    vocab = {"[STOP]": 0, "[UNK]": 1, "[SPACE]": 2, "a": 3, "b": 4, "ab": 5, "[START]": 255}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], unk_token="[UNK]"))
    tok.add_special_tokens(["[STOP]", "[UNK]", "[SPACE]", "[START]"])
    tok.save(str(tmp_path / "t.json"))
    json.loads((tmp_path / "t.json").read_text())
    t = TextTokenizer(tmp_path / "t.json")
    assert t.encode("ab a") == [5, 2, 3]
