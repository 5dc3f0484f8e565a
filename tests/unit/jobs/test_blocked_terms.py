"""jobs/policy.py: blocked terms match through invisible characters, look-alike letters and punctuation inside
words, while whole-word matching stays as it was."""
from __future__ import annotations

import time

import pytest

from chatterbox_serverless.jobs.policy import ContentPolicy, fold, fold_cased

POLICY = ContentPolicy(["forbidden", "bad word", "badword"])


@pytest.mark.parametrize("text", [
    "this is for\u200bbidden",              # zero-width space inside the word
    "this is for\u2060bidden",              # word joiner
    "this is for\u00adbidden",              # soft hyphen
    "this is forbid\ufeffden",              # BOM / zero-width no-break space
    "this is for\u200d\u200cbidden",        # joiners
    "this is f\u043erbidden",               # Cyrillic о for Latin o
    "this is \u0192\u043er\u0184idden",     # ƒ, Cyrillic о, Ƅ (b-like)
    "this is FORBIDD\u0415N",               # Cyrillic capital Е
    "this is f\u03bfrbidden",               # Greek omicron
    "this is for-bidden",                   # punctuation between letters
    "this is for.bidden", "this is for_bidden", "this is f.o.r.b.i.d.d.e.n", "this is for\u2010bidden",
    "this is f o r b i d d e n",            # spelled out
    "this is f\u0334o\u0334r\u0334b\u0334i\u0334d\u0334d\u0334e\u0334n\u0334",   # combining marks ("zalgo")
    "this is \uff46\uff4f\uff52\uff42\uff49\uff44\uff44\uff45\uff4e",             # fullwidth (NFKC)
    "this is \U0001d523\U0001d52c\U0001d52f\U0001d51f\U0001d526\U0001d521\U0001d521\U0001d522\U0001d52b",
    "this is FoRbIdDeN!",
    "a b\u200ba\u200bd w\u043erd here",      # a phrase, bypasses combined
])
def test_bypasses_are_caught(text):
    assert POLICY.violation(text) is not None


@pytest.mark.parametrize("text", [
    "this is allowed",
    "for bidden",                    # a real word boundary (whitespace) separates the parts
    "forbiddenly", "unforbidden",    # the term only as part of a longer word
    "badwords are fine, not whole-word",
    "bad wordsmith", "a bad, sad world",
    "\u200b\u200b",
    "Scunthorpe",
])
def test_whole_word_semantics_are_kept(text):
    assert POLICY.violation(text) is None


def test_existing_semantics():
    assert POLICY.violation("This has a Bad,  word inside.") is not None       # punctuation separates words
    assert POLICY.violation("bad-word") is not None
    assert POLICY.violation("BADWORD!") is not None
    assert ContentPolicy([]).violation("forbidden") is None
    assert len(ContentPolicy(["x y", "X  Y", "x-y", "", "   "])) == 1


def test_terms_are_normalised_like_the_text():
    # An operator's term written with a look-alike or an invisible character still matches the plain word.
    policy = ContentPolicy(["f\u043erbid\u200bden"])
    assert policy.violation("forbidden") is not None
    assert policy.violation("for bidden") is None


def test_plain_ascii_is_not_folded():
    # The confusable folding applies to non-ASCII letters only: ASCII digits stay digits.
    assert fold("Python 101") == "python 101"
    assert ContentPolicy(["lol"]).violation("Python 101") is None
    assert fold("\u0420\u0430y") == "pay"               # Cyrillic Р, а
    assert fold_cased("\u0397\u0391\u03b7") == "han"    # capital Eta looks like H, small eta like n
    assert fold("\u0397\u03b7") == fold("\u03b7\u03b7") == "nn"   # the caseless fold: the same for both cases


def test_non_latin_terms_still_match_their_own_script():
    policy = ContentPolicy(["\u0441\u0443\u043a\u0430", "\u05e9\u05dc\u05d5\u05dd", "\u0928\u092e\u0938\u094d\u0924\u0947"])
    assert policy.violation("\u0442\u044b \u0421\u0423\u041a\u0410!") is not None
    assert policy.violation("\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd") is not None
    assert policy.violation("\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e") is not None
    assert policy.violation("\u0928\u092e\u0938\u094d\u0924\u0947\u091c\u0940") is None


def test_long_text_is_checked_quickly():
    policy = ContentPolicy([f"term{i}" for i in range(200)])
    text = "The quick brown fox jumps over the lazy dog, again and again. " * 80
    t0 = time.perf_counter()
    assert policy.violation(text) is None
    assert time.perf_counter() - t0 < 1.0


def test_capitals_that_look_like_another_letter_than_their_small_letter():
    policy = ContentPolicy(["hello"])
    assert policy.violation("\u0397ELLO there") is not None      # Greek capital Eta looks like H
    assert policy.violation("\u03b7ello there") is None          # small eta looks like n, not h
