"""The HTTP contract against the real server (uvicorn on loopback) with FakeEngineForTests."""
from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import pytest
import soundfile as sf

from chatterbox_serverless.testing import FakeEngineForTests, start_server
from chatterbox_serverless.api.routers.hosted import NO_WORKER_GRACE_S

V1 = "/v1/chatterbox-tts"
V2 = "/v2/chatterbox-tts"


@pytest.fixture
def server(tmp_path):
    with start_server(tmp_path, engine=FakeEngineForTests(), batch_wait=0.01) as s:
        yield s


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def wav_b64(seconds: float = 1.0, rate: int = 16000) -> str:
    buf = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    sf.write(buf, (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format="WAV")
    return base64.b64encode(buf.getvalue()).decode()


def poll(client: httpx.Client, status_url: str, timeout: float = 10.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get(status_url)
        if r.json().get("status") in ("COMPLETED", "FAILED"):
            return r
        time.sleep(0.02)
    raise AssertionError("job did not finish")


def test_v2_submit_poll_result_and_signed_audio(server, client):
    r = client.post(V2, json={"text": "Hello there.", "output_format": "wav", "seed": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"request_id", "status", "status_url", "response_url"}
    assert body["status"] == "QUEUED"
    rid = body["request_id"]
    assert body["status_url"] == f"{server.url}/v2/requests/{rid}/status"
    assert body["response_url"] == f"{server.url}/v2/requests/{rid}"
    assert r.headers["x-request-id"] == rid

    s = poll(client, body["status_url"])
    assert s.status_code == 200 and s.json()["status"] == "COMPLETED"
    res = client.get(body["response_url"])
    assert res.status_code == 200
    out = res.json()
    assert out["status"] == "COMPLETED" and out["request_id"] == rid
    for k in ("inference_time", "queue_time", "total_time", "audio_seconds"):
        assert isinstance(out["metrics"][k], (int, float)), k
    assert out["output"].startswith(f"{server.url}/files/{rid}.wav?")

    # a browser GET without any header gets the audio
    audio = httpx.get(out["output"])
    assert audio.status_code == 200 and audio.headers["content-type"] == "audio/wav"
    samples, rate = sf.read(io.BytesIO(audio.content))
    assert rate == 24000 and len(samples) > 0
    # tampered or stripped signatures are refused
    assert httpx.get(out["output"].replace("signature=", "signature=x")).status_code == 403
    assert httpx.get(out["output"].split("?")[0]).json()["error"]
    other = out["output"].replace(rid, "00000000-0000-4000-8000-000000000000")
    assert httpx.get(other).status_code == 403


@pytest.mark.parametrize("fmt,ctype,sf_format", [("mp3", "audio/mpeg", "MP3"), ("wav", "audio/wav", "WAV"),
                                                 ("flac", "audio/flac", "FLAC"), ("ogg", "audio/ogg", "OGG")])
def test_v1_returns_audio_in_each_format(client, fmt, ctype, sf_format):
    r = client.post(V1, json={"text": "Short line.", "output_format": fmt})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == ctype
    assert r.headers["x-request-id"] and r.headers["x-seed-value"] == "42"
    info = sf.info(io.BytesIO(r.content))
    assert info.format == sf_format and info.duration > 0.1


def test_v1_default_is_mp3_and_same_seed_same_bytes(client):
    a = client.post(V1, json={"text": "Same text.", "seed": 3, "output_format": "wav"})
    b = client.post(V1, json={"text": "Same text.", "seed": 3, "output_format": "wav"})
    c = client.post(V1, json={"text": "Same text.", "seed": 4, "output_format": "wav"})
    assert a.content == b.content != c.content
    assert client.post(V1, json={"text": "x"}).headers["content-type"] == "audio/mpeg"


def test_failed_job_is_422_with_error_on_status_and_result(client):
    r = client.post(V2, json={"text": "please FAIL-ME now"})
    s = poll(client, r.json()["status_url"])
    assert s.status_code == 422
    assert s.json() == {"request_id": r.json()["request_id"], "status": "FAILED", "metrics": s.json()["metrics"],
                        "error": "fake engine: this text cannot be spoken"}
    res = client.get(r.json()["response_url"])
    assert res.status_code == 422
    assert res.json()["status"] == "FAILED" and res.json()["error"] and res.json()["output"] is None
    v1 = client.post(V1, json={"text": "FAIL-ME again"})
    assert v1.status_code == 422 and v1.json()["error"] == "fake engine: this text cannot be spoken"


def test_a_crashing_batch_fails_only_the_bad_request(tmp_path):
    engine = FakeEngineForTests(delay=0.2)
    with start_server(tmp_path, engine=engine, batch_size=8, batch_wait=0.3) as srv, \
            httpx.Client(base_url=srv.url) as c:
        good = [c.post(V2, json={"text": f"fine {i}"}).json() for i in range(3)]
        bad = c.post(V2, json={"text": "CRASH-ME"}).json()
        for j in good:
            assert poll(c, j["status_url"]).json()["status"] == "COMPLETED"
        s = poll(c, bad["status_url"])
        assert s.status_code == 422 and "fake engine crash" in s.json()["error"]
        assert max(len(b) for b in engine.batches) >= 2     # they really were batched together


def test_unknown_and_foreign_ids_are_404(client):
    for path in ("/v2/requests/00000000-0000-4000-8000-000000000000/status",
                 "/v2/requests/00000000-0000-4000-8000-000000000000", "/v2/requests/..%2f..%2fetc/status"):
        r = client.get(path)
        assert r.status_code == 404 and "not found" in r.json()["error"]


@pytest.mark.parametrize("body,needle", [
    ({"text": "hi", "exaggeration": 2.5}, "'exaggeration'"),
    ({"text": "hi", "cfg_weight": -0.1}, "'cfg_weight'"),
    ({"text": "hi", "temperature": "hot"}, "'temperature'"),
    ({"text": "hi", "min_p": 1.5}, "'min_p'"),
    ({"text": "hi", "top_p": True}, "'top_p'"),
    ({"text": "hi", "repetition_penalty": 0.5}, "'repetition_penalty'"),
    ({"text": "hi", "seed": 1.5}, "'seed'"),
    ({"text": "hi", "seed": -1}, "'seed'"),
    ({"text": "hi", "output_format": "m4a"}, "'output_format'"),
    ({"text": "   "}, "'text'"),
    ({"text": 5}, "'text'"),
    ({"exaggeration": 1}, "'text'"),
    ({"text": "x" * 5001}, "'text'"),
    ({"text": "hi", "reference_audio": "ftp://example.com/a.wav"}, "reference_audio"),
    ({"text": "hi", "reference_audio": "not base64 at all!"}, "reference_audio"),
    ({"text": "hi", "reference_audio": base64.b64encode(b"just some bytes, not audio").decode()},
     "reference_audio"),
])
@pytest.mark.parametrize("path", [V1, V2])
def test_invalid_parameters_are_400_naming_the_parameter(client, body, needle, path):
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]", b'"text"'])
def test_malformed_bodies_are_400(client, content):
    r = client.post(V2, content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]


def test_every_error_is_json_error(client):
    cases = [("GET", "/nope", 404), ("GET", V2, 405), ("PUT", V1, 405), ("POST", "/v2/other-model", 404),
             ("POST", "/v1/other-model", 404), ("GET", "/v2/requests", 405), ("POST", V2 + "/", 404),
             ("DELETE", "/v2/requests/abc/status", 405)]
    for method, path, code in cases:
        r = client.request(method, path, json={"text": "hi"})
        assert r.status_code == code, (method, path, r.status_code)
        assert r.headers["content-type"] == "application/json" and r.json()["error"], (method, path)


def test_unknown_parameters_are_ignored(client):
    r = client.post(V2, json={"text": "hi", "base64": False, "foo": {"bar": 1}})
    assert r.status_code == 200


def test_inline_reference_audio_reaches_the_engine(server, client):
    r = client.post(V1, json={"text": "clone me", "reference_audio": wav_b64(), "output_format": "wav"})
    assert r.status_code == 200, r.text
    plain = client.post(V1, json={"text": "clone me", "output_format": "wav"})
    assert r.content != plain.content      # the fake engine shifts its tone when it got a voice


def test_reference_url_to_a_private_address_fails_the_job(tmp_path, client):
    # an address literal is known private at submit: 400
    r = client.post(V2, json={"text": "hi", "reference_audio": "http://127.0.0.1:9/voice.wav"})
    assert r.status_code == 400 and "reference_audio" in r.json()["error"]
    # a name is only known private once resolved, in the worker: FAILED
    from chatterbox_serverless.media import SafeFetcher
    loopback_dns = SafeFetcher(resolver=lambda host, port: ["127.0.0.1"])
    with start_server(tmp_path, engine=FakeEngineForTests(), fetcher=loopback_dns) as srv:
        r = httpx.post(srv.url + V2, json={"text": "hi", "reference_audio": "http://voice.example/voice.wav"})
        assert r.status_code == 200
        s = poll(httpx.Client(), r.json()["status_url"])
        assert s.status_code == 422 and s.json()["error"].startswith("reference_audio")


def test_public_url_is_used_for_absolute_urls(tmp_path):
    with start_server(tmp_path, engine=FakeEngineForTests(), public_url="https://tts.example.com/") as srv:
        body = httpx.post(srv.url + V2, json={"text": "hi"}).json()
        assert body["status_url"].startswith("https://tts.example.com/v2/requests/")
        poll(httpx.Client(), srv.url + f"/v2/requests/{body['request_id']}/status")
        out = httpx.get(srv.url + f"/v2/requests/{body['request_id']}").json()["output"]
        assert out.startswith("https://tts.example.com/files/")


def test_queue_is_bounded_429(tmp_path):
    with start_server(tmp_path, engine=None, workers=0, max_queue=3) as srv, httpx.Client(base_url=srv.url) as c:
        for _ in range(3):
            assert c.post(V2, json={"text": "hi"}).status_code == 200
        r = c.post(V2, json={"text": "hi"})
        assert r.status_code == 429 and "queue is full" in r.json()["error"] and r.headers["retry-after"]


def test_v1_without_any_worker_is_502(tmp_path):
    with start_server(tmp_path, engine=None, workers=0) as srv:
        t0 = time.monotonic()
        r = httpx.post(srv.url + V1, json={"text": "hi"})
        assert r.status_code == 502 and "no worker" in r.json()["error"]
        assert time.monotonic() - t0 >= NO_WORKER_GRACE_S * 0.9       # after a short wait for a worker, not at once
        ready = httpx.get(srv.url + "/ready")
        assert ready.status_code == 503 and ready.json()["error"]


def test_v1_times_out_with_504_and_the_job_goes_on(tmp_path):
    with start_server(tmp_path, engine=FakeEngineForTests(delay=1.0), sync_timeout=0.3) as srv, \
            httpx.Client(base_url=srv.url) as c:
        r = c.post(V1, json={"text": "slow"})
        assert r.status_code == 504
        body = r.json()
        assert body["error"] and body["request_id"] and body["status_url"].endswith(body["request_id"] + "/status")
        assert poll(c, body["status_url"]).json()["status"] == "COMPLETED"


def test_content_policy_fails_matching_jobs(tmp_path):
    terms = tmp_path / "blocked.txt"
    terms.write_text("# comment\nforbidden phrase\nbadword\n")
    with start_server(tmp_path, engine=FakeEngineForTests(), blocked_terms_file=terms) as srv, \
            httpx.Client(base_url=srv.url) as c:
        r = c.post(V1, json={"text": "This has a Forbidden,  phrase inside."})
        assert r.status_code == 422 and r.json()["error"].startswith("content policy")
        assert c.post(V1, json={"text": "badwords are fine, not whole-word"}).status_code == 200
        j = c.post(V2, json={"text": "BADWORD!"}).json()
        s = poll(c, j["status_url"])
        assert s.status_code == 422 and "content policy" in s.json()["error"]


def test_health_ready_metrics_openapi(server, client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    client.post(V1, json={"text": "count me"})
    m = client.get("/metrics").text
    for name in ("chatterbox_queue_depth", 'chatterbox_jobs{state="COMPLETED"}', "chatterbox_inference_seconds_count",
                 "chatterbox_audio_seconds_total", "chatterbox_http_requests_total"):
        assert name in m, name
    spec = client.get("/openapi.json").json()
    assert {"/v1/chatterbox-tts", "/v2/chatterbox-tts", "/v2/requests/{request_id}/status",
            "/v2/requests/{request_id}"} <= set(spec["paths"])
    props = spec["paths"]["/v2/chatterbox-tts"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert props["properties"]["exaggeration"]["maximum"] == 2
    assert client.get("/docs").status_code == 200


def test_request_id_header_is_echoed_or_made(client):
    assert client.get("/health", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    assert len(client.get("/health").headers["x-request-id"]) == 32


def test_results_expire_after_retention(tmp_path):
    with start_server(tmp_path, engine=FakeEngineForTests(), retention_seconds=0.5) as srv, \
            httpx.Client(base_url=srv.url) as c:
        j = c.post(V2, json={"text": "short-lived"}).json()
        poll(c, j["status_url"])
        out = c.get(j["response_url"]).json()["output"]
        time.sleep(1.1)
        assert c.get(j["status_url"]).status_code == 404
        assert c.get(j["response_url"]).status_code == 404
        assert httpx.get(out).status_code == 404
        srv.store.purge_expired(0.5)
        assert not any(srv.store.audio_dir.iterdir())
