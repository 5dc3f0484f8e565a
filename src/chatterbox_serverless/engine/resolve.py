"""From a model name to a checkpoint directory: a local directory, `tiny-random` (a small random checkpoint
written by engine/tiny.py on first use), or a Hugging Face repo id (downloaded once)."""
from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import CHECKPOINT_FILES, CheckpointError

DEFAULT_REPO = "ResembleAI/chatterbox"
TINY = "tiny-random"


def default_data_dir() -> Path:
    return Path.home() / ".cache" / "chatterbox-serverless"


def resolve_checkpoint(model: str, data_dir: str | os.PathLike | None = None) -> Path:
    """A directory holding the checkpoint files for `model`: a local directory, `tiny-random` (generated under
    `data_dir` on first use), or a Hugging Face repo id (downloaded once; HF_HUB_OFFLINE / the cache honoured)."""
    if model == TINY:
        target = Path(data_dir or default_data_dir()) / TINY
        if not all((target / f).is_file() for f in CHECKPOINT_FILES):
            from .tiny import write_tiny_checkpoint
            write_tiny_checkpoint(target)
        return target
    path = Path(model).expanduser()
    if path.is_dir():
        absent = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
        if absent:
            raise CheckpointError(f"{path} is not a Chatterbox checkpoint: {', '.join(absent)} missing.")
        return path
    if model.startswith(("/", ".", "~")) or path.exists():
        raise CheckpointError(f"checkpoint directory {model!r} does not exist; pass --model DIR with the files "
                              f"{', '.join(CHECKPOINT_FILES)}, a Hugging Face repo id, or --model {TINY}.")
    if model.count("/") != 1:
        raise CheckpointError(f"model {model!r} is neither a checkpoint directory nor a Hugging Face repo id "
                              f"(like {DEFAULT_REPO}); pass --model DIR, --model REPO_ID or --model {TINY}.")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id=model, allow_patterns=list(CHECKPOINT_FILES)))
    except Exception as e:  # network down, repo missing, gated, offline mode without a cache
        try:
            return Path(snapshot_download(repo_id=model, allow_patterns=list(CHECKPOINT_FILES), local_files_only=True))
        except Exception:
            pass
        raise CheckpointError(
            f"could not download {model!r} from Hugging Face ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"connect to the internet once, or copy the checkpoint files into a directory and pass --model DIR "
            f"(or --model {TINY} to try the service offline).") from None
