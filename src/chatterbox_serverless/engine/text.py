"""Text front-ends of T3: text -> normalised text -> token ids, one per variant (engine/variants.py picks it).

English (the original model): `normalize_text` reproduces chatterbox-tts 0.1.7 `tts.punc_norm` exactly (same
replacements, same order), so the token ids match the official ones. `TextTokenizer.encode` replaces every space
with `[SPACE]` and runs the HF `tokenizers` model of `tokenizer.json`, as the official `EnTokenizer` does;
`[START]` / `[STOP]` are added by T3 (`T3.frame_text`).

Every front-end has `check_language(language)` and `encode(text, language=None)`: the English-only ones take
None or "en" and refuse any other language (ValueError naming `language`); the Multilingual model's front-end
(engine/text_multilingual.py) reads the text in the requested language.

GPT-2 BPE (Turbo): `normalize_text_turbo` is 0.1.7 `tts_turbo.punc_norm` (its own, shorter list), and
`BPETokenizer` is what `AutoTokenizer.from_pretrained(ckpt_dir)(text, truncation=True).input_ids` gives: GPT-2's
byte-level BPE, no BOS/EOS added, the 19 paralinguistic tags (`[laugh]`, `[clear throat]`, ...) as added tokens
matched whole before the BPE (so a tag is one id wherever it stands), cut at `model_max_length`. It reads
`tokenizer.json` when the checkpoint has one, else builds the same tokenizer from the Hugging Face files
`vocab.json` + `merges.txt` (+ `added_tokens.json`, `tokenizer_config.json`), as transformers converts them.
"""
from __future__ import annotations

from pathlib import Path

import re

from .checkpoint import CheckpointError, read_json

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
SENTENCE_ENDERS = (".", "!", "?", "-", ",")


def normalize_text(text: str, replacements=None, enders: tuple[str, ...] = SENTENCE_ENDERS) -> str:
    """The official punctuation clean-up: capitalise the first letter, collapse whitespace, map rare or LLM-style
    punctuation to common punctuation (`replacements`, default the original model's list), and end with a full
    stop when none of `enders` ends it (the Multilingual model also counts CJK punctuation)."""
    if len(text) == 0:
        return EMPTY_TEXT_REPLACEMENT
    if text[0].islower():
        text = text[0].upper() + text[1:]
    text = " ".join(text.split())
    for old, new in (_PUNCTUATION if replacements is None else replacements):
        text = text.replace(old, new)
    text = text.rstrip(" ")
    if not text.endswith(enders):
        text += "."
    return text


def load_text_tokenizer(path: Path):
    """A Chatterbox text tokenizer file (HF `tokenizers`, with [START], [STOP] and [SPACE]), or CheckpointError
    naming the file."""
    from tokenizers import Tokenizer
    if not path.is_file():
        raise CheckpointError(f"text tokenizer file {path} is missing")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:   # not JSON, not a tokenizers file
        raise CheckpointError(f"{path} is not a tokenizers file ({type(e).__name__}: {e})") from None
    vocab = tokenizer.get_vocab()
    missing = [t for t in (START, STOP, SPACE) if t not in vocab]
    if missing:
        raise CheckpointError(f"{path} is not a Chatterbox text tokenizer: no {', '.join(missing)} token")
    return tokenizer


class TextTokenizer:
    """The checkpoint's `tokenizer.json` (HF `tokenizers`), used the official way: ' ' -> '[SPACE]', then encode."""

    def __init__(self, path_to_tokenizer_json: str | Path):
        self.tokenizer = load_text_tokenizer(Path(path_to_tokenizer_json))
        vocab = self.tokenizer.get_vocab()
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


class EnglishFrontEnd:
    """The original model's text front-end: `normalize_text`, then `TextTokenizer` (tokenizer.json)."""
    name = "english"

    def __init__(self, ckpt_dir: str | Path):
        self.tokenizer = TextTokenizer(Path(ckpt_dir) / "tokenizer.json")
        self.vocab_size = self.tokenizer.vocab_size

    def normalize(self, text: str) -> str:
        return normalize_text(text)

    @staticmethod
    def check_language(language: str | None) -> None:
        check_english(language)

    def encode(self, text: str, language: str | None = None) -> list[int]:
        check_english(language)
        return self.tokenizer.encode(text)


# ------------------------------------------------------------------------------------------------------- Turbo

# (old, new), applied in this order, as in 0.1.7 tts_turbo.punc_norm (no "...", " - " or ";" there).
_TURBO_PUNCTUATION = (
    ("\u2026", ", "),   # …
    (":", ","),
    ("\u2014", "-"),    # em dash
    ("\u2013", "-"),    # en dash
    (" ,", ","),
    ("\u201c", '"'),    # “
    ("\u201d", '"'),    # ”
    ("\u2018", "'"),    # ‘
    ("\u2019", "'"),    # ’
)


def normalize_text_turbo(text: str) -> str:
    """Turbo's punctuation clean-up (tts_turbo.punc_norm): as `normalize_text`, with Turbo's replacement list."""
    return normalize_text(text, _TURBO_PUNCTUATION)


DEFAULT_MODEL_MAX_LENGTH = 1024      # GPT-2's; tokenizer_config.json may say otherwise


class BPETokenizer:
    """GPT-2 byte-level BPE from a checkpoint directory's Hugging Face tokenizer files (see the module docstring).
    `encode` gives the ids of `tokenizer(text, truncation=True).input_ids`."""

    def __init__(self, ckpt_dir: str | Path):
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
        ckpt_dir = Path(ckpt_dir)
        config_path = ckpt_dir / "tokenizer_config.json"
        config = read_json(config_path) if config_path.is_file() else {}
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path} must hold an object")
        if config.get("add_bos_token") or config.get("add_eos_token"):
            raise CheckpointError(f"{config_path}: a GPT-2 tokenizer adding BOS/EOS tokens is not Turbo's")
        self.model_max_length = int(config.get("model_max_length") or DEFAULT_MODEL_MAX_LENGTH)
        if self.model_max_length > 10 ** 9:      # transformers' "no limit" sentinel (int(1e30))
            self.model_max_length = 10 ** 9
        tok_json, vocab, merges = (ckpt_dir / n for n in ("tokenizer.json", "vocab.json", "merges.txt"))
        if tok_json.is_file():
            try:
                tok = Tokenizer.from_file(str(tok_json))
            except Exception as e:   # not JSON, not a tokenizers file
                raise CheckpointError(f"{tok_json} is not a tokenizers file ({type(e).__name__}: {e})") from None
            self.source = tok_json.name
        elif vocab.is_file() and merges.is_file():
            vocab_map = read_json(vocab)
            if not isinstance(vocab_map, dict):
                raise CheckpointError(f"{vocab} must map tokens to ids")
            try:
                lines = merges.read_text(encoding="utf-8").splitlines()
                pairs = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
                if any(len(p) != 2 for p in pairs):
                    raise ValueError("a line is not two tokens separated by one space")
                tok = Tokenizer(models.BPE(vocab=vocab_map, merges=pairs, dropout=None, continuing_subword_prefix="",
                                           end_of_word_suffix="", fuse_unk=False))
            except Exception as e:
                raise CheckpointError(f"{merges} / {vocab}: not a GPT-2 BPE ({type(e).__name__}: {e})") from None
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)))
            tok.decoder = decoders.ByteLevel()
            tok.post_processor = processors.ByteLevel(trim_offsets=False)
            added_path = ckpt_dir / "added_tokens.json"
            added = read_json(added_path) if added_path.is_file() else {}
            if not isinstance(added, dict):
                raise CheckpointError(f"{added_path} must map tokens to ids")
            for content, expected in sorted(added.items(), key=lambda kv: kv[1]):
                tok.add_tokens([AddedToken(content, special=False, normalized=True)])
                if tok.token_to_id(content) != expected:
                    raise CheckpointError(f"{added_path}: {content!r} should have id {expected}, the vocabulary "
                                          f"gives it {tok.token_to_id(content)}")
            for special in _special_tokens(ckpt_dir, config):
                if tok.token_to_id(special) is None:
                    raise CheckpointError(f"{ckpt_dir}: special token {special!r} is not in {vocab.name}")
                tok.add_special_tokens([AddedToken(special, special=True, normalized=False)])
            self.source = f"{vocab.name} + {merges.name}"
        else:
            raise CheckpointError(f"{ckpt_dir} has no GPT-2 tokenizer: it needs tokenizer.json, or vocab.json and "
                                  f"merges.txt (with added_tokens.json for the paralinguistic tags)")
        tok.no_truncation()
        tok.no_padding()
        self.tokenizer = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.tags = sorted(t.content for t in tok.get_added_tokens_decoder().values()
                           if TAG.fullmatch(t.content))

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=True).ids
        return list(ids[: self.model_max_length])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def _special_tokens(ckpt_dir: Path, config: dict) -> list[str]:
    """bos/eos/unk/pad token strings of tokenizer_config.json / special_tokens_map.json."""
    path = ckpt_dir / "special_tokens_map.json"
    mapping = read_json(path) if path.is_file() else {}
    found = []
    for source in (mapping if isinstance(mapping, dict) else {}, config):
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = source.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and value not in found:
                found.append(value)
    return found


TAG = re.compile(r"\[[^\[\]]{1,40}\]")      # a paralinguistic tag: [laugh], [clear throat]


class GPT2FrontEnd:
    """Turbo's text front-end: `normalize_text_turbo`, then `BPETokenizer`."""
    name = "gpt2-bpe"

    def __init__(self, ckpt_dir: str | Path):
        self.tokenizer = BPETokenizer(ckpt_dir)
        self.vocab_size = self.tokenizer.vocab_size

    def normalize(self, text: str) -> str:
        return normalize_text_turbo(text)

    @staticmethod
    def check_language(language: str | None) -> None:
        check_english(language)

    def encode(self, text: str, language: str | None = None) -> list[int]:
        check_english(language)
        return self.tokenizer.encode(text)


def check_english(language: str | None) -> None:
    """The language check of the English-only front-ends: None or "en", else ValueError naming `language`."""
    if language is not None and str(language).lower() != "en":
        raise ValueError(f"language {language!r}: this model speaks English only (leave language unset or 'en'; "
                         f"other languages are the chatterbox-multilingual model's)")


from .text_multilingual import MultilingualFrontEnd  # noqa: E402  (it builds on this module's functions)

FRONT_ENDS = {c.name: c for c in (EnglishFrontEnd, GPT2FrontEnd, MultilingualFrontEnd)}
