"""Long text: split at sentence boundaries into chunks the model handles well, and join the audio back.

The official model degrades past ~300 characters and stops at ~40 s (1000 speech tokens), so a request is cut
into chunks of at most `max_chars`, preferring sentence ends, then clause punctuation, then spaces. All chunks of
all requests go through the engine as one batch; their audio is joined with a short equal-power crossfade.
A paralinguistic tag (`[laugh]`, `[clear throat]`: text.TAG) is never cut: a cut that would fall inside one
moves before it (or after it, when the tag starts the piece).

Sentence ends of other scripts (the Multilingual model's languages) count too: the full-width 。！？ (a closing
bracket or quote after them stays with the sentence), which need no space after them, the Devanagari danda
।/॥ and the Arabic/Urdu ؟/۔; clause marks ，、；：and the Arabic comma ، likewise. Sentences and clauses of CJK text
are packed together without the space Latin text gets between them. Text without these characters is split exactly
as before.
"""
from __future__ import annotations

import re

import numpy as np

from .text import TAG

_CJK_ENDERS = "。！？"
_CJK_CLOSERS = re.escape("」』）》〉”’\"')]")      # (a character class's content)
_SENTENCE_END = re.compile(r'(?<=[.!?…])["\')\]]*\s+'
                           rf'|(?<=[{_CJK_ENDERS}][{_CJK_CLOSERS}])\s*|(?<=[{_CJK_ENDERS}])(?![{_CJK_CLOSERS}])\s*'
                           r'|(?<=[।॥؟۔])\s*')
_CLAUSE_END = re.compile(r'(?<=[,;:—–])\s+|(?<=[，、；：،])\s*')
_NO_SPACE_AFTER = re.compile(rf'([{_CJK_ENDERS}][{_CJK_CLOSERS}]?|[，、；：])$')


def _pieces(text: str, pattern: re.Pattern) -> list[str]:
    return [p for p in pattern.split(text) if p.strip()]


def _tag_around(text: str, i: int) -> tuple[int, int] | None:
    """The (start, end) of the tag that position i falls strictly inside (a cut at i would split it), if any."""
    for m in TAG.finditer(text):
        if m.start() < i < m.end():
            return m.start(), m.end()
    return None


def _cut(clause: str, max_chars: int) -> int:
    """Where to cut a clause longer than max_chars: the last space within the limit outside tags, else a hard
    cut at the limit, moved out of a tag (before it; after it when the tag starts the clause)."""
    cut = clause.rfind(" ", 0, max_chars + 1)
    while cut > 0 and _tag_around(clause, cut):
        cut = clause.rfind(" ", 0, _tag_around(clause, cut)[0])
    if cut > 0:
        return cut
    tag = _tag_around(clause, max_chars)
    if tag is None:
        return max_chars
    return tag[0] if tag[0] > 0 else tag[1]


def _split_long(sentence: str, max_chars: int) -> list[str]:
    """A sentence longer than max_chars: cut at clause punctuation, then at spaces, then hard (never in a tag)."""
    out: list[str] = []
    for clause in _pieces(sentence, _CLAUSE_END):
        while len(clause) > max_chars:
            cut = _cut(clause, max_chars)
            out.append(clause[:cut].strip())
            clause = clause[cut:].strip()
        if clause:
            out.append(clause)
    return out


def split_text(text: str, max_chars: int = 280) -> list[str]:
    """Chunks of at most `max_chars` characters, whole sentences packed together where they fit."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return [text] if text else []
    units: list[str] = []
    for sentence in _pieces(text, _SENTENCE_END):
        units.extend(_split_long(sentence.strip(), max_chars) if len(sentence) > max_chars else [sentence.strip()])
    chunks: list[str] = []
    for unit in units:
        sep = "" if chunks and _NO_SPACE_AFTER.search(chunks[-1]) else " "
        if chunks and len(chunks[-1]) + len(sep) + len(unit) <= max_chars:
            chunks[-1] = f"{chunks[-1]}{sep}{unit}"
        else:
            chunks.append(unit)
    return chunks


def crossfade_join(clips: list[np.ndarray], sample_rate: int, fade_seconds: float = 0.05) -> np.ndarray:
    """Concatenate clips, overlapping each boundary by an equal-power crossfade of `fade_seconds`
    (shortened where a clip is shorter than that)."""
    clips = [np.asarray(c, dtype=np.float32) for c in clips if len(c)]
    if not clips:
        return np.zeros(0, dtype=np.float32)
    out = clips[0]
    for clip in clips[1:]:
        n = min(int(fade_seconds * sample_rate), len(out), len(clip))
        if n == 0:
            out = np.concatenate([out, clip])
            continue
        t = (np.arange(n, dtype=np.float32) + 0.5) / n
        fade_in, fade_out = np.sin(0.5 * np.pi * t), np.cos(0.5 * np.pi * t)
        mixed = out[-n:] * fade_out + clip[:n] * fade_in
        out = np.concatenate([out[:-n], mixed, clip[n:]])
    return out


def max_speech_tokens(n_text_tokens: int, cap: int = 1000) -> int:
    """A bound on the speech tokens a chunk may produce, from its text length: speech runs at 25 tokens/s and
    English at roughly 12-18 characters/s, so ~2 speech tokens per text token is normal; allowing 6 per text
    token plus 2 s of slack never truncates real speech but stops the babbling tails the model produces on very
    short inputs ("Hi!") when it misses its stop token."""
    return int(min(cap, 50 + 6 * n_text_tokens))


class CrossfadeStream:
    """`crossfade_join`, incrementally: `push(clip)` returns the joined audio that no later clip can change, and
    holds back the tail the next clip will be crossfaded with; `push(clip, last=True)` (or `finish()`) returns
    the rest. The returned pieces concatenate to exactly `crossfade_join(clips, ...)` (the same float operations
    on the same samples). Pieces shorter than `min_samples` are held and returned with the next one (so that
    every piece is long enough to carry a watermark), except at the end."""

    def __init__(self, sample_rate: int, fade_seconds: float = 0.05, min_samples: int = 0):
        self.n_fade = int(fade_seconds * sample_rate)
        self.min_samples = int(min_samples)
        self.tail = np.zeros(0, dtype=np.float32)      # the joined audio's last samples, not handed out yet
        self.ready = np.zeros(0, dtype=np.float32)     # final samples held back as too short a piece
        self.total = 0                                  # length of the joined audio so far

    def push(self, clip: np.ndarray, last: bool = False, continues: bool = False) -> np.ndarray:
        """`continues`: `clip` goes on the previous clip (the next window of one chunk's audio, as
        s3gen_stream.ChunkStreamer hands it out): appended as is, no crossfade."""
        clip = np.asarray(clip, dtype=np.float32)
        if len(clip):
            if continues and self.total:
                joined = np.concatenate([self.tail, clip])
                self.total += len(clip)
            elif self.total == 0:
                joined = clip
                self.total = len(clip)
            else:
                n = min(self.n_fade, self.total, len(clip))
                if n == 0:
                    joined = np.concatenate([self.tail, clip])
                else:
                    t = (np.arange(n, dtype=np.float32) + 0.5) / n
                    fade_in, fade_out = np.sin(0.5 * np.pi * t), np.cos(0.5 * np.pi * t)
                    mixed = self.tail[-n:] * fade_out + clip[:n] * fade_in
                    joined = np.concatenate([self.tail[:len(self.tail) - n], mixed, clip[n:]])
                self.total += len(clip) - n
            keep = 0 if last else min(self.n_fade, self.total)
            cut = len(joined) - keep
            self.ready = np.concatenate([self.ready, joined[:cut]])
            self.tail = joined[cut:]
        elif last:
            self.ready, self.tail = np.concatenate([self.ready, self.tail]), self.tail[:0]
        if last or len(self.ready) >= max(1, self.min_samples):
            out, self.ready = self.ready, self.ready[:0]
            return out
        return self.ready[:0]

    def finish(self) -> np.ndarray:
        """Everything not handed out yet (the held tail, a held short piece)."""
        return self.push(np.zeros(0, dtype=np.float32), last=True)
