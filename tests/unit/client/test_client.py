"""The Python SDK against `ContractServerForTests`: an in-memory double of the wire contract
(docs/api-contract.md), plugged in as an httpx transport, so that every client path (retries, timeouts,
failures, progress, downloads) is exercised quickly and exactly. tests/test_client_server.py runs the same
client against the real server."""
from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import json
import time
import uuid

import httpx
import numpy as np
import pytest
import soundfile as sf

import chatterbox_serverless.client as cbc
from chatterbox_serverless.client import (APIConnectionError, AsyncClient, ChatterboxError, Client,
                                          InferenceFailed, InferenceTimeout, ParameterError, Progress,
                                          SegmindClient, TTSParams, encode_audio, validate_params)
from chatterbox_serverless.client._base import PollSchedule, resolve_config, retry_delay

BASE = "http://tts.test"


def wav_bytes_for_tests(seconds: float = 0.1, rate: int = 24000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * rate), dtype=np.float32), rate, format="WAV")
    return buf.getvalue()


class ContractServerForTests:
    """The contract's four endpoints in memory. A job reports QUEUED for `queued_polls` status polls, then
    PROCESSING for `processing_polls`, then COMPLETED; a text containing "FAIL" ends FAILED (HTTP 422).
    `submit_replies`: canned responses answered to the next submissions before accepting one."""

    def __init__(self, base: str = BASE, queued_polls: int = 1, processing_polls: int = 1,
                 output_base: str | None = None) -> None:
        self.base = base
        self.output_base = output_base or base
        self.queued_polls = queued_polls
        self.processing_polls = processing_polls
        self.jobs: dict[str, dict] = {}
        self.submit_replies: list[httpx.Response] = []
        self.poll_replies: list[httpx.Response] = []
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if request.method == "POST" and path in ("/v1/chatterbox-tts", "/v2/chatterbox-tts"):
            if self.submit_replies:
                return self.submit_replies.pop(0)
            params = json.loads(request.content)
            if not isinstance(params.get("text"), str) or not params["text"]:
                return httpx.Response(400, json={"error": "text is required"})
            if path.startswith("/v1"):
                return httpx.Response(200, content=wav_bytes_for_tests(), headers={"content-type": "audio/wav"})
            rid = str(uuid.uuid4())
            self.jobs[rid] = {"params": params, "polls": 0}
            return httpx.Response(200, json={"request_id": rid, "status": "QUEUED",
                                             "status_url": f"{self.base}/v2/requests/{rid}/status",
                                             "response_url": f"{self.base}/v2/requests/{rid}"})
        if request.method == "GET" and path.startswith("/v2/requests/"):
            if self.poll_replies:
                return self.poll_replies.pop(0)
            rid = path.split("/")[3]
            job = self.jobs.get(rid)
            if job is None:
                return httpx.Response(404, json={"error": "request not found or expired"})
            if path.endswith("/status"):
                job["polls"] += 1
            state = self._state(job)
            body = {"request_id": rid, "status": state, "metrics": {}}
            if state == "FAILED":
                body["error"] = "content policy: blocked term"
                return httpx.Response(422, json={**body, "output": None})
            if state == "COMPLETED":
                body["metrics"] = {"inference_time": 0.01}
                body["output"] = f"{self.output_base}/files/{rid}.wav?sig=abc"
            elif not path.endswith("/status"):
                body["output"] = None
            return httpx.Response(200, json=body)
        if request.method == "GET" and path.startswith("/files/"):
            return httpx.Response(200, content=wav_bytes_for_tests(), headers={"content-type": "audio/wav"})
        return httpx.Response(404, json={"error": f"no route {request.method} {path}"})

    def _state(self, job: dict) -> str:
        if "FAIL" in job["params"]["text"]:
            return "FAILED" if job["polls"] > self.queued_polls else "QUEUED"
        if job["polls"] <= self.queued_polls:
            return "QUEUED"
        if job["polls"] <= self.queued_polls + self.processing_polls:
            return "PROCESSING"
        return "COMPLETED"


@pytest.fixture
def server():
    return ContractServerForTests()


@pytest.fixture
def client(server):
    with Client(api_key="k-123", base_url=BASE, transport=httpx.MockTransport(server)) as c:
        yield c


FAST = {"interval": 0.001, "backoff": 1.0}


def test_the_hosted_sdk_snippet_runs_with_only_the_import_changed(server, monkeypatch):
    monkeypatch.setattr(cbc, "_default_client", Client(base_url=BASE, transport=httpx.MockTransport(server)))
    server.queued_polls = server.processing_polls = 0    # run() polls at the hosted SDK's 1 s cadence
    segmind = cbc
    result = segmind.run("chatterbox-tts", text="Hello.", reference_audio="https://example.com/v.wav",
                         exaggeration=0.5, temperature=0.8, seed=42, cfg_weight=0.5, min_p=0.05, top_p=1,
                         repetition_penalty=1.2)
    assert result["status"] == "COMPLETED"
    assert result.get("output").startswith(BASE + "/files/")
    assert result["metrics"]["inference_time"] == 0.01

    job = segmind.submit_async("chatterbox-tts", text="Hello.")
    assert job.request_id and job.wait(timeout=600, interval=0.001)["status"] == "COMPLETED"
    assert segmind.run_sync("chatterbox-tts", text="Hello.").headers["content-type"] == "audio/wav"
    assert SegmindClient is Client and cbc.AsyncJob is cbc.Job and cbc.SegmindError is ChatterboxError


def test_key_and_user_agent_are_sent(client, server):
    client.run_sync("chatterbox-tts", text="Hi.")
    request = server.requests[-1]
    assert request.headers["x-api-key"] == "k-123"
    assert request.headers["user-agent"].startswith("chatterbox-serverless-python/")
    assert json.loads(request.content) == {"text": "Hi."}


def test_configuration_from_arguments_then_environment(monkeypatch):
    for name in ("CHATTERBOX_API_URL", "CHATTERBOX_API_KEY", "SEGMIND_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert resolve_config(None, None) == ("http://127.0.0.1:8000", None)
    monkeypatch.setenv("SEGMIND_API_KEY", "seg")
    monkeypatch.setenv("CHATTERBOX_API_URL", "https://tts.example.com/v1/")
    assert resolve_config(None, None) == ("https://tts.example.com", "seg")
    monkeypatch.setenv("CHATTERBOX_API_KEY", "cbx")
    assert resolve_config(None, None)[1] == "cbx"
    assert resolve_config("localhost:9000", "arg") == ("http://localhost:9000", "arg")
    with pytest.raises(ValueError, match="http"):
        resolve_config("ftp://host", None)


@pytest.mark.parametrize("params, message", [
    ({}, "text is required"),
    ({"text": "  "}, "text must not be empty"),
    ({"text": 3}, "text must be a string"),
    ({"text": "a", "temperature": 2.5}, "temperature must be between 0 and 2"),
    ({"text": "a", "repetition_penalty": 0.9}, "repetition_penalty must be between 1 and 2"),
    ({"text": "a", "top_p": True}, "top_p must be a number"),
    ({"text": "a", "min_p": float("nan")}, "min_p must be a finite number"),
    ({"text": "a", "seed": 1.5}, "seed must be an integer"),
    ({"text": "a", "seed": -1}, "seed must be between"),
    ({"text": "a", "output_format": "m4a"}, "output_format must be one of"),
    ({"text": "a", "reference_audio": 12}, "reference_audio must be"),
])
def test_bad_parameters_are_refused_before_sending(client, server, params, message):
    with pytest.raises(ParameterError, match=message):
        client.submit_async("chatterbox-tts", **params)
    assert server.requests == []


def test_typed_params_and_local_reference_audio(client, server, tmp_path):
    voice = tmp_path / "me.wav"
    voice.write_bytes(wav_bytes_for_tests())
    body = TTSParams(text="Hi.", reference_audio=voice, seed=7, output_format="wav").to_payload()
    assert body["reference_audio"].startswith("data:audio/wav;base64,")
    job = client.submit_async("chatterbox-tts", **body)
    sent = server.jobs[job.request_id]["params"]
    assert base64.b64decode(sent["reference_audio"].split(",", 1)[1]) == voice.read_bytes()
    assert sent["seed"] == 7 and sent["exaggeration"] == 0.5
    with pytest.raises(ParameterError, match="cannot read"):
        encode_audio(tmp_path / "missing.wav")
    assert validate_params({"text": "a", "reference_audio": b"RIFF"})["reference_audio"].startswith("data:")


def test_submit_retries_429_and_502_honouring_retry_after(client, server, monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    server.submit_replies = [httpx.Response(429, headers={"retry-after": "3"}, json={"error": "rate limited"}),
                             httpx.Response(502, json={"error": "no worker"})]
    job = client.submit_async("chatterbox-tts", text="Hi.")
    assert job.request_id in server.jobs
    assert slept[0] == 3.0 and 0 < slept[1] <= 1.25   # then backoff with jitter
    assert len(server.requests) == 3


def test_submit_gives_up_after_max_retries_and_never_retries_400(server, monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda s: None)
    with Client(base_url=BASE, transport=httpx.MockTransport(server), max_retries=2) as c:
        server.submit_replies = [httpx.Response(429, json={"error": "rate limited"})] * 5
        with pytest.raises(ChatterboxError) as e:
            c.submit_async("chatterbox-tts", text="Hi.")
        assert (e.value.status, e.value.detail) == (429, "rate limited")
        assert len(server.requests) == 3
        server.submit_replies = [httpx.Response(400, json={"error": "text too long"})]
        with pytest.raises(ChatterboxError, match="HTTP 400: text too long"):
            c.submit_async("chatterbox-tts", text="Hi.")
        assert len(server.requests) == 4


def test_retry_after_forms():
    now = time.time()
    date = email.utils.formatdate(now + 10, usegmt=True)
    assert 8 <= retry_delay(httpx.Response(429, headers={"retry-after": date}), 0, now=now) <= 10
    assert retry_delay(httpx.Response(503, headers={"retry-after": "0"}), 0) == 0
    assert retry_delay(httpx.Response(429, headers={"retry-after": "3600"}), 0) is None   # too long: give up
    assert retry_delay(httpx.Response(500), 0) is None
    assert retry_delay(httpx.Response(400), 0) is None
    assert 1.5 <= retry_delay(None, 2) <= 2.5


def test_connection_refused_is_retried_then_reported_clearly(monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda s: None)
    calls = []

    def refuse(request):
        calls.append(request)
        raise httpx.ConnectError("connection refused", request=request)

    with Client(base_url=BASE, transport=httpx.MockTransport(refuse), max_retries=2) as c:
        with pytest.raises(APIConnectionError, match="is the server running") as e:
            c.submit_async("chatterbox-tts", text="Hi.")
    assert len(calls) == 3 and e.value.request_sent is False


def test_a_broken_connection_after_sending_is_not_retried(monkeypatch):
    calls = []

    def drop(request):
        calls.append(request)
        raise httpx.ReadError("reset", request=request)

    with Client(base_url=BASE, transport=httpx.MockTransport(drop)) as c:
        with pytest.raises(APIConnectionError) as e:
            c.submit_async("chatterbox-tts", text="Hi.")
    assert len(calls) == 1 and e.value.request_sent is True


def test_wait_reports_progress_and_returns_the_result(client, server):
    server.queued_polls, server.processing_polls = 2, 2
    seen: list[Progress] = []
    job = client.submit_async("chatterbox-tts", text="Hi.")
    assert job.status()["status"] == "QUEUED"
    result = job.wait(on_progress=seen.append, **FAST)
    assert [p.status for p in seen] == ["QUEUED", "PROCESSING", "PROCESSING", "COMPLETED"]
    assert all(p.request_id == job.request_id for p in seen)
    assert seen[0].elapsed_s <= seen[-1].elapsed_s
    assert result["status"] == "COMPLETED" and result["output"]


def test_poll_schedule_backs_off_up_to_the_cap_and_stops_at_the_deadline():
    s = PollSchedule(timeout=100, interval=1.0, backoff=2.0, max_interval=5.0)
    assert [s.next_sleep() for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    s = PollSchedule(timeout=0.5, interval=1.0, backoff=1.5, max_interval=5.0)
    assert s.next_sleep() <= 0.5
    with pytest.raises(ValueError):
        PollSchedule(timeout=1, interval=0, backoff=1, max_interval=None)


def test_timeout_names_the_request_and_the_job_can_be_picked_up_again(client, server):
    server.queued_polls = 10**6
    job = client.submit_async("chatterbox-tts", text="Hi.")
    start = time.monotonic()
    with pytest.raises(InferenceTimeout) as e:
        job.wait(timeout=0.2, interval=0.01, backoff=1.0)
    assert 0.2 <= time.monotonic() - start < 1.0
    assert e.value.request_id == job.request_id and e.value.elapsed_s >= 0.2
    server.queued_polls = 0
    assert client.job(e.value.request_id).wait(**FAST)["status"] == "COMPLETED"


def test_failure_carries_the_servers_reason(client, server):
    job = client.submit_async("chatterbox-tts", text="please FAIL")
    with pytest.raises(InferenceFailed) as e:
        job.wait(**FAST)
    assert e.value.detail == "content policy: blocked term"
    assert e.value.status_body["status"] == "FAILED" and e.value.request_id == job.request_id
    assert job.result()["error"] == "content policy: blocked term"   # served with 422, still a body


def test_transient_poll_errors_are_retried_but_404_is_not(client, server):
    job = client.submit_async("chatterbox-tts", text="Hi.")
    server.poll_replies = [httpx.Response(502, json={"error": "restarting"}),
                           httpx.Response(503, text="unavailable")]
    assert job.wait(**FAST)["status"] == "COMPLETED"
    with pytest.raises(ChatterboxError) as e:
        client.job("no-such-id").wait(**FAST)
    assert e.value.status == 404 and "not found" in e.value.detail


def test_download_writes_the_file_and_keeps_the_key_on_the_servers_own_origin(server, tmp_path):
    with Client(api_key="k-123", base_url=BASE, transport=httpx.MockTransport(server)) as c:
        job = c.submit_async("chatterbox-tts", text="Hi.")
        job.wait(**FAST)
        out = job.download(tmp_path / "a.wav")
        assert sf.info(str(out)).samplerate == 24000
        assert server.requests[-1].headers["x-api-key"] == "k-123"
        assert list(tmp_path.iterdir()) == [out]                          # no partial file left behind
    server.output_base = "https://cdn.test"
    server.queued_polls = server.processing_polls = 0
    with Client(api_key="k-123", base_url=BASE, transport=httpx.MockTransport(server)) as c:
        result = c.run("chatterbox-tts", text="Hi.")
        assert c.fetch_audio(result)[:4] == b"RIFF"
        assert server.requests[-1].url.host == "cdn.test"
        assert "x-api-key" not in server.requests[-1].headers


def test_run_sync_504_is_a_timeout_with_the_request_id(client, server):
    server.submit_replies = [httpx.Response(504, json={"error": "timed out", "request_id": "r-1"})]
    with pytest.raises(InferenceTimeout) as e:
        client.run_sync("chatterbox-tts", text="Hi.")
    assert e.value.request_id == "r-1" and e.value.status == 504


def test_bad_model_name_is_refused(client):
    with pytest.raises(ParameterError, match="model name"):
        client.run("../admin", text="Hi.")


def test_async_client_has_the_same_methods(server, tmp_path):
    async def main():
        async with AsyncClient(base_url=BASE, transport=httpx.MockTransport(server)) as c:
            server.queued_polls = server.processing_polls = 0
            result = await c.run("chatterbox-tts", text="Hi.")
            assert result["status"] == "COMPLETED"
            seen = []
            server.queued_polls = server.processing_polls = 1
            job = await c.submit_async("chatterbox-tts", text="Hi.")
            assert (await job.status())["status"] == "QUEUED"
            result = await job.wait(on_progress=seen.append, **FAST)
            assert [p.status for p in seen][-1] == "COMPLETED"
            path = await job.download(tmp_path / "b.wav", result)
            assert sf.info(str(path)).frames > 0
            assert (await c.run_sync("chatterbox-tts", text="Hi.")).content[:4] == b"RIFF"
            failing = await c.submit_async("chatterbox-tts", text="FAIL")
            with pytest.raises(InferenceFailed, match="content policy"):
                await failing.wait(**FAST)
            server.queued_polls = 10**6
            slow = await c.submit_async("chatterbox-tts", text="Hi.")
            with pytest.raises(InferenceTimeout) as e:
                await slow.wait(timeout=0.05, interval=0.01)
            assert e.value.request_id == slow.request_id
            # Several at once: one event loop, concurrent polls.
            server.queued_polls = 1
            jobs = [await c.submit_async("chatterbox-tts", text=f"n{i}") for i in range(5)]
            results = await asyncio.gather(*(j.wait(**FAST) for j in jobs))
            assert {r["request_id"] for r in results} == {j.request_id for j in jobs}

    asyncio.run(main())


def test_errors_keep_the_hosted_sdks_attributes():
    e = InferenceFailed(detail="boom", status_body={"status": "FAILED", "error": "boom"})
    assert (e.detail, e.status, e.status_body["error"]) == ("boom", None, "boom")
    t = InferenceTimeout(request_id="r", elapsed_s=1.0)
    assert t.request_id == "r" and "did not complete" in str(t)
    assert ChatterboxError(400, "bad").to_dict() == {"status": 400, "detail": "bad"}
    assert isinstance(ParameterError("x"), ValueError)

