"""`tiny-random`, `tiny-random-turbo` and `tiny-random-multilingual`: small randomly initialised checkpoints in a
variant's official file layout, generated on the spot.

They exercise exactly the loading and inference code the real checkpoints do (same files, same keys, strict
loading), at a size that runs in a fraction of a second on a CPU. Their weights are random, so they speak noise.
Sizes that tensor shapes cannot tell (head counts, upsampling rates) go into `serverless_config.json`
(checkpoint.CONFIG_FILE, read by checkpoint.read_config). `engine/resolve.py` writes them on first use of
`--model tiny-random` / `--model tiny-random-turbo`. The Turbo one has the official repo's text files: a small
GPT-2-style byte-level BPE in vocab.json + merges.txt, the 19 paralinguistic tags in added_tokens.json. The
Multilingual one has the official file names and formats (ve.pt and s3gen.pt torch-saved, a grapheme
tokenizer with the 23 language tokens, a small Cangjie5_TC.json) and a 2-layer T3 whose alignment heads are
named in its serverless_config.json.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

# Official special tokens and ids of tokenizer.json: [STOP]=0 [UNK]=1 [SPACE]=2 [START]=255, 704 ids in all.
_SPECIALS = ["[STOP]", "[UNK]", "[SPACE]", "[PAD]", "[SEP]", "[CLS]", "[MASK]"]
TEXT_VOCAB = 704


def write_char_tokenizer(path: Path) -> None:
    """A character-level tokenizer.json with the official special ids (the real one is BPE over the same ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for ch in [chr(c) for c in range(33, 127)]:
        vocab.setdefault(ch, len(vocab))
    vocab.update({f"[extra{i}]": i for i in range(len(vocab), 255)})
    vocab["[START]"] = 255
    vocab.update({f"[extra{i}]": i for i in range(256, TEXT_VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.add_special_tokens(_SPECIALS + ["[START]"])
    tok.save(str(path))


# Multilingual: what the tiny grapheme tokenizer knows besides the specials (lowercase, NFKD-stable): ASCII,
# combining marks, Hangul conjoining jamo, the CJK comma and full stop, a few Chinese characters (Cangjie)
_GRAPHEME_BLOCKS = [(0x21, 0x7E), (0xDF, 0xDF), (0x300, 0x36F), (0x1100, 0x11FF), (0x3001, 0x3002)]
TINY_CANGJIE = {"你": "onf", "好": "vnd", "我": "hqi", "们": "oan"}
TINY_ALIGNMENT_HEADS = ((1, 3), (1, 1), (0, 2))


def write_grapheme_tokenizer(path: Path) -> int:
    """A grapheme-level tokenizer in the layout of grapheme_mtl_merged_expanded_v1.json: [STOP]=0 [UNK]=1
    [SPACE]=2 [START]=255, one id per character, the 23 language tokens [ar]..[zh] whole. Returns its size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from unicodedata import normalize
    from .languages import LANGUAGES
    chars = [chr(c) for lo, hi in _GRAPHEME_BLOCKS for c in range(lo, hi + 1)]
    chars = [c for c in chars if normalize("NFKD", c) == c and c.lower() == c] + sorted(TINY_CANGJIE)
    lang_tokens = [f"[{code}]" for code in sorted(LANGUAGES)]
    vocab: dict[str, int] = {}
    for item in _SPECIALS + chars + lang_tokens:
        if len(vocab) == 255:
            vocab["[START]"] = 255
        vocab[item] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.add_special_tokens(_SPECIALS[:3] + ["[START]"] + _SPECIALS[3:] + lang_tokens)
    tok.save(str(path))
    return len(vocab)


def synthetic_voice(sample_rate: int = 24000, seconds: float = 4.0, seed: int = 0) -> np.ndarray:
    """A voice-like test signal: a harmonic series with a wandering pitch and a syllable-rate envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    f0 = 130 + 25 * np.sin(2 * np.pi * 0.6 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    sig = sum(np.sin(k * phase) / k for k in range(1, 16)) * (0.2 + 0.8 * np.sin(2 * np.pi * 3.1 * t) ** 2)
    sig = sig + 0.01 * rng.standard_normal(t.shape)
    return (0.3 * sig / np.abs(sig).max()).astype(np.float32)


TURBO_TAGS = ["[laugh]", "[chuckle]", "[gasp]", "[cough]", "[sigh]", "[groan]", "[sniff]", "[shush]", "[clear throat]",
              "[angry]", "[crying]", "[dramatic]", "[fear]", "[happy]", "[narration]", "[sarcastic]", "[surprised]",
              "[whispering]", "[advertisement]"]
_BPE_TEXT = [
    "Hi there, Sarah here from the support team calling you back.", "Have you got one minute to chat?",
    "The quick brown fox jumps over the lazy dog.", "Thanks for calling, how can I help you today?",
    "Please hold while I transfer you to the right department.", "Well, that was unexpected, wasn't it?",
    "It costs about twelve dollars and fifty cents, and it ships tomorrow morning.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 and punctuation: commas, dots; dashes - quotes \"' (brackets) [tags]!",
]


def write_bpe_tokenizer(target: Path, vocab_size: int = 400) -> int:
    """Turbo's tokenizer files in the official repo layout (vocab.json, merges.txt, added_tokens.json,
    special_tokens_map.json, tokenizer_config.json): a byte-level BPE trained on a few sentences, then the tags.
    Returns the vocabulary size, tags included."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_BPE_TEXT * 4, trainer)
    tok.model.save(str(target))                      # vocab.json, merges.txt
    base = tok.get_vocab_size()
    (target / "added_tokens.json").write_text(json.dumps({t: base + i for i, t in enumerate(TURBO_TAGS)}, indent=1))
    special = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    (target / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    (target / "tokenizer_config.json").write_text(json.dumps(
        dict(special, tokenizer_class="GPT2Tokenizer", model_max_length=1024, add_prefix_space=False,
             add_bos_token=False), indent=1))
    return base + len(TURBO_TAGS)


def _jsonable(cfg) -> dict:
    return dataclasses.asdict(cfg)      # tuples become JSON lists when written


def write_tiny_checkpoint(target: str | os.PathLike, seed: int = 0, variant: str = "original") -> Path:
    """Write a complete tiny random checkpoint of `variant` ("original", "turbo" or "multilingual",
    engine/variants.py) to `target` (atomically: a half-written one is never seen)."""
    from safetensors.torch import save_file
    from .checkpoint import CONFIG_FILE
    from .conditioning import VoiceFrontEnd, save_builtin_voice
    from .models.s3gen import S3Gen, S3GenConfig
    from .models.t3 import T3, T3Config
    from .models.voice_encoder import VoiceEncoder, VoiceEncoderConfig
    from .variants import VARIANTS

    spec = VARIANTS[variant]

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        torch.manual_seed(seed)
        ve_cfg, s3_cfg = VoiceEncoderConfig.tiny(), S3GenConfig.tiny()
        if spec.flow.get("solver") == "meanflow":
            s3_cfg.flow.solver, s3_cfg.flow.n_timesteps = "meanflow", spec.flow.get("n_timesteps", 2)
            s3_cfg.flow.decoder.meanflow = True
        if spec.t3.get("backbone") == "gpt2":
            n_text = write_bpe_tokenizer(tmp)
            t3_cfg = dataclasses.replace(T3Config.tiny_turbo(), speaker_embed_size=ve_cfg.embed_size,
                                         text_vocab_size=n_text, backbone_vocab_size=n_text,
                                         prompt_len=spec.t3.get("prompt_len", 375))
        elif spec.text_front_end == "multilingual":
            n_text = write_grapheme_tokenizer(tmp / spec.text_files[0][0])
            (tmp / "Cangjie5_TC.json").write_text(json.dumps([f"{w}\t{c}" for w, c in TINY_CANGJIE.items()],
                                                             ensure_ascii=False))
            t3_cfg = dataclasses.replace(T3Config.tiny(), speaker_embed_size=ve_cfg.embed_size, max_text_positions=402,
                                         text_vocab_size=n_text, alignment_heads=TINY_ALIGNMENT_HEADS)
        else:
            write_char_tokenizer(tmp / "tokenizer.json")
            # T3 takes the voice encoder's embedding, and text chunks as long as the pipeline makes them
            t3_cfg = dataclasses.replace(T3Config.tiny(), speaker_embed_size=ve_cfg.embed_size, max_text_positions=402)
        ve, t3, s3gen = VoiceEncoder(ve_cfg).eval(), T3(t3_cfg).eval(), S3Gen(s3_cfg).eval()
        for name, module in ((spec.ve_file, ve), (spec.t3_file, t3), (spec.s3gen_file, s3gen)):
            state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
            if name.endswith(".safetensors"):
                save_file(state, str(tmp / name))
            else:                            # the Multilingual checkpoint's torch-saved state dicts (ve.pt, s3gen.pt)
                torch.save(state, str(tmp / name))
        config = {"voice_encoder": _jsonable(ve_cfg), "t3": _jsonable(t3_cfg),
                  "s3tokenizer": _jsonable(s3_cfg.tokenizer), "campplus": _jsonable(s3_cfg.speaker_encoder),
                  "flow": _jsonable(s3_cfg.flow), "hift": _jsonable(s3_cfg.mel2wav)}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        # The built-in voice: conditionals of a synthetic clip, computed by the checkpoint's own front-end.
        front_end = VoiceFrontEnd.load(tmp, device="cpu", settings=spec.voice, s3gen_file=spec.s3gen_file,
                                       ve_file=spec.ve_file)
        seconds = max(4.0, (spec.voice.longer_than_seconds or 0) + 1)
        with torch.inference_mode():
            conds = front_end.compute(synthetic_voice(seconds=seconds, seed=seed), 24000)
        save_builtin_voice(conds, tmp / "conds.pt")
        try:
            tmp.rename(target)
        except OSError:                      # another process finished first: keep theirs
            if not (target / "conds.pt").is_file():
                raise
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
