"""Test doubles and server harnesses, for the test suite and `bench/` (never used by the product's commands).

    with start_server(tmp_path, engine=FakeEngineForTests(delay=0.1), max_queue=5) as server:
        httpx.post(server.url + "/v2/chatterbox-tts", json={"text": "hi"})

    proc, url = spawn("serve", ["--data-dir", str(d), "--no-auth"], fake_delay=0.1)   # the real `serve` command
                                                                                      # in a subprocess
`FakeEngineForTests` is a TEST DOUBLE: deterministic tones (or silence), never loaded by `serve` or `worker`;
only `python -m chatterbox_serverless.testing serve|worker ...` (the real commands with this double as the
engine) and tests use it.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import httpx
import numpy as np

from ..engine.contract import PreparedVoice, SynthesisRequest, SynthesisResult, VoiceAudio
from .http import live_server


@dataclass
class FakeEngineForTests:
    """Engine double: a sine tone per request (frequency from the seed, +50 Hz with a reference voice; silence
    with amplitude=0) lasting base_seconds + seconds_per_char * len(text) (at most max_seconds), after `delay`
    seconds per batch. Texts containing `fail_marker` fail alone; `raise_marker` makes the whole batch raise.

    Streaming (`on_audio` and requests with `stream=True`): the tone is cut into one piece per sentence (cut points
    in proportion to the characters), handed over in order with `piece_delay` seconds before each piece (the
    batch's `delay` comes first); the pieces concatenate to the request's audio. A text containing
    `fail_after_marker` fails after its first piece was handed over.

    Abort (the contract's optional `abort`): the batch's `delay` runs as steps of `step_seconds`; a request
    aborted (from any thread) is dropped at the next step boundary, its result the error "cancelled" (and the
    batch ends early when all its requests are). `steps` counts steps over the engine's life; `abort_calls`
    keeps, per request id, the step count when `abort` was first called, and `stopped_at` the step count when
    the engine stopped working on it; `worked` the steps each request was worked on. Aborts are forgotten when
    the batch ends.

    `model`: the API model it stands for (contract.Engine.model): a worker claims only that model's jobs; the
    requests it got are kept in `requests` (language, source: what a worker built from each job)."""
    sample_rate: int = 24000
    delay: float = 0.0
    fail_marker: str = "FAIL-ME"
    raise_marker: str = "CRASH-ME"
    seconds_per_char: float = 0.01
    max_seconds: float = 2.0
    base_seconds: float = 0.1
    amplitude: float = 0.3
    batches: list[list[str]] = field(default_factory=list)      # request ids per call, for assertions
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    voice_variant: str = "fake:1"
    piece_delay: float = 0.0
    fail_after_marker: str = "FAIL-MID-STREAM"
    prepared: list[str] = field(default_factory=list)            # clips prepared (library voices), by hash
    step_seconds: float = 0.01
    steps: int = 0
    abort_calls: dict[str, int] = field(default_factory=dict)
    stopped_at: dict[str, int] = field(default_factory=dict)
    worked: dict[str, int] = field(default_factory=dict)
    _aborted: set[str] = field(default_factory=set, repr=False)
    model: str = "chatterbox-tts"
    requests: list[SynthesisRequest] = field(default_factory=list, repr=False)

    def abort(self, request_id: str) -> None:
        with self.lock:
            self.abort_calls.setdefault(request_id, self.steps)
            self._aborted.add(request_id)

    def prepare_voice(self, voice: VoiceAudio) -> PreparedVoice:
        """Library voices: "conditionals" are a hash of the clip (counted in `prepared`)."""
        import hashlib
        digest = hashlib.blake2b(np.ascontiguousarray(voice.samples, dtype=np.float32).tobytes()).hexdigest()
        with self.lock:
            self.prepared.append(digest)
        return PreparedVoice(self.voice_variant, digest.encode())

    def synthesize(self, requests: Sequence[SynthesisRequest], on_audio=None) -> list[SynthesisResult]:
        with self.lock:
            self.batches.append([r.request_id for r in requests])
            self.requests.extend(requests)
        if any(self.raise_marker in r.text for r in requests):
            raise RuntimeError("fake engine crash")
        try:
            return self._run(requests, on_audio)
        finally:
            with self.lock:
                self._aborted.clear()

    def _dropped(self, r: SynthesisRequest) -> bool:
        """Whether `r` was aborted (recording when the engine stopped working on it, once)."""
        with self.lock:
            if r.request_id not in self._aborted:
                return False
            self.stopped_at.setdefault(r.request_id, self.steps)
            return True

    def _run(self, requests: Sequence[SynthesisRequest], on_audio) -> list[SynthesisResult]:
        if self.delay:
            n = max(1, round(self.delay / self.step_seconds)) if self.step_seconds > 0 else 1
            for _ in range(n):
                live = [r for r in requests if not self._dropped(r)]
                if not live:
                    break
                time.sleep(self.delay / n)
                with self.lock:
                    self.steps += 1
                    for r in live:
                        self.worked[r.request_id] = self.worked.get(r.request_id, 0) + 1
        out = []
        for r in requests:
            if self._dropped(r):
                out.append(SynthesisResult(error="cancelled"))
                continue
            if self.fail_marker in r.text:
                out.append(SynthesisResult(error="fake engine: this text cannot be spoken"))
                continue
            if isinstance(r.voice, PreparedVoice) and r.voice.variant != self.voice_variant:
                out.append(SynthesisResult(error="fake engine: conditionals of another variant"))
                continue
            seconds = min(self.max_seconds, self.base_seconds + self.seconds_per_char * len(r.text))
            t = np.arange(int(seconds * self.sample_rate), dtype=np.float32) / self.sample_rate
            freq = 200.0 + (r.params.seed % 50) * 10 + (50.0 if r.voice is not None else 0.0)
            audio = (self.amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)
            metrics = {"audio_seconds": len(audio) / self.sample_rate}
            if r.stream and on_audio is not None:
                try:
                    metrics["stream_pieces"] = self._stream(r, audio, on_audio)
                except Exception as e:   # noqa: BLE001 - the consumer stopped it, or the marker: this one fails
                    out.append(SynthesisResult(error=f"fake engine: streaming stopped: {e}"))
                    continue
            out.append(SynthesisResult(audio=audio, metrics=metrics))
        return out

    def _stream(self, r: SynthesisRequest, audio: np.ndarray, on_audio) -> int:
        """One piece per sentence, in order, `piece_delay` seconds before each; returns how many."""
        from ..engine.chunking import _SENTENCE_END, _pieces
        sentences = _pieces(" ".join(r.text.split()), _SENTENCE_END) or [r.text]
        ends, total = [0], sum(len(s) for s in sentences)
        for s in sentences:
            ends.append(ends[-1] + len(s))
        cuts = [round(len(audio) * e / total) for e in ends]
        seq = 0
        for a, b in zip(cuts, cuts[1:]):
            if b <= a:
                continue
            if self.piece_delay:
                time.sleep(self.piece_delay)
            on_audio(r.request_id, seq, audio[a:b].copy())
            seq += 1
            if self.fail_after_marker in r.text:
                raise RuntimeError("this text fails after its first piece")
        return seq


class SilentEngineForTests(FakeEngineForTests):
    """Engine double: silence lasting len(text)/20 seconds at 16 kHz, after `delay` seconds per batch; a text
    containing "fail" fails alone."""

    def __init__(self, delay: float = 0.0, max_seconds: float = 1e9):
        super().__init__(sample_rate=16000, delay=delay, fail_marker="fail", seconds_per_char=1 / 20,
                         base_seconds=0.0, max_seconds=max_seconds, amplitude=0.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


# --- a server in this process ------------------------------------------------------------------------------------
@dataclass
class RunningServer:
    url: str                 # http://127.0.0.1:PORT
    store: Any
    app: Any
    engine: Any
    settings: Any
    service: Any = None
    extra: dict = field(default_factory=dict)

    @property
    def accounts(self):
        return self.service.accounts


@contextlib.contextmanager
def start_server(tmp_path: Path, engine: Any = None, *, engines: Sequence[Any] | None = None, workers: int = 1,
                 job_store: Any = None, accounts: Any = None, fetcher: Any = None,
                 served_models: Sequence[str] | None = None, **settings: Any) -> Iterator[RunningServer]:
    """Run the real app under uvicorn in a thread on a free loopback port; stop it (gracefully) on exit.
    `engine`, or `engines` (several models, e.g. two FakeEngineForTests with other `model`s; the first is the
    default); `served_models`: the models of an API without engines. `settings` are `Settings` fields (data_dir
    defaults to tmp_path/"data"; `store="redis://..."` for Redis). `job_store`: an open store to serve (default:
    the one the settings name). `accounts`: None (no keys), True (open them beside the store) or an `Accounts`."""
    from ..api.app import create_app
    from ..service import build_service
    from ..settings import Settings

    settings.setdefault("data_dir", tmp_path / "data")
    settings.setdefault("shutdown_grace", 5.0)
    settings.setdefault("no_auth", accounts is None)
    cfg = Settings(workers=workers, **settings)
    service = build_service(cfg, engine=engine, engines=engines, served_models=served_models, store=job_store,
                            accounts=accounts if accounts is not None else False, fetcher=fetcher, model_name="fake")
    app = create_app(service)
    try:
        with live_server(app, lifespan="on", graceful=5) as port:
            yield RunningServer(url=f"http://127.0.0.1:{port}", store=service.store, app=app, engine=service.engine,
                                settings=cfg, service=service)
    finally:
        service.close()




class ServerWithKeys:
    """`start_server` on a SQLite data dir with keys on (`auth=False`: off), and helpers for account tests:
    `key()` makes one, `submit`, `wait`, `account`, `settled`. Prices: 1 credit per audio second, minimum 1."""

    def __init__(self, data_dir, *, auth: bool = True, engine=None, workers: int = 1, fetcher=None):
        from .. import accounts as accounts_pkg
        from ..accounts.service import Accounts, Pricing
        from ..jobs.sqlite_store import SQLiteJobStore
        self.data_dir = Path(data_dir)
        self.store = SQLiteJobStore(self.data_dir / "jobs.sqlite3")
        self.accounts = Accounts(accounts_pkg.open_account_store(self.data_dir),
                                 Pricing(credits_per_second=1.0, minimum=1)) if auth else None
        self._context = start_server(self.data_dir.parent, engine if engine is not None else SilentEngineForTests(),
                                     workers=workers, job_store=self.store, accounts=self.accounts, fetcher=fetcher,
                                     data_dir=self.data_dir, batch_wait=0.0, sync_timeout=10.0)

    def __enter__(self) -> "ServerWithKeys":
        running = self._context.__enter__()
        self.url, self.app, self.service = running.url, running.app, running.service
        self.http = httpx.Client(base_url=self.url, timeout=20)
        return self

    def __exit__(self, *exc) -> None:
        self.http.close()
        self._context.__exit__(*exc)
        self.store.close()
        if self.accounts is not None:
            self.accounts.store.close()

    def key(self, credits: int = 100, rate: int = 0, admin: bool = False, name: str = "") -> str:
        key, _ = self.accounts.create_key(name, credits, rate, admin)
        return key

    def submit(self, key: str | None, text: str = "x" * 40, **headers) -> httpx.Response:
        h = {"x-api-key": key} if key else {}
        return self.http.post("/v2/chatterbox-tts", json={"text": text, "output_format": "wav"}, headers={**h, **headers})

    def wait(self, key: str, request_id: str, timeout: float = 15.0) -> httpx.Response:
        deadline = time.time() + timeout
        while True:
            r = self.http.get(f"/v2/requests/{request_id}/status", headers={"x-api-key": key})
            if r.json().get("status") in ("COMPLETED", "FAILED") or time.time() > deadline:
                return r
            time.sleep(0.02)

    def account(self, key: str) -> dict:
        r = self.http.get("/v1/account", headers={"x-api-key": key})
        assert r.status_code == 200, r.text
        return r.json()

    def settled(self, key: str, timeout: float = 10.0) -> dict:
        """The account once no hold is open (the worker bills a job just after storing its end)."""
        deadline = time.time() + timeout
        while (acc := self.account(key))["held"] and time.time() < deadline:
            time.sleep(0.02)
        return acc


# --- the real commands in a subprocess, with the engine double ---------------------------------------------------
def spawn(command: str, argv: list[str], *, fake_delay: float = 0.0, fake: dict | list[dict] | None = None,
          env: dict | None = None, stdout: Any = subprocess.DEVNULL, stderr: Any = subprocess.PIPE,
          wait_ready: bool = True) -> tuple[subprocess.Popen, str | None]:
    """Start `serve` or `worker` (their real options and code paths) in a subprocess with FakeEngineForTests
    (`fake`: its constructor arguments, or a list of them for several engines, e.g. [{"model":
    "chatterbox-turbo"}]). Without a "model" there, each `--model SPEC` in argv makes one fake engine for the
    spec's API model (engine/catalog.py: `--model tiny-random-turbo` gives a fake Turbo engine). For `serve`, a
    free port is chosen unless argv has --port, and this returns once /health answers: (process, base URL).
    For `worker`: (process, None)."""
    argv = list(argv)
    url = None
    if command == "serve":
        if "--port" not in argv:
            argv += ["--port", str(free_port())]
        port = argv[argv.index("--port") + 1]
        if "--host" not in argv:
            argv += ["--host", "127.0.0.1"]
        url = f"http://127.0.0.1:{port}"
    spec = ([{"delay": fake_delay, **f} for f in fake] if isinstance(fake, list)
            else {"delay": fake_delay, **(fake or {})})
    full_env = {**os.environ, "CHATTERBOX_FAKE_ENGINE": repr(spec), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "chatterbox_serverless.testing", command, *argv], env=full_env,
                            stdout=stdout, stderr=stderr)
    if url is None or not wait_ready:
        return proc, url
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            raise AssertionError(f"the {command} process exited: {err}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the {command} process did not start")


def main(argv: list[str] | None = None) -> int:
    """`python -m chatterbox_serverless.testing serve|worker OPTIONS`: the real command with FakeEngineForTests
    (its arguments from $CHATTERBOX_FAKE_ENGINE, a Python dict literal)."""
    import ast

    from ..api.logs import configure_logging
    from ..engine.options import served_models_of_specs
    from ..service import build_service
    from ..settings import SERVE, WORKER, add_arguments, from_args

    argv = sys.argv[1:] if argv is None else argv
    command, rest = argv[0], argv[1:]
    parser = argparse.ArgumentParser(prog=f"testing {command}")
    add_arguments(parser, SERVE if command == "serve" else WORKER)
    args = parser.parse_args(rest)
    settings = from_args(args)
    configure_logging(json_lines=settings.log_json, level=os.environ.get("LOG_LEVEL", settings.log_level))
    spec = ast.literal_eval(os.environ.get("CHATTERBOX_FAKE_ENGINE", "{}"))
    specs = spec if isinstance(spec, list) else [spec]
    if args.model and not any("model" in s for s in specs):     # one fake per --model, as its API model
        specs = [{**specs[0], "model": m} for m in served_models_of_specs(args.model)]
    engines = [FakeEngineForTests(**s) for s in specs]
    if command == "serve":
        from ..api.serve import serve
        service = build_service(settings, engines=engines if settings.workers else None,
                                served_models=None if settings.workers else [e.model for e in engines],
                                model_name="fake")
        try:
            serve(service, announce=True)
        finally:
            service.close()
    elif command == "worker":
        from ..jobs.worker_main import run_worker
        service = build_service(settings, engines=engines, with_worker=True, model_name="fake")
        try:
            run_worker(service)
        finally:
            service.close()
    else:
        raise SystemExit(f"unknown command {command!r}: serve or worker")
    return 0

