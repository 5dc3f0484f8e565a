"""OpenAI's speech API through the official `openai` SDK, against the real app on a real socket with the engine
double: every response format decodes, streaming (chunked body, SSE events parsed with the SDK's own SSE
decoder; with_streaming_response gets its first chunk before the job completes; a failure mid-stream), speed,
the SDK's exception classes with the server's message, models."""
from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import soundfile as sf

from chatterbox_serverless.testing import FakeEngineForTests, ServerWithKeys, start_server

openai = pytest.importorskip("openai")

TEXT = ("Hello from the OpenAI route. " * 5).strip()   # 144 characters: 1.54 s of tone from the double


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with start_server(tmp_path_factory.mktemp("oai"), engine=FakeEngineForTests(), batch_wait=0.0) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(api_key="unused", base_url=server.url + "/v1", max_retries=0, timeout=30) as c:
        yield c


def decode(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    if fmt == "pcm":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768, 24000
    if fmt == "aac":
        import av
        with av.open(io.BytesIO(data)) as c:
            stream = c.streams.audio[0]
            return np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(stream)]), stream.sample_rate
    x, rate = sf.read(io.BytesIO(data), dtype="float32")
    return x, rate


def dominant(x: np.ndarray, rate: int) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(x * np.hanning(len(x))))) * rate / len(x))


@pytest.mark.parametrize("fmt,media_type", [("mp3", "audio/mpeg"), ("opus", "audio/ogg; codecs=opus"),
                                            ("aac", "audio/aac"), ("flac", "audio/flac"), ("wav", "audio/wav"),
                                            ("pcm", "audio/pcm")])
def test_every_response_format_decodes(client, fmt, media_type):
    r = client.audio.speech.create(model="tts-1", input=TEXT, voice="alloy", response_format=fmt)
    assert r.response.headers["content-type"] == media_type
    x, rate = decode(r.content, fmt)
    expected = 0.1 + 0.01 * len(TEXT)
    assert abs(len(x) / rate - expected) < 0.1, (fmt, len(x) / rate)
    assert abs(dominant(x, rate) - 620.0) < 10           # the double's tone for seed 42
    if fmt == "pcm":                                      # raw 24 kHz 16-bit mono: the byte count is the duration
        assert len(r.content) == int(expected * 24000) * 2


def test_streaming_response_comes_in_chunks(client):
    whole = client.audio.speech.create(model="chatterbox-tts", input=TEXT, voice="default", response_format="pcm")
    with client.audio.speech.with_streaming_response.create(model="gpt-4o-mini-tts", input=TEXT, voice="nova",
                                                            response_format="pcm") as response:
        assert response.headers.get("transfer-encoding") == "chunked" and "content-length" not in response.headers
        chunks = list(response.iter_bytes())
    assert len(chunks) >= 1 and b"".join(chunks) == whole.content


def test_sse_events_parsed_by_the_sdk_decoder(client):
    from openai._streaming import SSEDecoder
    whole = client.audio.speech.create(model="tts-1", input=TEXT, voice="alloy", response_format="pcm").content
    with client.audio.speech.with_streaming_response.create(model="tts-1", input=TEXT, voice="alloy",
                                                            response_format="pcm", stream_format="sse") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(sse.data) for sse in SSEDecoder().iter_bytes(response.iter_bytes())]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) >= 2 and events[-1]["type"] == "speech.audio.done" and events[:-1] == deltas
    assert b"".join(base64.b64decode(e["audio"]) for e in deltas) == whole
    usage = events[-1]["usage"]
    assert usage["input_tokens"] == len(TEXT.strip()) and usage["total_tokens"] == usage["input_tokens"] + \
        usage["output_tokens"]


@pytest.mark.parametrize("speed", [2.0, 0.5])
def test_speed_scales_the_duration_and_keeps_the_pitch(client, speed):
    r = client.audio.speech.create(model="tts-1", input=TEXT, voice="alloy", response_format="wav", speed=speed)
    x, rate = decode(r.content, "wav")
    expected = (0.1 + 0.01 * len(TEXT)) / speed
    assert abs(len(x) / rate / expected - 1) < 0.10
    assert abs(dominant(x, rate) - 620.0) < 620 * 0.03


def test_sampling_parameters_as_extra_fields(client):
    a = client.audio.speech.create(model="tts-1", input="hi", voice="alloy", response_format="wav",
                                   extra_body={"seed": 7, "temperature": 0.5, "exaggeration": 1.0})
    x, rate = decode(a.content, "wav")
    assert abs(dominant(x, rate) - (200 + 7 * 10)) < 10 and a.response.headers["x-seed-value"] == "7"
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.speech.create(model="tts-1", input="hi", voice="alloy", extra_body={"temperature": 9})
    assert e.value.body["param"] == "temperature"


def test_instructions_accepted(client):
    r = client.audio.speech.create(model="tts-1", input="hi", voice="alloy", instructions="Speak calmly.",
                                   response_format="wav")
    assert decode(r.content, "wav")[0].size > 0


def test_bad_requests_raise_bad_request_error(client):
    cases = [(dict(speed=5.0), "speed"), (dict(response_format="m4a"), "response_format"),
             (dict(voice="nobody"), "voice"), (dict(input="   "), "input"), (dict(voice={"id": "voice_x"}), "voice"),
             (dict(stream_format="ws"), "stream_format"), (dict(input="x" * 5001), "input")]
    for change, param in cases:
        args = {"model": "tts-1", "input": "hi", "voice": "alloy", **change}
        with pytest.raises(openai.BadRequestError) as e:
            client.audio.speech.create(**args)
        assert e.value.status_code == 400 and e.value.body["param"] == param, (change, e.value.body)
        assert e.value.body["type"] == "invalid_request_error" and param in e.value.message


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.audio.speech.create(model="whisper-1", input="hi", voice="alloy")
    assert e.value.body["code"] == "model_not_found" and "whisper-1" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("whisper-1")
    with pytest.raises(openai.NotFoundError):
        client.audio.voices.delete("voice_0123456789abcdef0123456789abcdef")


def test_models(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["chatterbox-tts", "tts-1", "tts-1-hd", "gpt-4o-mini-tts"]
    model = client.models.retrieve("tts-1-hd")
    assert model.id == "tts-1-hd" and model.object == "model" and model.owned_by


def test_errors_keep_the_hosted_shape_elsewhere(server):
    r = httpx.post(server.url + "/v1/chatterbox-tts", json={"text": "hi", "speed": 9})
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    r = httpx.post(server.url + "/v1/audio/speech", json={"model": "tts-1", "voice": "alloy"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = httpx.post(server.url + "/v1/audio/speech", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(server.url + "/v1/audio/nothing-here")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_a_failed_job_is_unprocessable_and_not_retried(client):
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.audio.speech.create(model="tts-1", input="FAIL-ME please", voice="alloy")
    assert "cannot be spoken" in e.value.message
    assert e.value.response.headers["x-should-retry"] == "false"


def test_keys_credits_and_rate_limits_as_on_the_hosted_routes(tmp_path):
    with ServerWithKeys(tmp_path / "data") as s:
        def sdk(key: str) -> "openai.OpenAI":
            return openai.OpenAI(api_key=key, base_url=s.url + "/v1", max_retries=0, timeout=30)

        good = s.key(credits=100)
        r = sdk(good).audio.speech.create(model="tts-1", input="x" * 40, voice="alloy", response_format="wav")
        assert sf.info(io.BytesIO(r.content)).duration == pytest.approx(2.0, abs=0.01)
        assert s.settled(good)["balance"] == 98                                  # 2 s of audio: 2 credits
        with pytest.raises(openai.AuthenticationError) as e:
            sdk("cbx_not-a-key").audio.speech.create(model="tts-1", input="hi", voice="alloy")
        assert e.value.body["code"] == "invalid_api_key" and "invalid" in e.value.message.lower()
        revoked, account = s.accounts.create_key("gone", 10)
        s.accounts.store.set_revoked(account.id)
        with pytest.raises(openai.PermissionDeniedError):
            sdk(revoked).models.list()
        limited = s.key(rate=1)
        sdk(limited).audio.speech.create(model="tts-1", input="hi", voice="alloy")
        with pytest.raises(openai.RateLimitError) as e:
            sdk(limited).audio.speech.create(model="tts-1", input="hi", voice="alloy")
        assert int(e.value.response.headers["retry-after"]) >= 1
        poor = s.key(credits=0)
        with pytest.raises(openai.RateLimitError) as e:
            sdk(poor).audio.speech.create(model="tts-1", input="hi", voice="alloy")
        assert e.value.body["code"] == "insufficient_quota" and e.value.response.headers["x-should-retry"] == "false"


def test_no_worker_is_a_server_error(tmp_path):
    with start_server(tmp_path, engine=None, workers=0) as srv:
        c = openai.OpenAI(api_key="unused", base_url=srv.url + "/v1", max_retries=0, timeout=30)
        with pytest.raises(openai.InternalServerError) as e:
            c.audio.speech.create(model="tts-1", input="hi", voice="alloy")
        assert e.value.status_code == 502 and "no worker" in e.value.message


SENTENCES = "The first sentence is here. A second one follows it. Then a third one. And the fourth, the last."


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    """The double hands over one piece per sentence, 0.4 s apart: a four-sentence input takes 1.6 s."""
    engine = FakeEngineForTests(piece_delay=0.4, max_seconds=10.0)
    with start_server(tmp_path_factory.mktemp("oai-slow"), engine=engine, batch_wait=0.0) as srv:
        yield srv


@pytest.mark.parametrize("fmt", ["pcm", "mp3", "wav"])
def test_with_streaming_response_gets_its_first_chunk_before_the_job_completes(slow_server, fmt):
    import time
    with openai.OpenAI(api_key="unused", base_url=slow_server.url + "/v1", max_retries=0, timeout=30) as c:
        with c.audio.speech.with_streaming_response.create(model="tts-1", input=SENTENCES, voice="alloy",
                                                           response_format=fmt) as response:
            arrivals = [(time.time(), chunk) for chunk in response.iter_bytes(chunk_size=None)]
            job_id = response.headers["x-request-id"]
    job = slow_server.store.get(job_id)
    assert job.state.value == "COMPLETED" and job.metrics["stream_pieces"] == 4
    assert arrivals[0][0] < job.finished_at - 0.4        # the first chunk, at least a piece before the end
    x, rate = decode(b"".join(chunk for _, chunk in arrivals), fmt)
    assert abs(len(x) / rate - (0.1 + 0.01 * len(SENTENCES))) < 0.1


def test_sse_deltas_arrive_while_the_job_runs_and_a_late_failure_is_an_error_event(slow_server):
    import time
    from openai._streaming import SSEDecoder
    with openai.OpenAI(api_key="unused", base_url=slow_server.url + "/v1", max_retries=0, timeout=30) as c:
        with c.audio.speech.with_streaming_response.create(model="tts-1", input=SENTENCES, voice="alloy",
                                                           response_format="pcm", stream_format="sse") as response:
            events = [(time.time(), sse) for sse in SSEDecoder().iter_bytes(response.iter_bytes())]
            job = slow_server.store.get(response.headers["x-request-id"])
        assert events[0][0] < job.finished_at - 0.4 and json.loads(events[-1][1].data)["type"] == "speech.audio.done"
        with c.audio.speech.with_streaming_response.create(model="tts-1", input="One. FAIL-MID-STREAM two. Three.",
                                                           voice="alloy", response_format="pcm",
                                                           stream_format="sse") as response:
            assert response.status_code == 200
            events = list(SSEDecoder().iter_bytes(response.iter_bytes()))
    assert json.loads(events[0].data)["type"] == "speech.audio.delta"
    assert events[-1].event == "error"
    error = json.loads(events[-1].data)["error"]
    assert error["code"] == "stream_interrupted" and "failed" in error["message"]
