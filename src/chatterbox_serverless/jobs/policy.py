"""Content policy: an operator-supplied list of blocked terms; a job whose text contains one ends FAILED.

The file holds one term or phrase per line; empty lines and lines starting with `#` are ignored. Matching is
case-insensitive, Unicode-normalised (NFKC, casefold) and on whole words: punctuation and runs of whitespace count
as one separator, so "bad  word!" matches the phrase "bad word" but "badword" does not.
"""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def _normalise(text: str) -> str:
    words = _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).split()
    return " " + " ".join(words) + " "


class ContentPolicy:
    def __init__(self, terms: list[str] | None = None):
        self.terms = sorted({t for t in (_normalise(x) for x in terms or []) if t.strip()})

    @classmethod
    def from_file(cls, path: str | Path) -> "ContentPolicy":
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        return cls([ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")])

    def violation(self, text: str) -> str | None:
        """The reason the text is refused, or None when it may be synthesised."""
        if not self.terms:
            return None
        normalised = _normalise(text)
        for term in self.terms:
            if term in normalised:
                return "content policy: the text contains a term this service does not synthesise"
        return None

    def __len__(self) -> int:
        return len(self.terms)
