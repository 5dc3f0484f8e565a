"""`tiny-random`: a small randomly initialised checkpoint in the official file layout, generated on the spot.

It exercises exactly the loading and inference code the real checkpoint does (same files, same keys, strict
loading), at a size that runs in a fraction of a second on a CPU. Its weights are random, so it speaks noise.
Sizes that tensor shapes cannot tell (head counts, upsampling rates) go into `serverless_config.json`
(checkpoint.CONFIG_FILE, read by checkpoint.read_config). `engine/resolve.py` writes it on first use of
`--model tiny-random`.
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


def synthetic_voice(sample_rate: int = 24000, seconds: float = 4.0, seed: int = 0) -> np.ndarray:
    """A voice-like test signal: a harmonic series with a wandering pitch and a syllable-rate envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    f0 = 130 + 25 * np.sin(2 * np.pi * 0.6 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    sig = sum(np.sin(k * phase) / k for k in range(1, 16)) * (0.2 + 0.8 * np.sin(2 * np.pi * 3.1 * t) ** 2)
    sig = sig + 0.01 * rng.standard_normal(t.shape)
    return (0.3 * sig / np.abs(sig).max()).astype(np.float32)


def _jsonable(cfg) -> dict:
    return dataclasses.asdict(cfg)      # tuples become JSON lists when written


def write_tiny_checkpoint(target: str | os.PathLike, seed: int = 0) -> Path:
    """Write a complete tiny random checkpoint to `target` (atomically: a half-written one is never seen)."""
    from safetensors.torch import save_file
    from .checkpoint import CONFIG_FILE
    from .conditioning import VoiceFrontEnd, save_builtin_voice
    from .models.s3gen import S3Gen, S3GenConfig
    from .models.t3 import T3, T3Config
    from .models.voice_encoder import VoiceEncoder, VoiceEncoderConfig

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        torch.manual_seed(seed)
        ve_cfg, s3_cfg = VoiceEncoderConfig.tiny(), S3GenConfig.tiny()
        # T3 takes the voice encoder's embedding, and text chunks as long as the pipeline makes them
        t3_cfg = dataclasses.replace(T3Config.tiny(), speaker_embed_size=ve_cfg.embed_size, max_text_positions=402)
        ve, t3, s3gen = VoiceEncoder(ve_cfg).eval(), T3(t3_cfg).eval(), S3Gen(s3_cfg).eval()
        for name, module in (("ve", ve), ("t3_cfg", t3), ("s3gen", s3gen)):
            save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()},
                      str(tmp / f"{name}.safetensors"))
        write_char_tokenizer(tmp / "tokenizer.json")
        config = {"voice_encoder": _jsonable(ve_cfg), "t3": _jsonable(t3_cfg),
                  "s3tokenizer": _jsonable(s3_cfg.tokenizer), "campplus": _jsonable(s3_cfg.speaker_encoder),
                  "flow": _jsonable(s3_cfg.flow), "hift": _jsonable(s3_cfg.mel2wav)}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        # The built-in voice: conditionals of a synthetic clip, computed by the checkpoint's own front-end.
        front_end = VoiceFrontEnd.load(tmp, device="cpu")
        with torch.inference_mode():
            conds = front_end.compute(synthetic_voice(seed=seed), 24000)
        save_builtin_voice(conds, tmp / "conds.pt")
        try:
            tmp.rename(target)
        except OSError:                      # another process finished first: keep theirs
            if not (target / "conds.pt").is_file():
                raise
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
