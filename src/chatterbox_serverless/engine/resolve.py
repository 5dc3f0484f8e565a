"""From a model name to a checkpoint directory: a local directory, `tiny-random` / `tiny-random-turbo` (small
random checkpoints written by engine/tiny.py on first use), or a Hugging Face repo id (downloaded once).

Which model a directory holds is recognised from its files (engine/variants.py `detect_variant`); which files a
repo id needs, from the official repo ids (`ResembleAI/chatterbox`, `ResembleAI/chatterbox-turbo`) or, for
another repo, from its file list: only that variant's files are downloaded. HF_HUB_OFFLINE and the local cache
are honoured; when a model cannot be had, CheckpointError says so in one sentence.
"""
from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import CheckpointError
from .variants import ORIGINAL, TURBO, VARIANTS, Variant, detect_variant, variant_for_files, variant_for_repo

DEFAULT_REPO = "ResembleAI/chatterbox"
TINY = "tiny-random"
TINY_MODELS = {TINY: ORIGINAL, f"{TINY}-turbo": TURBO}     # name -> the variant its random checkpoint has


def default_data_dir() -> Path:
    return Path.home() / ".cache" / "chatterbox-serverless"


def resolve_checkpoint(model: str, data_dir: str | os.PathLike | None = None) -> Path:
    """A directory holding the checkpoint files for `model`: a local directory, a tiny random checkpoint
    (generated under `data_dir` on first use), or a Hugging Face repo id (downloaded once)."""
    if model in TINY_MODELS:
        variant = TINY_MODELS[model]
        target = Path(data_dir or default_data_dir()) / model
        if variant.missing_files(target) or not (target / variant.builtin_voice_file).is_file():
            from .tiny import write_tiny_checkpoint
            write_tiny_checkpoint(target, variant=variant.name)
        return target
    path = Path(model).expanduser()
    if path.is_dir():
        variant = detect_variant(path)
        absent = variant.missing_files(path)
        if absent:
            raise CheckpointError(f"{path} is not a Chatterbox checkpoint: {', '.join(absent)} missing "
                                  f"(it holds {variant.t3_file}: the {variant.name} model).")
        return path
    tinies = " or ".join(f"--model {t}" for t in TINY_MODELS)
    if model.startswith(("/", ".", "~")) or path.exists():
        raise CheckpointError(f"checkpoint directory {model!r} does not exist; pass --model DIR with a checkpoint's "
                              f"files, a Hugging Face repo id ({', '.join(v.repo_id for v in VARIANTS.values())}), "
                              f"or {tinies}.")
    if model.count("/") != 1:
        raise CheckpointError(f"model {model!r} is neither a checkpoint directory nor a Hugging Face repo id "
                              f"(like {DEFAULT_REPO}); pass --model DIR, --model REPO_ID or {tinies}.")
    return _download(model, tinies)


def _download(repo_id: str, tinies: str) -> Path:
    from huggingface_hub import snapshot_download
    variant = variant_for_repo(repo_id)
    error: Exception | None = None
    try:
        if variant is None:
            variant = _variant_of_remote_repo(repo_id)
        return _checked(Path(snapshot_download(repo_id=repo_id, allow_patterns=variant.download_patterns())),
                        repo_id)
    except CheckpointError:
        raise
    except Exception as e:  # network down, repo missing, gated, offline mode without a cache
        error = e
    try:                    # what the local cache holds (offline, or the hub unreachable)
        patterns = variant.download_patterns() if variant else sorted({p for v in VARIANTS.values()
                                                                         for p in v.download_patterns()})
        local = Path(snapshot_download(repo_id=repo_id, allow_patterns=patterns, local_files_only=True))
        return _checked(local, repo_id)
    except CheckpointError:
        raise
    except Exception:
        pass
    raise CheckpointError(
        f"could not download {repo_id!r} from Hugging Face ({type(error).__name__}: "
        f"{str(error).splitlines()[0][:200] if str(error) else ''}); connect to the internet once, or copy the "
        f"checkpoint files into a directory and pass --model DIR (or {tinies} to try the service offline).") from None


def _variant_of_remote_repo(repo_id: str) -> Variant:
    """The variant of a repo that is not an official one, from its file list (needs the hub)."""
    from huggingface_hub import HfApi
    names = HfApi().list_repo_files(repo_id)
    variant = variant_for_files(names)
    if variant is None:
        known = " or ".join(v.t3_file for v in VARIANTS.values())
        raise CheckpointError(f"Hugging Face repo {repo_id!r} holds no Chatterbox model it can be recognised by "
                              f"(exactly one of {known}).")
    return variant


def _checked(path: Path, repo_id: str) -> Path:
    """A downloaded snapshot that holds a complete checkpoint of its variant."""
    variant = detect_variant(path)
    absent = variant.missing_files(path)
    if absent:
        raise CheckpointError(f"Hugging Face repo {repo_id!r} lacks {', '.join(absent)} for a Chatterbox "
                              f"{variant.name} checkpoint.")
    return path
