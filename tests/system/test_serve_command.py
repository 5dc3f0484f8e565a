"""The `serve` command as an operator meets it: a port already in use, or a damaged database, is one sentence on
stderr and exit 2 (no traceback), and the first admin key is shown only once the server can be used with it."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys

import httpx

from chatterbox_serverless.testing import free_port, wait_until


def serve(data_dir, port: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "chatterbox_serverless.cli", "serve", "--workers", "0",
                             "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir),
                             "--log-level", "warning", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def one_sentence(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_a_port_in_use_is_one_sentence_and_the_key_waits_for_a_start_that_works(tmp_path):
    data = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = serve(data, taken.getsockname()[1])
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    line = one_sentence(err)
    assert "already in use" in line and "cbx_" not in out + err
    # the next start that can listen makes the first key and shows it, once
    port = free_port()
    proc = serve(data, port)
    try:
        wait_until(lambda: proc.poll() is None and _up(port), 30, 0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert err.count("cbx_") >= 1 and "admin key was created" in err
    key = next(w for w in err.split() if w.startswith("cbx_"))
    proc = serve(data, port)
    try:
        wait_until(lambda: proc.poll() is None and _up(port), 30, 0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/account", headers={"x-api-key": key}).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert "cbx_" not in err                    # shown once only


def test_a_damaged_database_is_one_sentence(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "jobs.sqlite3").write_bytes(b"this is not a database" + bytes(range(256)) * 40)
    proc = serve(data, free_port())
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "damaged" in one_sentence(err) or "not a database" in one_sentence(err)


def test_an_invalid_option_is_one_sentence(tmp_path):
    proc = serve(tmp_path, free_port(), "--retention", "0")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--retention must be positive" in one_sentence(err)


def _up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_serve_with_two_models_runs_a_worker_for_each(tmp_path):
    """`serve --model tiny-random --model tiny-random-turbo`: both tiny engines load, /ready lists a worker per
    model, the original's route completes a job, and a Turbo job (submitted to the store, as the API's Turbo
    route does) is done by the Turbo worker. Two specs of one model: one sentence, exit 2."""
    from chatterbox_serverless.jobs.sqlite_store import SQLiteJobStore
    from chatterbox_serverless.jobs.store import Job, JobState

    data, port = tmp_path / "data", free_port()
    cmd = [sys.executable, "-m", "chatterbox_serverless.cli", "serve", "--no-auth", "--host", "127.0.0.1",
           "--port", str(port), "--data-dir", str(data), "--log-level", "warning", "--device", "cpu",
           "--no-watermark"]
    proc = subprocess.Popen(cmd + ["--model", "tiny-random", "--model", "tiny-random-turbo"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def ready():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            try:
                r = httpx.get(base + "/ready", timeout=2)
            except httpx.HTTPError:
                return None
            return r.json() if r.status_code == 200 and len(r.json()["workers"]) == 2 else None
        body = wait_until(ready, 120, 0.2)
        assert sorted(tuple(w["models"]) for w in body["workers"].values()) == \
            [("chatterbox-tts",), ("chatterbox-turbo",)]
        store = SQLiteJobStore(data / "jobs.sqlite3")
        try:
            turbo = Job(id="turbo-1", owner="", params={"text": "Hi.", "output_format": "wav", "seed": 1})
            store.submit(turbo, 100, model="chatterbox-turbo")
            r = httpx.post(base + "/v2/chatterbox-tts", json={"text": "Hi.", "output_format": "wav", "seed": 1},
                           timeout=10)
            assert r.status_code == 200, r.text
            original = r.json()["request_id"]
            wait_until(lambda: store.get(turbo.id).state.terminal and store.get(original).state.terminal, 120, 0.1)
            for job_id in (turbo.id, original):
                assert store.get(job_id).state == JobState.COMPLETED, store.get(job_id).error
            turbo_worker = next(w for w, info in body["workers"].items() if info["models"] == ["chatterbox-turbo"])
            claims = [e.data for e in store.job_events(turbo.id) if e.data.get("status") == "PROCESSING"]
            assert len(claims) == 1 and store.get(turbo.id).model == "chatterbox-turbo"
            assert turbo_worker.endswith("-chatterbox-turbo")
        finally:
            store.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, -signal.SIGTERM) and "Traceback" not in err, err[-3000:]   # uvicorn re-raises it
    proc = subprocess.run(cmd + ["--model", "tiny-random", "--model", "ResembleAI/chatterbox"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert one_sentence(proc.stderr) == ("chatterbox-serverless serve: --model 'tiny-random' and --model "
                                         "'ResembleAI/chatterbox' both serve chatterbox-tts; give one checkpoint per "
                                         "model")
