"""Several models on one deployment, over HTTP (real server, FakeEngineForTests per model): each served model's
/v1 and /v2 route with its own schema in the OpenAPI document, an unserved model's 404 in the hosted shape,
Multilingual's language, Turbo's top_k and the parameters it ignores, voice conversion's source_audio (required,
address rules, no stream, billed by its seconds), jobs carrying their model and params to that model's engine, a
library voice on every model, a served model without a worker, and the OpenAI route's model mapping."""
from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import pytest
import soundfile as sf

from chatterbox_serverless.api.schemas import REQUESTS, TTSRequest, V2Request
from chatterbox_serverless.engine.contract import PreparedVoice
from chatterbox_serverless.engine.languages import LANGUAGES
from chatterbox_serverless.testing import FakeEngineForTests, start_server

MODELS = ("chatterbox-tts", "chatterbox-turbo", "chatterbox-multilingual", "chatterbox-vc")


def wav_b64(seconds: float = 1.0, rate: int = 16000) -> str:
    buf = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    sf.write(buf, (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format="WAV")
    return base64.b64encode(buf.getvalue()).decode()


def poll(client: httpx.Client, request_id: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v2/requests/{request_id}/status").json()
        if body.get("status") in ("COMPLETED", "FAILED"):
            return body
        time.sleep(0.02)
    raise AssertionError("job did not finish")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engines = [FakeEngineForTests(model=m, voice_variant=f"fake-{m}") for m in MODELS]
    with start_server(tmp_path_factory.mktemp("models"), engines=engines, batch_wait=0.0) as s:
        s.extra["engines"] = {e.model: e for e in engines}
        yield s


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def body_schema(spec: dict, path: str) -> dict:
    return spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]


def documented(schema: dict) -> dict:
    """A schema as the OpenAPI document shows it (FastAPI leaves out `"default": null`)."""
    return {**schema, "properties": {name: {k: v for k, v in p.items() if not (k == "default" and v is None)}
                                     for name, p in schema["properties"].items()}}


def test_every_served_model_has_its_routes_and_schema(client):
    spec = client.get("/openapi.json").json()
    for model in MODELS:
        assert {f"/v1/{model}", f"/v2/{model}"} <= set(spec["paths"]), model
    # the hosted contract's schema, as before (the document leaves out null defaults)
    assert body_schema(spec, "/v1/chatterbox-tts") == documented(TTSRequest.model_json_schema())
    assert body_schema(spec, "/v2/chatterbox-tts") == documented(V2Request.model_json_schema())

    turbo = body_schema(spec, "/v2/chatterbox-turbo")["properties"]
    assert not {"exaggeration", "cfg_weight", "min_p"} & set(turbo)
    assert (turbo["top_k"]["minimum"], turbo["top_k"]["maximum"], turbo["top_k"]["default"]) == (1, 6563, 1000)
    assert (turbo["top_p"]["default"], turbo["temperature"]["default"], turbo["repetition_penalty"]["default"]) \
        == (0.95, 0.8, 1.2)
    assert "webhook_url" in turbo and "webhook_url" not in body_schema(spec, "/v1/chatterbox-turbo")["properties"]
    assert "ignored" in spec["paths"]["/v1/chatterbox-turbo"]["post"]["description"]

    mtl = body_schema(spec, "/v1/chatterbox-multilingual")["properties"]
    assert mtl["language"]["enum"] == list(LANGUAGES) and mtl["language"]["default"] == "en"
    assert mtl["repetition_penalty"]["default"] == 2.0 and "exaggeration" in mtl

    vc = body_schema(spec, "/v1/chatterbox-vc")
    assert vc["required"] == ["source_audio"] and "text" not in vc["properties"]
    assert {"reference_audio", "voice", "seed", "output_format", "speed"} <= set(vc["properties"])


def test_a_model_not_served_is_404_in_the_hosted_shape(tmp_path):
    with start_server(tmp_path, engines=[FakeEngineForTests(), FakeEngineForTests(model="chatterbox-turbo")]) as s:
        for route in ("/v1/chatterbox-vc", "/v2/chatterbox-multilingual", "/v2/nope"):
            r = httpx.post(s.url + route, json={"text": "hi", "source_audio": wav_b64()})
            assert r.status_code == 404, route
            name = route.rsplit("/", 1)[1]
            assert r.json() == {"error": f"model '{name}' not found: this server serves 'chatterbox-tts', "
                                         "'chatterbox-turbo'"}
        paths = httpx.get(s.url + "/openapi.json").json()["paths"]
        assert "/v2/chatterbox-turbo" in paths and "/v2/chatterbox-vc" not in paths


def test_jobs_carry_their_model_and_params_to_that_models_engine(server, client):
    engines = server.extra["engines"]
    bodies = {"chatterbox-tts": {"text": "Original.", "exaggeration": 0.7},
              "chatterbox-turbo": {"text": "Turbo [laugh].", "top_k": 50, "exaggeration": 1.5, "min_p": 0.3},
              "chatterbox-multilingual": {"text": "Guten Tag.", "language": "DE"},
              "chatterbox-vc": {"source_audio": wav_b64(1.0), "seed": 3}}
    ids = {}
    for model, body in bodies.items():
        r = client.post(f"/v2/{model}", json={**body, "output_format": "wav"})
        assert r.status_code == 200, r.text
        ids[model] = r.json()["request_id"]
    for model, rid in ids.items():
        assert poll(client, rid)["status"] == "COMPLETED", model
        job = server.store.get(rid)
        assert job.model == model
        got = [q for q in engines[model].requests if q.request_id == rid]
        assert len(got) == 1, f"{model}'s engine did not run its job"
        for other in MODELS:
            assert other == model or not any(q.request_id == rid for q in engines[other].requests)
    turbo = server.store.get(ids["chatterbox-turbo"]).params
    assert turbo["top_k"] == 50 and not {"exaggeration", "min_p", "cfg_weight"} & set(turbo)    # ignored
    assert [q.params.top_k for q in engines["chatterbox-turbo"].requests if q.request_id == ids["chatterbox-turbo"]] \
        == [50]
    mtl = server.store.get(ids["chatterbox-multilingual"]).params
    assert mtl["language"] == "de" and mtl["repetition_penalty"] == 2.0
    assert [q.language for q in engines["chatterbox-multilingual"].requests] == ["de"]
    vc = server.store.get(ids["chatterbox-vc"]).params
    assert "text" not in vc and vc["source_audio"] and vc["seed"] == 3
    (request,) = [q for q in engines["chatterbox-vc"].requests if q.request_id == ids["chatterbox-vc"]]
    assert request.source is not None and abs(len(request.source.samples) / request.source.sample_rate - 1.0) < 0.01
    assert server.store.get(ids["chatterbox-tts"]).params["exaggeration"] == 0.7


def test_v1_on_each_model_returns_audio(client):
    for model, body in {"chatterbox-turbo": {"text": "Fast."}, "chatterbox-multilingual": {"text": "Hola.",
                        "language": "es"}, "chatterbox-vc": {"source_audio": wav_b64(0.8)}}.items():
        r = client.post(f"/v1/{model}", json={**body, "output_format": "wav"})
        assert r.status_code == 200 and r.headers["content-type"] == "audio/wav", (model, r.text)
        assert len(sf.read(io.BytesIO(r.content))[0]) > 0


def test_multilingual_language_is_validated(client):
    r = client.post("/v2/chatterbox-multilingual", json={"text": "Hallo.", "language": "xx"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error.startswith("parameter 'language'") and all(code in error for code in LANGUAGES)
    r = client.post("/v2/chatterbox-multilingual", json={"text": "Hallo.", "language": 7})
    assert r.status_code == 400 and r.json()["error"].startswith("parameter 'language'")
    # omitted: English
    r = client.post("/v2/chatterbox-multilingual", json={"text": "Hello."})
    assert r.status_code == 200


@pytest.mark.parametrize("top_k", [0, 6564, 1.5, "5"])
def test_turbo_top_k_range_and_type(client, top_k):
    r = client.post("/v2/chatterbox-turbo", json={"text": "Hi.", "top_k": top_k})
    assert r.status_code == 400 and r.json()["error"].startswith("parameter 'top_k'"), r.text


def test_turbo_refuses_a_reference_clip_shorter_than_its_minimum(client):
    r = client.post("/v2/chatterbox-turbo", json={"text": "Hi.", "reference_audio": wav_b64(2.0)})
    assert r.status_code == 400 and r.json()["error"].startswith("reference_audio:"), r.text
    r = client.post("/v2/chatterbox-turbo", json={"text": "Hi.", "reference_audio": wav_b64(6.0)})
    assert r.status_code == 200, r.text
    # the original takes a 2 s clip
    assert client.post("/v2/chatterbox-tts", json={"text": "Hi.", "reference_audio": wav_b64(2.0)}).status_code == 200


def test_voice_conversion_needs_source_audio_with_reference_audio_rules(client):
    for body in ({}, {"text": "Say this."}):
        r = client.post("/v2/chatterbox-vc", json=body)
        assert r.status_code == 400 and "source_audio" in r.json()["error"], r.text
    for url in ("http://127.0.0.1/a.wav", "http://169.254.169.254/latest", "http://[::1]:8080/x.wav",
                "http://0x7f000001/a.wav", "ftp://example.com/a.wav"):
        r = client.post("/v2/chatterbox-vc", json={"source_audio": url})
        assert r.status_code == 400 and r.json()["error"].startswith("source_audio:"), (url, r.text)
    r = client.post("/v2/chatterbox-vc", json={"source_audio": "bm90IGF1ZGlv"})          # "not audio"
    assert r.status_code == 400 and r.json()["error"].startswith("source_audio:"), r.text
    r = client.post("/v2/chatterbox-vc", json={"source_audio": wav_b64(0.2)})            # too short
    assert r.status_code == 400 and r.json()["error"].startswith("source_audio:"), r.text
    r = client.post("/v2/chatterbox-vc", json={"source_audio": wav_b64(), "reference_audio": "http://10.0.0.1/t.wav"})
    assert r.status_code == 400 and r.json()["error"].startswith("reference_audio:"), r.text
    r = client.post("/v1/chatterbox-vc", json={"source_audio": wav_b64(), "stream": True})
    assert r.status_code == 400 and r.json()["error"].startswith("parameter 'stream'"), r.text
    r = client.post("/v2/chatterbox-vc", content=b"", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "source_audio" in r.json()["error"]


def test_a_library_voice_works_on_every_model(server, client):
    clip = base64.b64decode(wav_b64(6.0, 24000))
    r = client.post("/v1/audio/voices", data={"name": "narrator"}, files={"audio_sample": ("me.wav", clip)})
    assert r.status_code in (200, 201), r.text
    engines = server.extra["engines"]
    for model, body in {"chatterbox-tts": {"text": "One."}, "chatterbox-turbo": {"text": "Two."},
                        "chatterbox-multilingual": {"text": "Drei.", "language": "de"},
                        "chatterbox-vc": {"source_audio": wav_b64()}}.items():
        r = client.post(f"/v2/{model}", json={**body, "voice": "narrator"})
        assert r.status_code == 200, r.text
        rid = r.json()["request_id"]
        assert poll(client, rid)["status"] == "COMPLETED", model
        (request,) = [q for q in engines[model].requests if q.request_id == rid]
        # each model got conditionals of its own variant (computed by its engine on first use)
        assert isinstance(request.voice, PreparedVoice) and request.voice.variant == f"fake-{model}", model


def test_a_served_model_without_a_worker_queues(tmp_path):
    with start_server(tmp_path, workers=0, served_models=["chatterbox-tts", "chatterbox-turbo"],
                      sync_timeout=2.0) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        r = c.post("/v2/chatterbox-turbo", json={"text": "Waits."})
        assert r.status_code == 200 and r.json()["status"] == "QUEUED"
        job = s.store.get(r.json()["request_id"])
        assert job.model == "chatterbox-turbo" and job.state.value == "QUEUED"
        r = c.post("/v1/chatterbox-turbo", json={"text": "Waits."})
        assert r.status_code == 502 and "chatterbox-turbo" in r.json()["error"]
        assert c.get("/ready").json()["models"] == ["chatterbox-tts", "chatterbox-turbo"]


def test_voice_conversion_holds_credits_by_its_source_seconds(tmp_path):
    with start_server(tmp_path, workers=0, served_models=["chatterbox-tts", "chatterbox-vc"], accounts=True) as s, \
            httpx.Client(base_url=s.url, timeout=30) as c:
        key, _ = s.accounts.create_key("k", 1000, 0)
        h = {"x-api-key": key}
        r = c.post("/v2/chatterbox-vc", json={"source_audio": wav_b64(4.0)}, headers=h)
        assert r.status_code == 200, r.text
        assert c.get("/v1/account", headers=h).json()["held"] == 6            # 4 s + the 2 s margin, 1 credit/s
        r = c.post("/v2/chatterbox-vc", json={"source_audio": "https://example.com/speech.wav"}, headers=h)
        assert r.status_code == 200, r.text
        assert c.get("/v1/account", headers=h).json()["held"] == 6 + 32       # a URL: the longest source, 30 s


def test_openai_models_and_model_mapping(server, client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == [*MODELS, "tts-1", "tts-1-hd", "gpt-4o-mini-tts"]
    engines = server.extra["engines"]

    def speech(**body):
        return client.post("/v1/audio/speech", json={"input": "Hello there.", "voice": "default",
                                                     "response_format": "wav", **body})
    before = {m: len(e.requests) for m, e in engines.items()}
    assert speech(model="tts-1").status_code == 200
    assert speech(model="chatterbox-turbo", top_k=20, exaggeration=2.0).status_code == 200
    r = speech(model="chatterbox-multilingual", language="fr")
    assert r.status_code == 200, r.text
    grew = {m: len(e.requests) - before[m] for m, e in engines.items()}
    assert grew == {"chatterbox-tts": 1, "chatterbox-turbo": 1, "chatterbox-multilingual": 1, "chatterbox-vc": 0}
    assert engines["chatterbox-turbo"].requests[-1].params.top_k == 20
    assert engines["chatterbox-multilingual"].requests[-1].language == "fr"

    r = speech(model="chatterbox-multilingual", language="xx")
    assert r.status_code == 400 and r.json()["error"]["param"] == "language"
    r = speech(model="chatterbox-vc")
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = speech(model="tts-2")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert client.get("/v1/models/chatterbox-turbo").json()["id"] == "chatterbox-turbo"


def test_openai_aliases_name_the_default_model_and_family_names_only_served_ones(tmp_path):
    engines = [FakeEngineForTests(model="chatterbox-turbo"), FakeEngineForTests()]
    with start_server(tmp_path, engines=engines, batch_wait=0.0) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        body = {"input": "Hi.", "voice": "default", "response_format": "wav"}
        assert c.post("/v1/audio/speech", json={**body, "model": "tts-1"}).status_code == 200
        assert len(engines[0].requests) == 1 and not engines[1].requests      # the default: Turbo here
        r = c.post("/v1/audio/speech", json={**body, "model": "chatterbox-multilingual"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_request_schemas_cover_every_family_model():
    from chatterbox_serverless.engine.catalog import API_MODELS
    assert set(REQUESTS) == set(API_MODELS.values())
