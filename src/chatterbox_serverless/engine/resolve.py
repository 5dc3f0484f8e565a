"""From a `--model` spec to a checkpoint directory: a local directory, a tiny random checkpoint
(`tiny-random[-turbo|-multilingual]`, written by engine/tiny.py on first use), or a Hugging Face repo id
(downloaded once). The spec grammar is engine/catalog.py's: `[VARIANT=]SOURCE`.

Which model a directory holds is recognised from its files (engine/variants.py `detect_variant`); which files a
repo id needs, from the official repo ids (`ResembleAI/chatterbox`, `ResembleAI/chatterbox-turbo`) or, for
another repo, from its file list: only that variant's files are downloaded. `VARIANT=` names the model where the
files alone cannot tell: `multilingual=ResembleAI/chatterbox` downloads the Multilingual files of the repo it
shares with the original. When the directory then also holds another model's T3 file (the original's, say,
downloaded into the same snapshot earlier), the directory returned is a view of the named variant's files only
(symbolic links under DATA_DIR/views/), so that whatever reads it recognises that variant. HF_HUB_OFFLINE and the
local cache are honoured; when a model cannot be had, CheckpointError says so in one sentence. `vc=`,
`tiny-random-vc` and a directory with S3Gen alone are voice conversion's checkpoints (`_resolve_vc`).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .catalog import TINY_PREFIX, parse_model_spec
from .checkpoint import CONFIG_FILE, CheckpointError
from .variants import (MULTILINGUAL, ORIGINAL, TURBO, VARIANTS, Variant, detect_variant, variant_for_files,
                       variant_for_repo)

DEFAULT_REPO = "ResembleAI/chatterbox"
TINY = TINY_PREFIX
TINY_MODELS = {TINY: ORIGINAL, f"{TINY}-turbo": TURBO, f"{TINY}-multilingual": MULTILINGUAL}   # -> its variant
VC = "vc"


def default_data_dir() -> Path:
    return Path.home() / ".cache" / "chatterbox-serverless"


def resolve_checkpoint(model: str, data_dir: str | os.PathLike | None = None) -> Path:
    """A directory holding the checkpoint files for the spec `model` (`[VARIANT=]SOURCE`): a local directory, a
    tiny random checkpoint (generated under `data_dir` on first use), or a Hugging Face repo id (downloaded once);
    with `VARIANT=`, that variant's files (see the module docstring)."""
    try:
        name, source = parse_model_spec(model)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    from .catalog import variant_of_spec
    if variant_of_spec(model) == VC:      # voice conversion: S3Gen (+ the built-in target voice) only
        return _resolve_vc(source, data_dir)
    wanted = VARIANTS[name] if name is not None else None
    data = Path(data_dir or default_data_dir())
    if source in TINY_MODELS:
        variant = TINY_MODELS[source]
        if wanted is not None and wanted is not variant:
            raise CheckpointError(f"--model {model!r}: {source} is the {variant.name} model, not {wanted.name}")
        target = data / source
        if variant.missing_files(target) or not (target / variant.builtin_voice_file).is_file():
            from .tiny import write_tiny_checkpoint
            write_tiny_checkpoint(target, variant=variant.name)
        return target
    path = Path(source).expanduser()
    if path.is_dir():
        variant = detect_variant(path, wanted.name if wanted else None)
        absent = variant.missing_files(path)
        if absent:
            raise CheckpointError(f"{path} is not a Chatterbox checkpoint: {', '.join(absent)} missing "
                                  f"(it holds {variant.t3_file}: the {variant.name} model).")
        return _view_of(path, variant, data)
    tinies = " or ".join(f"--model {t}" for t in TINY_MODELS)
    if source.startswith(("/", ".", "~")) or path.exists():
        raise CheckpointError(f"checkpoint directory {source!r} does not exist; pass --model DIR with a checkpoint's "
                              f"files, a Hugging Face repo id ({', '.join(sorted({v.repo_id for v in VARIANTS.values()}))}), "
                              f"or {tinies}.")
    if source.count("/") != 1:
        raise CheckpointError(f"model {source!r} is neither a checkpoint directory nor a Hugging Face repo id "
                              f"(like {DEFAULT_REPO}); pass --model DIR, --model REPO_ID or {tinies}.")
    return _resolved_download(source, tinies, wanted, data)


def _resolved_download(repo_id: str, tinies: str, wanted: Variant | None, data: Path) -> Path:
    path, variant = _download(repo_id, tinies, wanted)
    return _view_of(path, variant, data)


def _view_of(path: Path, variant: Variant, data: Path) -> Path:
    """`path` itself when its files are recognised as `variant`; otherwise (another model's T3 file beside it) a
    directory of links to this variant's files (and the configuration file) in `path`, under data/views/."""
    if detect_variant_or_none(path) is variant:
        return path
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    view = data / "views" / f"{variant.name}-{digest}"
    view.mkdir(parents=True, exist_ok=True)
    for name in [*variant.download_patterns(), CONFIG_FILE]:
        src, link = path / name, view / name
        if link.is_symlink() or link.exists():
            if link.is_symlink() and os.readlink(link) == str(src.absolute()) and src.exists():
                continue
            link.unlink()
        if src.exists():
            link.symlink_to(src.absolute())
    return view


def detect_variant_or_none(path: Path) -> Variant | None:
    try:
        return detect_variant(path)
    except CheckpointError:
        return None


def _download(repo_id: str, tinies: str, wanted: Variant | None = None) -> tuple[Path, Variant]:
    """(the snapshot directory, its variant): `wanted`'s files, or those of the repo's variant."""
    from huggingface_hub import snapshot_download
    variant = wanted or variant_for_repo(repo_id)
    error: Exception | None = None
    try:
        if variant is None:
            variant = _variant_of_remote_repo(repo_id)
        return _checked(Path(snapshot_download(repo_id=repo_id, allow_patterns=variant.download_patterns())),
                        repo_id, variant), variant
    except CheckpointError:
        raise
    except Exception as e:  # network down, repo missing, gated, offline mode without a cache
        error = e
    try:                    # what the local cache holds (offline, or the hub unreachable)
        patterns = variant.download_patterns() if variant else sorted({p for v in VARIANTS.values()
                                                                         for p in v.download_patterns()})
        local = Path(snapshot_download(repo_id=repo_id, allow_patterns=patterns, local_files_only=True))
        variant = variant or detect_variant(local)
        return _checked(local, repo_id, variant), variant
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
                              f"(one of {known}; name it with VARIANT=REPO_ID when it holds several).")
    return variant


def _checked(path: Path, repo_id: str, variant: Variant) -> Path:
    """A downloaded snapshot that holds a complete checkpoint of `variant`."""
    detect_variant(path, variant.name)
    absent = variant.missing_files(path)
    if absent:
        raise CheckpointError(f"Hugging Face repo {repo_id!r} lacks {', '.join(absent)} for a Chatterbox "
                              f"{variant.name} checkpoint.")
    return path


VC_FILES = ("s3gen.safetensors", "conds.pt")      # what voice conversion needs of a checkpoint (conds.pt optional)


def _resolve_vc(source: str, data_dir) -> Path:
    """Voice conversion's checkpoint: S3Gen (+ the built-in target voice): `tiny-random-vc`, a directory with
    s3gen.safetensors (a VC checkpoint, or the original model's), or a repo id (only those files downloaded)."""
    from .vc import make_tiny_vc
    if source in (f"{TINY}-{VC}", TINY):
        target = Path(data_dir or default_data_dir()) / f"{TINY}-{VC}"
        if not (target / "conds.pt").is_file():
            make_tiny_vc(target)
        return target
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / VC_FILES[0]).is_file():
            raise CheckpointError(f"{path} is not a voice-conversion checkpoint: s3gen.safetensors missing.")
        return path
    if source.count("/") != 1:
        raise CheckpointError(f"model {source!r} is neither a checkpoint directory nor a Hugging Face repo id "
                              f"(like vc={DEFAULT_REPO}).")
    from huggingface_hub import snapshot_download
    try:
        local = Path(snapshot_download(repo_id=source, allow_patterns=list(VC_FILES)))
    except Exception as e:  # network down, repo missing, offline without a cache: the cache, else one sentence
        try:
            local = Path(snapshot_download(repo_id=source, allow_patterns=list(VC_FILES), local_files_only=True))
        except Exception:
            raise CheckpointError(f"could not download {source!r} from Hugging Face ({type(e).__name__}); connect "
                                  f"to the internet once, or pass --model vc=DIR with s3gen.safetensors "
                                  f"[+ conds.pt].") from None
    if not (local / VC_FILES[0]).is_file():
        raise CheckpointError(f"Hugging Face repo {source!r} has no s3gen.safetensors for voice conversion.")
    return local
