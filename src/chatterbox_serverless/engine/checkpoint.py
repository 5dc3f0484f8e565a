"""Reading checkpoint files: safetensors weights, torch-saved data, the engine's own configuration, and strict
loading into modules. A leaf module: it imports nothing from the engine (finding a checkpoint from a model name,
`tiny-random` included, is `engine/resolve.py`).

The official layout (ResembleAI/chatterbox): ve.safetensors, t3_cfg.safetensors, s3gen.safetensors,
tokenizer.json, conds.pt. Loading is strict: every learned tensor of a module must be in the file with its
shape, and every tensor in the file must belong to the module. Only buffers that a module can compute itself
(mel filters, windows; listed in the module's `computable_buffers`) may be absent. Any file that cannot be read
as what it should be (not safetensors, not torch data, keys missing or misshapen) raises `CheckpointError`
naming the file.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from torch import nn

CHECKPOINT_FILES = ("ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json", "conds.pt")
CONFIG_FILE = "serverless_config.json"   # optional: sizes tensor shapes cannot tell (tiny-random writes one)
C = TypeVar("C")


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


@contextlib.contextmanager
def naming(path: str | Path):
    """CheckpointErrors raised inside the block name the file `path` (prefixed unless they already do)."""
    try:
        yield
    except CheckpointError as e:
        if Path(path).name in str(e):
            raise
        raise CheckpointError(f"{path}: {e}") from None


def _missing(path: Path) -> CheckpointError:
    return CheckpointError(f"{path} is missing: a Chatterbox checkpoint needs {', '.join(CHECKPOINT_FILES)}.")


def read_safetensors(path: str | Path, prefixes: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (on the CPU); with `prefixes`, only those whose keys start with one of
    them (keys kept whole; the others are not read)."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys() if prefixes is None or k.startswith(prefixes)}
    except Exception as e:   # SafetensorError (not safetensors, truncated), OSError
        raise CheckpointError(f"{path} is not a valid safetensors file ({type(e).__name__}: {e})") from None


def read_weights(path: str | Path, prefixes: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """A state dict from `path`: a safetensors file (`read_safetensors`), or a torch-saved one (`.pt`, `.pth`,
    `.bin`: the Multilingual checkpoint's ve.pt and s3gen.pt), loaded with weights_only=True and refused unless
    it maps names to tensors. With `prefixes`, only the keys starting with one of them."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path, prefixes)
    data = read_torch(path)
    if isinstance(data, dict) and isinstance(data.get("model"), list) and data["model"] \
            and isinstance(data["model"][0], dict):
        data = data["model"][0]          # {"model": [state_dict]}, as the official loaders also accept
    if not isinstance(data, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in data.items()):
        raise CheckpointError(f"{path} is not a state dict (a mapping of names to tensors)")
    return {k: v for k, v in data.items() if prefixes is None or k.startswith(prefixes)}


def read_torch(path: str | Path) -> Any:
    """What a torch-saved file holds, loaded with weights_only=True (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:   # not a torch file, truncated, or unpickling refused
        raise CheckpointError(f"{path} is not readable torch data ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:300] if str(e) else ''})") from None


def read_config(ckpt_dir: str | Path) -> dict:
    """The checkpoint's `serverless_config.json` (sections "t3", "voice_encoder", "s3tokenizer", "campplus", "flow",
    "hift"), or {} when the directory has none (the official checkpoint). The only place that file is read."""
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        raise CheckpointError(f"{path} must hold an object of sections, each an object")
    return config


def config_from_state_dict(from_state_dict: Callable[..., C], sd: dict[str, torch.Tensor], overrides: dict | None,
                           what: str) -> C:
    """`from_state_dict(sd, overrides)` (a config class's reader of sizes from tensor shapes), with a tensor it
    needs absent or of the wrong rank reported as a CheckpointError naming `what` (the file)."""
    try:
        return from_state_dict(sd, overrides)
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(f"{what}: 1 missing key(s): {e.args[0]}") from None
    except (IndexError, ValueError, TypeError) as e:
        raise CheckpointError(f"{what}: not the expected tensors ({type(e).__name__}: {e})") from None


def read_json(path: str | Path) -> Any:
    """A JSON file of the checkpoint (tokenizer files), or CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
