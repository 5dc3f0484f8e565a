"""What a deployment can serve, without loading anything: the API model name of each variant of the family and
how a `--model` spec names one. Cheap to import (no torch): the API validates models with it on replicas that
load no engine.

    --model SPEC           SPEC = [VARIANT=]SOURCE
    SOURCE                 a Hugging Face repo id, a checkpoint directory, or tiny-random[-turbo|-multilingual|-vc]
    VARIANT=               which model of the checkpoint to serve, where the files alone cannot tell:
                           multilingual=ResembleAI/chatterbox (its files sit beside the original's in that repo),
                           vc=ResembleAI/chatterbox (voice conversion: the original's S3Gen alone)

Without `VARIANT=` the variant comes from the tiny name, the official repo id, or the directory's files (the
original's t3_cfg.safetensors first; engine/variants.py `detect_variant` has the full rule).
"""
from __future__ import annotations

from pathlib import Path

# variant name -> the model name of its routes (/v1/<name>, /v2/<name>) and of jobs
API_MODELS: dict[str, str] = {
    "original": "chatterbox-tts",
    "turbo": "chatterbox-turbo",
    "multilingual": "chatterbox-multilingual",
    "vc": "chatterbox-vc",
}
OFFICIAL_REPOS: dict[str, str] = {"resembleai/chatterbox": "original", "resembleai/chatterbox-turbo": "turbo"}
TINY_PREFIX = "tiny-random"
# T3 file -> variant, in the order a directory holding several is read (the original wins)
T3_FILES: dict[str, str] = {"t3_cfg.safetensors": "original", "t3_turbo_v1.safetensors": "turbo",
                            "t3_mtl23ls_v2.safetensors": "multilingual"}


def parse_model_spec(spec: str) -> tuple[str | None, str]:
    """(variant named by a `VARIANT=` prefix or None, the source). ValueError for an unknown variant name."""
    head, sep, rest = spec.partition("=")
    if not sep:
        return None, spec
    if head not in API_MODELS:
        raise ValueError(f"--model {spec!r}: {head!r} is not a model variant "
                         f"({', '.join(API_MODELS)}); write VARIANT=SOURCE or SOURCE")
    if not rest:
        raise ValueError(f"--model {spec!r}: no checkpoint after '{head}='")
    return head, rest


def variant_of_spec(spec: str) -> str | None:
    """The variant a spec serves, as far as can be told without downloading or loading: the `VARIANT=` prefix, a
    tiny name, an official repo id, or a local directory's files. None for another repo id (its file list on the
    hub tells; engine/resolve.py)."""
    variant, source = parse_model_spec(spec)
    if variant is not None:
        return variant
    if source == TINY_PREFIX:
        return "original"
    if source.startswith(TINY_PREFIX + "-") and source[len(TINY_PREFIX) + 1:] in API_MODELS:
        return source[len(TINY_PREFIX) + 1:]
    if source.lower() in OFFICIAL_REPOS:
        return OFFICIAL_REPOS[source.lower()]
    path = Path(source).expanduser()
    if path.is_dir():
        for name, v in T3_FILES.items():
            if (path / name).is_file():
                return v
        if (path / "s3gen.safetensors").is_file() or (path / "s3gen.pt").is_file():
            return "vc"
    return None


def api_model_of_spec(spec: str) -> str | None:
    """The API model name a spec serves (None when it cannot be told without the hub)."""
    variant = variant_of_spec(spec)
    return API_MODELS[variant] if variant else None
