"""Text front-end of T3: the official punctuation normalisation and the `tokenizer.json` text tokenizer.

`normalize_text` reproduces chatterbox-tts 0.1.7 `tts.punc_norm` exactly (same replacements, same order), so the
token ids match the official ones. `TextTokenizer.encode` replaces every space with `[SPACE]` and runs the HF
`tokenizers` model, as the official `EnTokenizer` does; `[START]` / `[STOP]` are added by the caller.
"""
from __future__ import annotations

from pathlib import Path

from .checkpoint import CheckpointError

START = "[START]"
STOP = "[STOP]"
UNK = "[UNK]"
SPACE = "[SPACE]"

EMPTY_TEXT_REPLACEMENT = "You need to add some text for me to talk."

# (old, new), applied in this order, as in the official punc_norm.
_PUNCTUATION = (
    ("...", ", "),
    ("\u2026", ", "),   # …
    (":", ","),
    (" - ", ", "),
    (";", ", "),
    ("\u2014", "-"),    # em dash
    ("\u2013", "-"),    # en dash
    (" ,", ","),
    ("\u201c", '"'),    # “
    ("\u201d", '"'),    # ”
    ("\u2018", "'"),    # ‘
    ("\u2019", "'"),    # ’
)
_SENTENCE_ENDERS = (".", "!", "?", "-", ",")


def normalize_text(text: str) -> str:
    """The official punctuation clean-up: capitalise the first letter, collapse whitespace, map rare or LLM-style
    punctuation to common punctuation, and end with a full stop when no sentence-ending punctuation is there."""
    if len(text) == 0:
        return EMPTY_TEXT_REPLACEMENT
    if text[0].islower():
        text = text[0].upper() + text[1:]
    text = " ".join(text.split())
    for old, new in _PUNCTUATION:
        text = text.replace(old, new)
    text = text.rstrip(" ")
    if not text.endswith(_SENTENCE_ENDERS):
        text += "."
    return text


class TextTokenizer:
    """The checkpoint's `tokenizer.json` (HF `tokenizers`), used the official way: ' ' -> '[SPACE]', then encode."""

    def __init__(self, path_to_tokenizer_json: str | Path):
        from tokenizers import Tokenizer
        path = Path(path_to_tokenizer_json)
        if not path.is_file():
            raise CheckpointError(f"text tokenizer file {path} is missing")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:   # not JSON, not a tokenizers file
            raise CheckpointError(f"{path} is not a tokenizers file ({type(e).__name__}: {e})") from None
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in (START, STOP, SPACE) if t not in vocab]
        if missing:
            raise CheckpointError(f"{path} is not a Chatterbox text tokenizer: no {', '.join(missing)} token")
        self.start_id: int = vocab[START]
        self.stop_id: int = vocab[STOP]
        self.space_id: int = vocab[SPACE]
        self.unk_id: int | None = vocab.get(UNK)
        self.vocab_size: int = self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (already normalised), without [START] / [STOP]."""
        return list(self.tokenizer.encode(text.replace(" ", SPACE)).ids)

    def decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=False)
        return text.replace(" ", "").replace(SPACE, " ").replace(STOP, "").replace(UNK, "")
