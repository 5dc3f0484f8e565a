"""Finding a checkpoint (local directory, Hugging Face repo id, or `tiny-random`) and loading weights strictly.

The official layout (ResembleAI/chatterbox): ve.safetensors, t3_cfg.safetensors, s3gen.safetensors,
tokenizer.json, conds.pt. Loading is strict: every learned tensor of a module must be in the file with its
shape, and every tensor in the file must belong to the module. Only buffers that a module can compute itself
(mel filters, windows; listed in the module's `computable_buffers`) may be absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

CHECKPOINT_FILES = ("ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json", "conds.pt")
DEFAULT_REPO = "ResembleAI/chatterbox"
TINY = "tiny-random"


class CheckpointError(Exception):
    """A checkpoint cannot be found, downloaded or loaded; the message says what to do."""


def computable_buffer_names(module: nn.Module) -> set[str]:
    names = set()
    for prefix, sub in module.named_modules():
        for b in getattr(sub, "computable_buffers", ()):
            names.add(f"{prefix}.{b}" if prefix else b)
    return names


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load `state` into `module`, failing loudly (naming the keys) on anything missing, unexpected or misshapen."""
    expected = module.state_dict()
    optional = computable_buffer_names(module)
    missing = sorted(k for k in expected if k not in state and k not in optional)
    unexpected = sorted(k for k in state if k not in expected)
    misshapen = sorted(f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
                       for k, v in expected.items() if k in state and state[k].shape != v.shape)
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)):
        if keys:
            shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
            problems.append(f"{len(keys)} {label} key(s): {shown}")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))
    module.load_state_dict({k: v for k, v in state.items()}, strict=False)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a Chatterbox checkpoint needs {', '.join(CHECKPOINT_FILES)}.")
    return load_file(str(path), device="cpu")


def resolve_checkpoint(model: str, data_dir: str | os.PathLike | None = None) -> Path:
    """A directory holding the checkpoint files for `model`: a local directory, `tiny-random` (generated under
    `data_dir` on first use), or a Hugging Face repo id (downloaded once; HF_HUB_OFFLINE / the cache honoured)."""
    if model == TINY:
        base = Path(data_dir) if data_dir else Path.home() / ".cache" / "chatterbox-serverless"
        target = base / "tiny-random"
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
