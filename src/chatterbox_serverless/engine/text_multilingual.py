"""The Multilingual model's text front-end: text + language -> token ids, as chatterbox-tts 0.1.7 `mtl_tts`
(`punc_norm`) and `MTLTokenizer.encode(text, language_id=...)` compute them.

    normalize   the original's punctuation clean-up (`text.normalize_text`), with the CJK sentence enders
                、，。？！ also counted as an ending (no full stop appended after them)
    encode      lower() -> NFKD -> the language's preparation -> "[xx]" prepended -> ' ' -> [SPACE] -> the grapheme
                tokenizer (grapheme_mtl_merged_expanded_v1.json, HF `tokenizers`); [START]/[STOP] are T3's

Per-language preparation (the official functions, written again here):
    ko  Hangul syllables -> conjoining jamo (initial, medial[, final]), then strip(); plain Python. (NFKD has
        already decomposed them; the step is kept because the official runs it.)
    ja  kanji -> hiragana with pykakasi (a word with kanji that reads as は/へ gets a space before it), katakana
        and the rest kept, then NFKD again. Extra `multilingual-ja`.
    zh  word segmentation with spacy_pkuseg (words joined by spaces), then every Lo character with a Cangjie code
        becomes [cj_x]...[cj_.] (its index among the characters sharing the code appended when > 0). The table,
        Cangjie5_TC.json, is read from the checkpoint directory (the official fetches it from the hub when the
        tokenizer is built; here it is downloaded with the checkpoint and never fetched during a request).
        Extra `multilingual-zh`.
    he  diacritics with dicta_onnx (`Dicta(model).add_diacritics`), its ONNX model (dicta-1.0.onnx or
        dicta-1.0.int8.onnx) in the checkpoint directory. Extra `multilingual-he`. (0.1.7 calls `Dicta()` with no
        model, which fails, and goes on without diacritics: resemble-ai/chatterbox#467.)
    ru  stress marks with russian_text_stresser when it is installed. It is not on PyPI (a git package the
        official made optional), so there is no extra: without it Russian goes on unstressed, as 0.1.7 does by
        default, with one warning in the log.
A language whose package is missing is a ValueError naming the extra to install, never a silent fallback (the
official logs a warning and sends the raw text, which the model then mispronounces).
"""
from __future__ import annotations

import logging
import threading
import unicodedata
from pathlib import Path

from .checkpoint import CheckpointError, read_json
from .languages import LANGUAGES
from .text import SENTENCE_ENDERS, SPACE, START, STOP, load_text_tokenizer, normalize_text

log = logging.getLogger(__name__)

TOKENIZER_FILE = "grapheme_mtl_merged_expanded_v1.json"
CANGJIE_FILE = "Cangjie5_TC.json"
DICTA_FILES = ("dicta-1.0.onnx", "dicta-1.0.int8.onnx")
DEFAULT_LANGUAGE = "en"
CJK_ENDERS = ("、", "，", "。", "？", "！")
EXTRAS = {"ja": "multilingual-ja", "zh": "multilingual-zh", "he": "multilingual-he"}


def normalize_text_multilingual(text: str) -> str:
    """0.1.7 `mtl_tts.punc_norm`: `normalize_text`, where a text ending in 、，。？！ also counts as ended."""
    return normalize_text(text, enders=SENTENCE_ENDERS + CJK_ENDERS)


def _missing_extra(language: str, module: str) -> ValueError:
    extra = EXTRAS[language]
    return ValueError(f"language {language!r} ({LANGUAGES[language]}) needs the {module} package, not installed "
                      f"here: pip install 'chatterbox-serverless[{extra}]'")


# ---------------------------------------------------------------------------------------------------- Korean

def decompose_hangul(text: str) -> str:
    """Each precomposed Hangul syllable (U+AC00..) -> its conjoining jamo; other characters as they are; then
    strip() (0.1.7 `korean_normalize`)."""
    out = []
    for ch in text:
        if "\uac00" <= ch <= "\ud7af":
            base = ord(ch) - 0xAC00
            out.append(chr(0x1100 + base // (21 * 28)))
            out.append(chr(0x1161 + (base % (21 * 28)) // 28))
            if base % 28:
                out.append(chr(0x11A7 + base % 28))
        else:
            out.append(ch)
    return "".join(out).strip()


# -------------------------------------------------------------------------------------------------- Japanese

def _is_kanji(c: str) -> bool:
    return 0x4E00 <= ord(c) <= 0x9FFF


def _is_katakana(c: str) -> bool:
    return 0x30A1 <= ord(c) <= 0x30FA


class JapaneseKana:
    """Kanji -> hiragana (pykakasi), katakana kept, then NFKD (0.1.7 `hiragana_normalize`)."""

    def __init__(self):
        try:
            import pykakasi
        except ImportError:
            raise _missing_extra("ja", "pykakasi") from None
        self.kakasi = pykakasi.kakasi()

    def __call__(self, text: str) -> str:
        out = []
        for part in self.kakasi.convert(text):
            orig, hira = part["orig"], part["hira"]
            if any(_is_kanji(c) for c in orig):
                out.append(" " + hira if hira and hira[0] in ("は", "へ") else hira)
            else:
                out.append(orig)    # katakana kept as written, and so is everything else
        return unicodedata.normalize("NFKD", "".join(out))


# --------------------------------------------------------------------------------------------------- Chinese

class ChineseCangjie:
    """Segmentation (spacy_pkuseg) and Cangjie codes from the checkpoint's Cangjie5_TC.json (0.1.7
    `ChineseCangjieConverter`)."""

    def __init__(self, ckpt_dir: Path):
        path = Path(ckpt_dir) / CANGJIE_FILE
        if not path.is_file():
            raise ValueError(f"language 'zh' (Chinese) needs {CANGJIE_FILE} in the checkpoint directory {ckpt_dir} "
                             f"(it is in the ResembleAI/chatterbox repo); it is not fetched during a request")
        try:
            entries = read_json(path)
            self.code_of: dict[str, str] = {}          # a character -> its code (the last line wins)
            self.words_of: dict[str, list[str]] = {}   # a code -> its characters, in file order
            for entry in entries:
                word, code = entry.split("\t")[:2]
                self.code_of[word] = code
                self.words_of.setdefault(code, []).append(word)
        except CheckpointError:
            raise
        except Exception as e:   # noqa: BLE001 - not a list of "word\tcode" lines
            raise CheckpointError(f"{path} is not a Cangjie table ({type(e).__name__}: {e})") from None
        try:
            from spacy_pkuseg import pkuseg
        except ImportError:
            raise _missing_extra("zh", "spacy_pkuseg") from None
        self.segmenter = pkuseg()

    def encode_glyph(self, glyph: str) -> str | None:
        code = self.code_of.get(glyph)
        if code is None:
            return None
        index = self.words_of[code].index(glyph)      # among the characters sharing the code
        return code + (str(index) if index > 0 else "")

    def __call__(self, text: str) -> str:
        out = []
        for ch in " ".join(self.segmenter.cut(text)):
            cj = self.encode_glyph(ch) if unicodedata.category(ch) == "Lo" else None
            out.append(ch if cj is None else "".join(f"[cj_{c}]" for c in cj) + "[cj_.]")
        return "".join(out)


# ---------------------------------------------------------------------------------------------------- Hebrew

class HebrewDiacritics:
    """Diacritics with dicta_onnx and the ONNX model found in the checkpoint directory."""

    def __init__(self, ckpt_dir: Path):
        try:
            from dicta_onnx import Dicta
        except ImportError:
            raise _missing_extra("he", "dicta_onnx") from None
        model = next((Path(ckpt_dir) / f for f in DICTA_FILES if (Path(ckpt_dir) / f).is_file()), None)
        if model is None:
            raise ValueError(f"language 'he' (Hebrew) needs the Dicta diacritics model ({' or '.join(DICTA_FILES)}, "
                             f"github.com/thewh1teagle/dicta-onnx releases) in the checkpoint directory {ckpt_dir}")
        self.dicta = Dicta(str(model))

    def __call__(self, text: str) -> str:
        return self.dicta.add_diacritics(text)


# --------------------------------------------------------------------------------------------------- Russian

class RussianStress:
    """Stress marks with russian_text_stresser when installed; otherwise the text as it is (see the module
    docstring), with one warning."""

    def __init__(self):
        try:
            from russian_text_stresser.text_stresser import RussianTextStresser
            self.stresser = RussianTextStresser()
        except ImportError:
            self.stresser = None
            log.warning("russian_text_stresser is not installed: Russian text is read without stress marks "
                        "(as chatterbox-tts 0.1.7 does without it)")

    def __call__(self, text: str) -> str:
        return text if self.stresser is None else self.stresser.stress_text(text)


# ------------------------------------------------------------------------------------------------ front-end

class MultilingualFrontEnd:
    """Text front-end of the Multilingual model (engine/variants.py MULTILINGUAL): `normalize`, then
    `encode(text, language)`. The per-language helpers are built on first use (thread-safe), so a missing
    package fails the requests in that language only."""
    name = "multilingual"
    languages = tuple(LANGUAGES)

    def __init__(self, ckpt_dir: str | Path):
        self.ckpt_dir = Path(ckpt_dir)
        path = self.ckpt_dir / TOKENIZER_FILE
        self.tokenizer = load_text_tokenizer(path)
        vocab = self.tokenizer.get_vocab()
        absent = [f"[{code}]" for code in LANGUAGES if f"[{code}]" not in vocab]
        if absent:
            raise CheckpointError(f"{path} lacks the language token(s) {', '.join(absent)}")
        self.vocab_size: int = self.tokenizer.get_vocab_size()
        self._prepare: dict[str, object] = {}
        self._lock = threading.Lock()

    @staticmethod
    def check_language(language: str | None) -> str:
        """The language code a request is read in: None -> "en"; ValueError naming `language` for a code the
        model does not speak. Codes are matched case-insensitively, as the official does."""
        if language is None:
            return DEFAULT_LANGUAGE
        code = str(language).lower()
        if code not in LANGUAGES:
            raise ValueError(f"language {language!r} is not one of the Multilingual model's languages "
                             f"({', '.join(LANGUAGES)})")
        return code

    def normalize(self, text: str) -> str:
        return normalize_text_multilingual(text)

    def _preparer(self, language: str):
        with self._lock:
            prep = self._prepare.get(language)
            if prep is None:
                if language == "ja":
                    prep = JapaneseKana()
                elif language == "zh":
                    prep = ChineseCangjie(self.ckpt_dir)
                elif language == "he":
                    prep = HebrewDiacritics(self.ckpt_dir)
                elif language == "ru":
                    prep = RussianStress()
                else:
                    prep = decompose_hangul if language == "ko" else _as_is
                self._prepare[language] = prep
            return prep

    def prepare(self, text: str, language: str | None = None) -> str:
        """The text as the tokenizer sees it, before [SPACE]: lowercase, NFKD, the language's preparation, the
        language token in front."""
        language = self.check_language(language)
        text = unicodedata.normalize("NFKD", text.lower())
        text = self._preparer(language)(text)
        return f"[{language}]{text}"

    def encode(self, text: str, language: str | None = None) -> list[int]:
        """Token ids of `text` (already normalised) in `language` (None: English), without [START] / [STOP]."""
        return list(self.tokenizer.encode(self.prepare(text, language).replace(" ", SPACE)).ids)

    def decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=False)
        return text.replace(" ", "").replace(SPACE, " ").replace(STOP, "").replace("[UNK]", "")


def _as_is(text: str) -> str:
    return text
