"""Streaming over HTTP (the real app on a socket, the engine double handing over one piece per sentence with a
delay): `POST /v1/chatterbox-tts` with "stream": true sends its first bytes before the job has finished, in every
format that streams, and they decode to the job's audio; `GET /v2/requests/{id}/audio` streams a streamed v2 job
while it runs and serves the whole file once it completed; a job that fails mid-stream cuts the body; flac is
refused for streaming; requests without "stream" are answered as before."""
from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pytest
import soundfile as sf

from chatterbox_serverless.testing import FakeEngineForTests, start_server

TEXT = "The first sentence is here. A second one follows it. Then a third one. And the fourth, the last."
PIECE_DELAY = 0.4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = FakeEngineForTests(piece_delay=PIECE_DELAY, max_seconds=10.0)
    with start_server(tmp_path_factory.mktemp("stream"), engine=engine, batch_wait=0.0, batch_size=4) as srv:
        yield srv


def timed_stream(client: httpx.Client, method: str, url: str, **kw) -> tuple[httpx.Response, list[tuple[float, bytes]]]:
    """The response and its body parts with the wall-clock time each arrived."""
    parts = []
    with client.stream(method, url, **kw) as r:
        for data in r.iter_raw():
            parts.append((time.time(), data))
    return r, parts


def expected_seconds(text: str = TEXT) -> float:
    return 0.1 + 0.01 * len(text)


@pytest.mark.parametrize("fmt", ["wav", "pcm", "mp3", "ogg", "opus", "aac"])
def test_v1_streams_its_first_bytes_before_the_job_finishes(server, fmt):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r, parts = timed_stream(c, "POST", "/v1/chatterbox-tts", json={"text": TEXT, "output_format": fmt,
                                                                         "stream": True, "seed": 3})
        assert r.status_code == 200 and r.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in r.headers and r.headers["x-request-id"]
        job = server.store.get(r.headers["x-request-id"])
        assert job.state.value == "COMPLETED" and job.metrics["stream_pieces"] == 4
        assert parts[0][0] < job.finished_at - PIECE_DELAY          # at least a piece's time before the end
        body = b"".join(d for _, d in parts)
        stored = c.get(f"/v2/requests/{job.id}/audio")                # the whole file, now it is COMPLETED
        assert stored.status_code == 200 and stored.headers["content-length"] == str(len(stored.content))
    if fmt in ("wav", "pcm"):
        header = 44 if fmt == "wav" else 0
        assert body[header:] == stored.content[header:]               # the same samples, sent as they came
        if fmt == "wav":
            assert body[4:8] == b"\xff\xff\xff\xff" and body[40:44] == b"\xff\xff\xff\xff"
            x, rate = sf.read(io.BytesIO(body), dtype="int16")
            assert rate == 24000 and len(x) * 2 == len(body) - 44
    elif fmt == "aac":
        import av
        with av.open(io.BytesIO(body)) as f:
            n = sum(frame.samples for frame in f.decode(audio=0))
        assert abs(n / 24000 - expected_seconds()) < 0.1
    else:
        x, rate = sf.read(io.BytesIO(body))
        assert abs(len(x) / rate - expected_seconds()) < 0.1


def test_v2_audio_streams_while_the_job_runs_then_serves_the_file(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        rid = c.post("/v2/chatterbox-tts", json={"text": TEXT, "output_format": "pcm", "stream": True,
                                                   "seed": 4}).json()["request_id"]
        r, parts = timed_stream(c, "GET", f"/v2/requests/{rid}/audio")
        assert r.status_code == 200 and r.headers["content-type"] == "audio/pcm"
        job = server.store.get(rid)
        assert parts[0][0] < job.finished_at - PIECE_DELAY
        body = b"".join(d for _, d in parts)
        whole = c.get(f"/v2/requests/{rid}/audio")
        assert whole.status_code == 200 and whole.content == body
        assert len(body) == int(expected_seconds() * 24000) * 2
        part = c.get(f"/v2/requests/{rid}/audio", headers={"Range": "bytes=0-99"})
        assert part.status_code == 206 and part.content == body[:100]
        again, _ = timed_stream(c, "GET", f"/v2/requests/{rid}/audio")   # a second reader, later: the same
        assert again.status_code == 200


def test_v2_audio_of_an_unstreamed_job_is_the_file_once_completed(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        rid = c.post("/v2/chatterbox-tts", json={"text": TEXT, "output_format": "wav"}).json()["request_id"]
        early = c.get(f"/v2/requests/{rid}/audio")
        assert early.status_code == 409 and "stream" in early.json()["error"]
        deadline = time.time() + 15
        while c.get(f"/v2/requests/{rid}/status").json()["status"] != "COMPLETED" and time.time() < deadline:
            time.sleep(0.05)
        r = c.get(f"/v2/requests/{rid}/audio")
        out = c.get(c.get(f"/v2/requests/{rid}").json()["output"])
        assert r.status_code == 200 and r.content == out.content and r.headers["content-type"] == "audio/wav"
        assert c.get("/v2/requests/00000000-0000-0000-0000-000000000000/audio").status_code == 404


def test_a_job_failing_before_its_first_piece_is_an_error_response(server):
    r = httpx.post(server.url + "/v1/chatterbox-tts", json={"text": "FAIL-ME now.", "stream": True}, timeout=30)
    assert r.status_code == 422 and "cannot be spoken" in r.json()["error"]
    rid = httpx.post(server.url + "/v2/chatterbox-tts", json={"text": "FAIL-ME.", "stream": True}).json()["request_id"]
    deadline = time.time() + 15
    while server.store.get(rid).state.value != "FAILED" and time.time() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{server.url}/v2/requests/{rid}/audio").status_code == 422


def test_a_job_failing_mid_stream_cuts_the_body(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            with c.stream("POST", "/v1/chatterbox-tts", json={"text": "One. FAIL-MID-STREAM two. Three.",
                                                                "output_format": "pcm", "stream": True}) as r:
                assert r.status_code == 200          # sent with the first piece, before the failure
                for _ in r.iter_raw():
                    pass


def test_flac_cannot_be_streamed_and_the_parameter_is_named(server):
    r = httpx.post(server.url + "/v1/chatterbox-tts", json={"text": "x", "output_format": "flac", "stream": True})
    assert r.status_code == 400 and "parameter 'stream'" in r.json()["error"] and "flac" in r.json()["error"]
    r = httpx.post(server.url + "/v1/chatterbox-tts", json={"text": "x", "stream": "yes"})
    assert r.status_code == 400 and "parameter 'stream'" in r.json()["error"]


def test_stream_with_speed_is_stretched_as_it_streams(server):
    r = httpx.post(server.url + "/v1/chatterbox-tts", timeout=30,
                   json={"text": TEXT, "output_format": "pcm", "stream": True, "speed": 2.0})
    assert r.status_code == 200
    assert abs(len(r.content) / 2 / 24000 - expected_seconds() / 2) < 0.05


def test_without_stream_v1_answers_as_before(server):
    r = httpx.post(server.url + "/v1/chatterbox-tts", json={"text": TEXT, "output_format": "pcm"}, timeout=30)
    assert r.status_code == 200 and r.headers["content-length"] == str(len(r.content))
    job = server.store.get(r.headers["x-request-id"])
    assert "stream" not in job.params and "stream_pieces" not in job.metrics
    assert server.store.read_chunks(job.id).chunks == []
    assert len(r.content) == int(expected_seconds() * 24000) * 2
    streamed = httpx.post(server.url + "/v1/chatterbox-tts", timeout=30,
                          json={"text": TEXT, "output_format": "pcm", "stream": True})
    assert streamed.content == r.content          # the double has no watermark: the same samples
    assert np.frombuffer(r.content, "<i2").any()
