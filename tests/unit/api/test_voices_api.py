"""The voice library over HTTP, on SQLite and on Redis (the store's backend): create (multipart as OpenAI's SDK
sends it, JSON with base64 or a URL), list, get, delete, isolation between keys, use by id, name, object form and
the hosted routes' `voice`, conditionals computed once (at creation with an in-process engine; by the first worker
in a fleet), a voice deleted while a job waits for it, limits."""
from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import pytest
import soundfile as sf

from chatterbox_serverless.service import build_service
from chatterbox_serverless.settings import Settings
from chatterbox_serverless.testing import FakeEngineForTests, start_server, wait_until

openai = pytest.importorskip("openai")


def clip(seconds: float = 1.0, freq: float = 150.0) -> bytes:
    t = np.arange(int(seconds * 24000)) / 24000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 24000, format="WAV")
    return buf.getvalue()


def dominant(data: bytes) -> float:
    x, rate = sf.read(io.BytesIO(data), dtype="float32")
    return float(np.argmax(np.abs(np.fft.rfft(x))) * rate / len(x))


@pytest.fixture(params=["sqlite", "redis"])
def backend(request, tmp_path):
    """Settings for a server with keys on the parametrised backend."""
    if request.param == "sqlite":
        return {}
    return {"store": request.getfixturevalue("redis_url"), "redis_prefix": request.getfixturevalue("redis_prefix")}


@pytest.fixture
def server(tmp_path, backend):
    engine = FakeEngineForTests()
    with start_server(tmp_path, engine=engine, accounts=True, batch_wait=0.0, sync_timeout=10.0, **backend) as srv:
        srv.extra["keys"] = [srv.accounts.create_key(f"k{i}", 1000, 0)[0] for i in range(2)]
        yield srv


def sdk(server, key: str):
    return openai.OpenAI(api_key=key, base_url=server.url + "/v1", max_retries=0, timeout=30)


def test_create_list_get_delete_and_isolation(server):
    a, b = server.extra["keys"]
    ca = sdk(server, a)
    made = ca.audio.voices.create(name="narrator", audio_sample=("me.wav", clip(), "audio/wav"), consent="none")
    assert made.object == "audio.voice" and made.id.startswith("voice_") and made.name == "narrator"
    h = {"authorization": f"Bearer {a}"}
    other = httpx.post(server.url + "/v1/audio/voices", headers=h,
                       json={"name": "second", "audio_sample": base64.b64encode(clip(2.0)).decode()})
    assert other.status_code == 200, other.text
    assert other.json()["audio_sample"]["seconds"] == 2.0
    listed = httpx.get(server.url + "/v1/audio/voices", headers=h).json()
    assert listed["object"] == "list" and [v["name"] for v in listed["data"]] == ["narrator", "second"]
    for ref in (made.id, "narrator"):
        got = httpx.get(f"{server.url}/v1/audio/voices/{ref}", headers=h)
        assert got.status_code == 200 and got.json()["id"] == made.id
    # another key sees nothing of them
    hb = {"authorization": f"Bearer {b}"}
    assert httpx.get(server.url + "/v1/audio/voices", headers=hb).json()["data"] == []
    assert httpx.get(f"{server.url}/v1/audio/voices/{made.id}", headers=hb).status_code == 404
    with pytest.raises(openai.NotFoundError):
        sdk(server, b).audio.voices.delete(made.id)
    with pytest.raises(openai.BadRequestError) as e:
        sdk(server, b).audio.speech.create(model="tts-1", input="hi", voice={"id": made.id})
    assert e.value.body["param"] == "voice"
    r = httpx.post(server.url + "/v1/chatterbox-tts", headers={"x-api-key": b}, json={"text": "hi", "voice": made.id})
    assert r.status_code == 400 and "voice" in r.json()["error"]
    # the same name is another key's own
    sdk(server, b).audio.voices.create(name="narrator", audio_sample=("b.wav", clip(), "audio/wav"), consent="x")
    deleted = ca.audio.voices.delete(made.id)
    assert deleted.deleted and deleted.id == made.id
    assert httpx.get(f"{server.url}/v1/audio/voices/{made.id}", headers=h).status_code == 404
    with pytest.raises(openai.NotFoundError):
        ca.audio.voices.delete(made.id)


def test_used_by_id_name_object_and_the_hosted_voice(server):
    key = server.extra["keys"][0]
    c = sdk(server, key)
    v = c.audio.voices.create(name="deep", audio_sample=("d.wav", clip(), "audio/wav"), consent="x")
    builtin = c.audio.speech.create(model="tts-1", input="hello", voice="alloy", response_format="wav").content
    outs = [c.audio.speech.create(model="tts-1", input="hello", voice=voice, response_format="wav").content
            for voice in (v.id, "deep", {"id": v.id})]
    hosted = httpx.post(server.url + "/v1/chatterbox-tts", headers={"x-api-key": key},
                        json={"text": "hello", "voice": "deep", "output_format": "wav"}, timeout=30)
    assert hosted.status_code == 200, hosted.text
    assert outs[0] == outs[1] == outs[2] != builtin
    # the OpenAI route streams (its wav header has the streaming sizes): the same samples as the hosted file
    samples = lambda data: sf.read(io.BytesIO(data), dtype="int16")[0]
    assert np.array_equal(samples(outs[0]), samples(hosted.content))
    assert dominant(builtin) == pytest.approx(620, abs=10) and dominant(outs[0]) == pytest.approx(670, abs=10)
    # the engine got the stored conditionals: computed once, at creation (an engine runs in this process)
    assert len(server.engine.prepared) == 1
    both = httpx.post(server.url + "/v1/chatterbox-tts", headers={"x-api-key": key},
                      json={"text": "hi", "voice": "deep", "reference_audio": base64.b64encode(clip()).decode()})
    assert both.status_code == 400 and "not both" in both.json()["error"]
    default = httpx.post(server.url + "/v1/chatterbox-tts", headers={"x-api-key": key},
                         json={"text": "hello", "voice": "default", "output_format": "wav"}, timeout=30)
    assert np.array_equal(samples(default.content), samples(builtin))


def test_creation_errors(server):
    key = server.extra["keys"][0]
    h = {"authorization": f"Bearer {key}"}

    def create(**body):
        return httpx.post(server.url + "/v1/audio/voices", headers=h, json=body)

    cases = [(dict(name="x", audio_sample="aGVsbG8gd29ybGQ="), 400, "audio_sample"),       # not audio
             (dict(name="alloy", audio_sample=base64.b64encode(clip()).decode()), 400, "name"),
             (dict(name="voice_1", audio_sample=base64.b64encode(clip()).decode()), 400, "name"),
             (dict(audio_sample=base64.b64encode(clip()).decode()), 400, "name"),
             (dict(name="x"), 400, "audio_sample"),
             (dict(name="x", audio_sample="http://127.0.0.1:9/a.wav"), 400, "audio_sample"),    # SSRF rules
             (dict(name="x", audio_sample=base64.b64encode(clip(0.2)).decode()), 400, "audio_sample")]
    for body, status, param in cases:
        r = create(**body)
        assert r.status_code == status, (body.get("name"), r.text)
        assert r.json()["error"]["param"] == param, r.json()
    assert create(name="one", audio_sample=base64.b64encode(clip()).decode()).status_code == 200
    r = create(name="one", audio_sample=base64.b64encode(clip()).decode())
    assert r.status_code == 409 and "already" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/audio/voices", headers=h, files={"audio_sample": ("a.wav", clip())})
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"


def test_limits_per_key(tmp_path, backend):
    with start_server(tmp_path, engine=FakeEngineForTests(), accounts=True, max_voices=2, max_voice_bytes=100_000,
                      **backend) as srv:
        key = srv.accounts.create_key("k", 10, 0)[0]
        c = sdk(srv, key)
        for name in ("a", "b"):
            c.audio.voices.create(name=name, audio_sample=("x.wav", clip(), "audio/wav"), consent="x")
        with pytest.raises(openai.ConflictError) as e:
            c.audio.voices.create(name="c", audio_sample=("x.wav", clip(), "audio/wav"), consent="x")
        assert "2" in e.value.message
        c.audio.voices.delete("a")
        with pytest.raises(openai.APIStatusError) as e:         # 3 s of 24 kHz wav: 144 KB > 100 KB
            c.audio.voices.create(name="c", audio_sample=("x.wav", clip(3.0), "audio/wav"), consent="x")
        assert e.value.status_code in (400, 413)


def test_fleet_first_worker_computes_once_and_a_deleted_voice_fails_its_jobs(tmp_path, backend):
    """An API without an engine: creation stores the clip; the first worker that needs the voice computes its
    conditionals and stores them; no later job recomputes them. A job whose voice is deleted before it runs
    FAILs saying so, and its hold is released."""
    with start_server(tmp_path, engine=None, workers=0, accounts=True, **backend) as srv:
        key = srv.accounts.create_key("k", 1000, 0)[0]
        h = {"x-api-key": key}
        voice = httpx.post(srv.url + "/v1/audio/voices", headers=h,
                           json={"name": "v", "audio_sample": base64.b64encode(clip()).decode()}).json()
        keep = httpx.post(srv.url + "/v1/audio/voices", headers=h,
                          json={"name": "keep", "audio_sample": base64.b64encode(clip(1.5)).decode()}).json()
        jobs = [httpx.post(srv.url + "/v2/chatterbox-tts", headers=h,
                           json={"text": "queued", "voice": name, "output_format": "wav"}).json()["request_id"]
                for name in ("v", "keep", "keep")]
        assert httpx.delete(f"{srv.url}/v1/audio/voices/{voice['id']}", headers=h).status_code == 200
        engine = FakeEngineForTests()
        settings = Settings(data_dir=tmp_path / "data", batch_wait=0.0, **backend)
        worker_service = build_service(settings, engine=engine, store=srv.store, accounts=False, with_worker=True)
        worker_service.start()
        try:
            def status(job_id: str) -> dict:
                return httpx.get(f"{srv.url}/v2/requests/{job_id}/status", headers=h).json()
            finals = [wait_until(lambda j=j: (s := status(j))["status"] in ("COMPLETED", "FAILED") and s)
                      for j in jobs]
            assert finals[0]["status"] == "FAILED" and "deleted" in finals[0]["error"], finals[0]
            assert [f["status"] for f in finals[1:]] == ["COMPLETED", "COMPLETED"]
            assert len(engine.prepared) == 1                       # "keep", once for both jobs
            assert srv.service.voices.store.conditionals(keep["id"], engine.voice_variant) is not None
            wait_until(lambda: httpx.get(srv.url + "/v1/account", headers=h).json()["held"] == 0)
            # a later job (another worker process would do the same) loads the stored conditionals
            more = httpx.post(srv.url + "/v2/chatterbox-tts", headers=h, json={"text": "again", "voice": "keep"})
            wait_until(lambda: status(more.json()["request_id"])["status"] == "COMPLETED")
            assert len(engine.prepared) == 1
        finally:
            worker_service.stop()
            worker_service.close()
        time.sleep(0)
