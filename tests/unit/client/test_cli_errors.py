"""`say` and `keys`: a bad output path is refused before anything is submitted (and billed), and every error is
one line on stderr with a non-zero exit status, never a traceback."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid

import httpx
import numpy as np
import pytest
import soundfile as sf

import chatterbox_serverless.client as client_pkg
from chatterbox_serverless.cli import main

BASE = "http://tts.test"


def wav(seconds: float = 0.1) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * 24000), dtype=np.float32), 24000, format="WAV")
    return buf.getvalue()


class ServerForTests:
    """The queued contract in memory: every job is COMPLETED at its first poll. `replies`: canned answers to the
    next requests (any route), to play HTTP errors."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict] = {}
        self.replies: list[httpx.Response] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.replies:
            return self.replies.pop(0)
        path = request.url.path
        if request.method == "POST" and path == "/v2/chatterbox-tts":
            rid = str(uuid.uuid4())
            self.jobs[rid] = json.loads(request.content)
            return httpx.Response(200, json={"request_id": rid, "status": "QUEUED",
                                             "status_url": f"{BASE}/v2/requests/{rid}/status",
                                             "response_url": f"{BASE}/v2/requests/{rid}"})
        if request.method == "GET" and path.startswith("/v2/requests/"):
            rid = path.split("/")[3]
            return httpx.Response(200, json={"request_id": rid, "status": "COMPLETED",
                                             "metrics": {"inference_time": 0.01},
                                             "output": f"{BASE}/files/{rid}.wav"})
        if request.method == "GET" and path.startswith("/files/"):
            return httpx.Response(200, content=wav(), headers={"content-type": "audio/wav"})
        return httpx.Response(404, json={"error": "no route"})


@pytest.fixture
def server(monkeypatch):
    """`say` (through main) talks to the in-memory server."""
    srv = ServerForTests()
    real = client_pkg.Client

    def client_for_tests(api_key=None, base_url=None, **kw):
        return real(api_key=api_key, base_url=BASE, transport=httpx.MockTransport(srv), **kw)
    monkeypatch.setattr(client_pkg, "Client", client_for_tests)
    return srv


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def say(*argv: str) -> int:
    return main(["say", *argv, "-q"])


# --- the output path, checked before submitting ----------------------------------------------------------------

def test_a_missing_directory_is_refused_before_submitting(server, tmp_path, capsys):
    assert say("Hi.", "-o", str(tmp_path / "nonexistent" / "x.mp3")) == 2
    line = one_line_error(capsys)
    assert line == (f"chatterbox-serverless say: error: cannot write {tmp_path / 'nonexistent' / 'x.mp3'}: "
                    f"the directory {tmp_path / 'nonexistent'} does not exist")
    assert server.jobs == {}                         # nothing submitted, nothing billed


def test_an_existing_directory_is_refused_before_submitting(server, tmp_path, capsys):
    assert say("Hi.", "-o", str(tmp_path)) == 2
    assert f"the output {tmp_path} is a directory" in one_line_error(capsys)
    assert server.jobs == {}


def test_a_file_as_the_directory_is_refused(server, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert say("Hi.", "-o", str(tmp_path / "file" / "x.mp3")) == 2
    assert f"{tmp_path / 'file'} is not a directory" in one_line_error(capsys)
    assert server.jobs == {}


def test_a_special_file_is_never_replaced(server, tmp_path, capsys):
    # Writing goes through a temporary file renamed over the output, which would replace a device or pipe (as
    # root, `-o /dev/null` would replace the device). A FIFO stands in here: replacing it harms nothing.
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert say("Hi.", "-o", str(fifo)) == 2
    assert "is not a regular file" in one_line_error(capsys)
    assert server.jobs == {} and not fifo.is_file()


def _read_only_dir(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    if not os.access(d, os.W_OK):
        return d
    d.chmod(0o755)                      # root writes anyway: use a read-only file system instead
    probe = os.path.join("/sys", f".probe-{uuid.uuid4().hex}")
    try:
        open(probe, "wb").close()
    except OSError:
        return "/sys"
    os.unlink(probe)
    pytest.skip("no read-only directory available to this user")


def test_a_read_only_directory_is_refused_before_submitting(server, tmp_path, capsys):
    d = _read_only_dir(tmp_path)
    try:
        assert say("Hi.", "-o", os.path.join(str(d), "x.mp3")) == 2
        line = one_line_error(capsys)
        assert line.startswith(f"chatterbox-serverless say: error: cannot write {os.path.join(str(d), 'x.mp3')}: ")
        assert server.jobs == {}
        assert [p for p in os.listdir(d) if p.endswith(".check")] == []
    finally:
        if d != "/sys":
            d.chmod(0o755)


def test_a_writable_output_works_and_leaves_no_probe_file(server, tmp_path, capsys):
    assert say("Hi.", "-o", str(tmp_path / "hi.wav")) == 0
    assert sorted(os.listdir(tmp_path)) == ["hi.wav"] and len(server.jobs) == 1
    assert capsys.readouterr().err == ""


# --- every other failure: one line, non-zero ------------------------------------------------------------------

def test_connection_refused_is_one_line(tmp_path, capsys):
    assert main(["say", "Hi.", "--server", "http://127.0.0.1:9", "-q", "-o", str(tmp_path / "x.mp3")]) == 1
    line = one_line_error(capsys)
    assert line.startswith("error: request to http://127.0.0.1:9") and "is the server running" in line


@pytest.mark.parametrize("status, body", [(401, {"error": "invalid API key"}), (406, {"error": "not enough\ncredits"}),
                                          (500, None)])
def test_http_errors_are_one_line(server, tmp_path, capsys, status, body):
    reply = httpx.Response(status, json=body) if body else httpx.Response(status, text="<html>\n<b>oops</b>\n</html>")
    server.replies = [reply] * 10              # retried statuses too
    assert say("Hi.", "-o", str(tmp_path / "x.mp3")) == 1
    assert one_line_error(capsys).startswith(f"error: HTTP {status}: ")


def test_bad_arguments_are_one_line(server, tmp_path, capsys):
    out = str(tmp_path / "x.mp3")
    for argv, needle in ((["--max-chars", "0"], "--max-chars must be positive"),
                         (["--timeout", "0"], "--timeout must be positive"),
                         (["--seed", "-1"], "seed must be between"),
                         (["--voice", str(tmp_path / "missing.wav")], "cannot read"),
                         (["--file", str(tmp_path)], "cannot read"),
                         (["--format", "wav", "-o", str(tmp_path / "x.flac")], "does not match")):
        args = (["Hi."] if "--file" not in argv else []) + argv + (["-o", out] if "-o" not in argv else [])
        assert say(*args) in (1, 2), argv
        assert needle in one_line_error(capsys), argv
    assert server.jobs == {}


def test_a_bad_server_url_is_one_line(tmp_path, capsys):
    assert main(["say", "Hi.", "--server", "ftp://x", "-q", "-o", str(tmp_path / "x.mp3")]) == 1
    assert "base URL must be an http(s) URL" in one_line_error(capsys)


def test_a_write_failing_after_the_job_names_the_request(server, tmp_path, capsys, monkeypatch):
    def disk_full(self, result, path):
        raise OSError(28, "No space left on device")
    from chatterbox_serverless.client._sync import Client as SyncClient
    monkeypatch.setattr(SyncClient, "download", disk_full)
    assert say("Hi.", "-o", str(tmp_path / "x.mp3")) == 1
    (rid,) = server.jobs
    line = one_line_error(capsys)
    assert line.startswith(f"error: could not write {tmp_path / 'x.mp3'} (No space left on device)")
    assert rid in line


def test_an_unexpected_failure_is_one_line(server, tmp_path, capsys, monkeypatch):
    from chatterbox_serverless.client import cli
    monkeypatch.setattr(cli, "_join_audio", lambda parts, fmt: (_ for _ in ()).throw(RuntimeError("bad\nparts")))
    (tmp_path / "in.txt").write_text("One sentence here. " * 10)
    assert say("--file", str(tmp_path / "in.txt"), "--max-chars", "40", "-o", str(tmp_path / "x.flac")) == 1
    assert one_line_error(capsys) == "error: RuntimeError: bad"


def test_the_command_never_prints_a_traceback_in_a_real_process(tmp_path):
    for argv, rc in ((["say", "hi", "-o", str(tmp_path / "no" / "x.mp3")], 2),
                     (["say", "hi", "-q", "-o", str(tmp_path / "x.mp3"), "--server", "http://127.0.0.1:9"], 1),
                     (["keys", "list", "--data-dir", str(tmp_path / "missing")], 2)):
        out = subprocess.run([sys.executable, "-m", "chatterbox_serverless.cli", *argv], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == rc, (argv, out.stderr)
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


# --- keys ----------------------------------------------------------------------------------------------------

def test_keys_on_a_missing_store_is_an_error_and_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "typo"
    assert main(["keys", "list", "--data-dir", str(missing)]) == 2
    assert one_line_error(capsys).startswith(f"error: no account store at {missing / 'jobs.sqlite3'}")
    assert not missing.exists()
    assert main(["keys", "show", "acc_x", "--store", str(tmp_path / "x.db")]) == 2
    one_line_error(capsys)
    assert not (tmp_path / "x.db").exists()


def test_keys_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["keys", "create", "--data-dir", str(tmp_path / "file")]) == 2
    assert "is not a directory" in one_line_error(capsys)
    assert main(["keys", "list", "--store", str(tmp_path)]) == 2
    assert "is not a database file" in one_line_error(capsys)
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    assert main(["keys", "list", "--store", str(tmp_path / "junk.db")]) == 1
    assert one_line_error(capsys).startswith("error: ")
    assert main(["keys", "list", "--store", "redis://127.0.0.1:9/0"]) == 1
    assert "unavailable" in one_line_error(capsys)
