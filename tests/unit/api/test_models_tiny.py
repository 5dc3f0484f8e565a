"""Several real engines behind one API, on tiny random checkpoints (they speak noise, but every stage runs):
the original, Turbo (top_k, tags) and voice conversion (source_audio; the result as long as the source) over
their own routes, and a library voice used on each (every engine computes its own conditionals)."""
from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import soundfile as sf

from chatterbox_serverless.testing import start_server

pipeline = pytest.importorskip("chatterbox_serverless.engine.pipeline")


def wav(seconds: float, rate: int = 24000, freq: float = 180.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), rate, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import torch

    from chatterbox_serverless.engine.vc import load_vc_engine, make_tiny_vc
    torch.set_num_threads(1)
    data = tmp_path_factory.mktemp("models-tiny")
    engines = [pipeline.load_engine("tiny-random", data_dir=data, device="cpu"),
               pipeline.load_engine("tiny-random-turbo", data_dir=data, device="cpu"),
               load_vc_engine(make_tiny_vc(data / "tiny-vc"), device="cpu")]
    with start_server(data, engines=engines, batch_wait=0.02, sync_timeout=120) as srv:
        yield srv


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json={"output_format": "wav", **body}, timeout=180)


def test_turbo_and_the_original_on_their_routes(server):
    r = post(server, "/v1/chatterbox-turbo", {"text": "Oh really? [laugh] Fine.", "top_k": 20, "seed": 3})
    assert r.status_code == 200, r.text
    samples, rate = sf.read(io.BytesIO(r.content))
    assert rate == 24000 and len(samples) > 0 and np.abs(samples).max() > 0
    again = post(server, "/v1/chatterbox-turbo", {"text": "Oh really? [laugh] Fine.", "top_k": 20, "seed": 3})
    assert again.content == r.content                                   # same input and seed, same audio
    assert post(server, "/v1/chatterbox-tts", {"text": "The original."}).status_code == 200


def test_voice_conversion_keeps_the_sources_length(server):
    source = base64.b64encode(wav(1.2, 16000, 140.0)).decode()
    r = post(server, "/v1/chatterbox-vc", {"source_audio": source, "reference_audio":
                                           base64.b64encode(wav(2.0)).decode(), "seed": 1})
    assert r.status_code == 200, r.text
    samples, rate = sf.read(io.BytesIO(r.content))
    assert rate == 24000 and abs(len(samples) / rate - 1.2) < 0.1, len(samples) / rate
    job = server.store.get(r.headers["x-request-id"])
    assert job.model == "chatterbox-vc" and 1.1 < job.metrics["audio_seconds"] < 1.3


def test_a_library_voice_on_every_model(server):
    clip = wav(6.0)               # longer than Turbo's 5 s minimum
    made = httpx.post(server.url + "/v1/audio/voices", data={"name": "narrator"},
                      files={"audio_sample": ("me.wav", clip)}, timeout=180)
    assert made.status_code in (200, 201), made.text
    source = base64.b64encode(wav(1.0, 16000)).decode()
    for path, body in (("/v1/chatterbox-tts", {"text": "Library voice."}),
                       ("/v1/chatterbox-turbo", {"text": "Library voice."}),
                       ("/v1/chatterbox-vc", {"source_audio": source})):
        r = post(server, path, {**body, "voice": "narrator"})
        assert r.status_code == 200, (path, r.text)
        assert len(sf.read(io.BytesIO(r.content))[0]) > 0
