"""`chatterbox-serverless say` against ContractServerForTests (the wire-contract double in test_client.py)."""
from __future__ import annotations

import argparse
import base64
import io
import time

import httpx
import numpy as np
import pytest
import soundfile as sf

from chatterbox_serverless.cli import main
from chatterbox_serverless.client import Client
from chatterbox_serverless.client.cli import add_arguments, say, split_text
from test_client import BASE, ContractServerForTests, wav_bytes_for_tests


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def server():
    return ContractServerForTests(queued_polls=0, processing_polls=0)


@pytest.fixture
def client(server):
    with Client(base_url=BASE, transport=httpx.MockTransport(server)) as c:
        yield c


def test_say_writes_the_file_and_shows_progress(client, server, tmp_path):
    server.queued_polls = server.processing_polls = 1
    out = tmp_path / "hi.wav"
    stderr = io.StringIO()
    assert say(parse("Hello there.", "-o", str(out), "--seed", "7", "--temperature", "0.5"), client, stderr) == 0
    assert sf.info(str(out)).samplerate == 24000
    (params,) = [j["params"] for j in server.jobs.values()]
    assert params == {"text": "Hello there.", "output_format": "wav", "seed": 7, "temperature": 0.5}
    lines = stderr.getvalue().splitlines()
    assert lines[0].startswith("submitting") and any(line.startswith("processing") for line in lines)
    assert lines[-1].startswith(f"wrote {out}")


def test_format_comes_from_the_suffix_or_the_flag_and_must_agree(client, server, tmp_path):
    assert say(parse("Hi.", "-o", str(tmp_path / "x.flac"), "-q"), client, io.StringIO()) == 0
    assert say(parse("Hi.", "-o", str(tmp_path / "x.audio"), "--format", "ogg", "-q"), client, io.StringIO()) == 0
    assert [j["params"]["output_format"] for j in server.jobs.values()] == ["flac", "ogg"]
    rc = main(["say", "Hi.", "-o", str(tmp_path / "x.wav"), "--format", "mp3", "--server", BASE])
    assert rc == 2 and len(server.jobs) == 2


def test_voice_from_a_local_file_or_a_url(client, server, tmp_path):
    voice = tmp_path / "me.wav"
    voice.write_bytes(wav_bytes_for_tests())
    say(parse("Hi.", "-o", str(tmp_path / "a.mp3"), "--voice", str(voice), "-q"), client, io.StringIO())
    say(parse("Hi.", "-o", str(tmp_path / "b.mp3"), "--voice", "https://example.com/v.wav", "-q"), client,
        io.StringIO())
    first, second = [j["params"]["reference_audio"] for j in server.jobs.values()]
    assert base64.b64decode(first.split(",", 1)[1]) == voice.read_bytes()
    assert second == "https://example.com/v.wav"


def test_a_long_file_is_sent_in_pieces_and_joined(client, server, tmp_path):
    text = "\n\n".join(f"Paragraph {i}. It has two sentences." for i in range(6))
    (tmp_path / "in.txt").write_text(text)
    out = tmp_path / "long.flac"
    stderr = io.StringIO()
    assert say(parse("--file", str(tmp_path / "in.txt"), "-o", str(out), "--max-chars", "80"), client, stderr) == 0
    sent = [j["params"] for j in server.jobs.values()]
    assert len(sent) == 3 and all(p["output_format"] == "wav" for p in sent)
    assert " ".join(p["text"] for p in sent) == " ".join(text.split())
    audio, rate = sf.read(str(out))
    assert rate == 24000 and len(audio) == 3 * 2400 + 2 * int(0.15 * 24000)
    assert "3/3 done" in stderr.getvalue() and "3 requests" in stderr.getvalue()


def test_split_text_keeps_every_word_within_the_limit():
    text = "One two three. " * 40 + "\n\n" + "x" * 130
    pieces = split_text(text, 100)
    assert all(len(p) <= 100 for p in pieces)
    assert " ".join(pieces).replace(" ", "") == text.replace(" ", "").replace("\n", "")
    assert split_text("Short.", 100) == ["Short."]


def test_failure_and_usage_errors_exit_non_zero(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda s: None)
    assert main(["say", "-o", str(tmp_path / "x.mp3")]) == 2
    assert "nothing to say" in capsys.readouterr().err
    assert main(["say", "Hi.", "--file", "f.txt"]) == 2
    assert main(["say", "Hi.", "--temperature", "9", "--server", BASE, "-o", str(tmp_path / "x.mp3")]) == 1
    assert "temperature must be between 0 and 2" in capsys.readouterr().err
    assert main(["say", "Hi.", "--server", "http://127.0.0.1:9", "-o", str(tmp_path / "x.mp3")]) == 1
    assert "is the server running" in capsys.readouterr().err
    with Client(base_url=BASE, transport=httpx.MockTransport(server)) as c:
        from chatterbox_serverless.client import InferenceFailed
        with pytest.raises(InferenceFailed, match="content policy"):
            say(parse("FAIL", "-o", str(tmp_path / "f.mp3"), "-q"), c, io.StringIO())
    assert not (tmp_path / "f.mp3").exists()


def test_timeout_names_the_pending_request(client, server, tmp_path):
    server.queued_polls = 10**6
    stderr = io.StringIO()
    assert say(parse("Hi.", "-o", str(tmp_path / "x.mp3"), "--timeout", "0.1"), client, stderr) == 1
    (rid,) = server.jobs
    assert f"timed out after 0s; request {rid} may still finish" in stderr.getvalue()
    assert not (tmp_path / "x.mp3").exists()


def test_stdout_output(client, capsysbinary):
    assert say(parse("Hi.", "-o", "-", "-q"), client, io.StringIO()) == 0
    data = capsysbinary.readouterr().out
    assert sf.read(io.BytesIO(data))[0].shape == (2400,) and np.all(np.isfinite(sf.read(io.BytesIO(data))[0]))


def test_progress_rewrites_one_line_on_a_terminal():
    class TerminalForTests(io.StringIO):
        def isatty(self) -> bool:
            return True

    from chatterbox_serverless.client.cli import ProgressLine
    stream = TerminalForTests()
    line = ProgressLine(stream, total=2)
    line.update(0, "QUEUED")
    line.update(1, "PROCESSING")
    line.update(0, "COMPLETED")
    line.finish()
    text = stream.getvalue()
    assert "\n" not in text and text.count("\r") == 4
    assert "1/2 done, 1 processing, 0 queued" in text and text.endswith("\r\033[K")
