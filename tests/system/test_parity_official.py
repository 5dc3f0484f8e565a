"""System test: this engine against the official Chatterbox implementation, end to end, as CI runs it.

For each variant below it
  1. builds (once per machine) the reference venv with `../shared/reference/make_refvenv.sh`: the official
     package chatterbox-tts 0.1.7 on the CPU build of PyTorch, kept in a cache directory
     ($CHATTERBOX_REFVENV, default ~/.cache/chatterbox-serverless/refvenv) and reused while its `.ready` marker
     exists and the script that built it is unchanged (`.script-sha256`); otherwise it is rebuilt;
  2. dumps a small official reference into a temporary directory (`dump_reference.py --model M --tokens 8`:
     full-size random weights in the official layout, every stage's tensors);
  3. runs `chatterbox-serverless parity DIR` in a subprocess and requires it to pass.

Skipped only when `../shared/reference` (beside the repository) is absent; anything else that goes wrong
(no network for the venv, a failing dump, a parity failure) fails. Cost on 2 CPU cores: see the module's
constants and the README; the venv build dominates a cold cache.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO.parent / "shared" / "reference"
MAKE_REFVENV = REFERENCE / "make_refvenv.sh"
DUMP = REFERENCE / "dump_reference.py"
CACHE = Path(os.environ.get("CHATTERBOX_REFVENV",
                            Path.home() / ".cache" / "chatterbox-serverless" / "refvenv")).expanduser()

# (dump_reference.py --model, extra dump arguments). Turbo's dump holds a 16 s reference (its default) and 8 tokens;
# the Multilingual one German text (its language token, the alignment analyser's rows compared too) and 8 tokens.
VARIANTS = [
    ("original", ["--tokens", "8"]),
    ("turbo", ["--tokens", "8"]),
    ("multilingual", ["--tokens", "8", "--language", "de"]),
    ("vc", ["--voice-seconds", "4", "--source-seconds", "1.5"]),
]

BUILD_TIMEOUT_S = 45 * 60
DUMP_TIMEOUT_S = 20 * 60
PARITY_TIMEOUT_S = 20 * 60

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"{REFERENCE} is absent (the official reference scripts)"),
]


def _script_digest() -> str:
    return hashlib.sha256(MAKE_REFVENV.read_bytes()).hexdigest()


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on `path` (two test processes never build the same venv at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _is_ready(venv: Path, digest: str) -> bool:
    stamp = venv / ".script-sha256"
    return ((venv / ".ready").is_file() and (venv / "bin" / "python").exists() and stamp.is_file()
            and stamp.read_text().strip() == digest)


def reference_venv(venv: Path = CACHE) -> Path:
    """The reference venv at `venv`, built by make_refvenv.sh unless a complete one from the same script is there."""
    digest = _script_digest()
    with _locked(venv.parent / (venv.name + ".lock")):
        if _is_ready(venv, digest):
            return venv
        if venv.exists():
            shutil.rmtree(venv)
        t0 = time.monotonic()
        proc = subprocess.run(["bash", str(MAKE_REFVENV), str(venv)], capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
        if proc.returncode != 0 or not (venv / ".ready").is_file():
            raise AssertionError(f"make_refvenv.sh failed (exit {proc.returncode}):\n"
                                 f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        (venv / ".script-sha256").write_text(digest + "\n")
        print(f"reference venv built in {time.monotonic() - t0:.0f} s: {venv}")
        return venv


def _parity_command() -> list[str]:
    """`chatterbox-serverless` of the interpreter running the tests (its venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "chatterbox-serverless"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("chatterbox-serverless")
    return [found] if found else [sys.executable, "-m", "chatterbox_serverless.cli"]


@pytest.mark.timeout(BUILD_TIMEOUT_S + DUMP_TIMEOUT_S + PARITY_TIMEOUT_S)
@pytest.mark.parametrize("model, dump_args", VARIANTS, ids=[m for m, _ in VARIANTS])
def test_engine_matches_the_official_implementation(model, dump_args, tmp_path):
    venv = reference_venv()
    out = tmp_path / f"ref-{model}"
    t0 = time.monotonic()
    dump = subprocess.run([str(venv / "bin" / "python"), str(DUMP), "--out", str(out), "--model", model, *dump_args],
                          capture_output=True, text=True, timeout=DUMP_TIMEOUT_S, cwd=REFERENCE)
    assert dump.returncode == 0, f"dump_reference.py failed:\n{dump.stdout[-4000:]}\n{dump.stderr[-4000:]}"
    assert (out / "reference.safetensors").is_file()
    t1 = time.monotonic()
    parity = subprocess.run([*_parity_command(), "parity", str(out)], capture_output=True, text=True,
                            timeout=PARITY_TIMEOUT_S, cwd=REPO)
    print(f"dump {t1 - t0:.0f} s, parity {time.monotonic() - t1:.0f} s\n{parity.stdout}")
    assert parity.returncode == 0 and "PARITY OK" in parity.stdout, \
        f"parity failed (exit {parity.returncode}):\n{parity.stdout}\n{parity.stderr[-4000:]}"
