"""With the real engine (tiny-random checkpoint): a library voice speaks exactly as the same clip passed as
reference_audio with the same seed, from the OpenAI route and the hosted one; another clip gives other audio."""
from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import soundfile as sf

from chatterbox_serverless.testing import start_server

pipeline = pytest.importorskip("chatterbox_serverless.engine.pipeline")


def clip(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    sf.write(buf, (0.2 * rng.standard_normal(24000 * 2)).astype(np.float32), 22050, format="FLAC")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import torch
    torch.set_num_threads(1)
    data = tmp_path_factory.mktemp("tiny-voices")
    engine = pipeline.load_engine("tiny-random", data_dir=data, device="cpu")
    with start_server(data, engine=engine, batch_wait=0.0) as srv:
        yield srv


def test_a_library_voice_speaks_as_its_clip_as_reference_audio(server):
    sample = clip(1)
    made = httpx.post(server.url + "/v1/audio/voices", files={"audio_sample": ("v.flac", sample, "audio/flac")},
                      data={"name": "tiny"}, timeout=120)
    assert made.status_code == 200, made.text
    body = {"text": "Same voice, two ways.", "seed": 11, "output_format": "wav"}
    as_reference = httpx.post(server.url + "/v1/chatterbox-tts", timeout=120, json={
        **body, "reference_audio": "data:audio/flac;base64," + base64.b64encode(sample).decode()})
    by_name = httpx.post(server.url + "/v1/chatterbox-tts", json={**body, "voice": "tiny"}, timeout=120)
    openai_route = httpx.post(server.url + "/v1/audio/speech", timeout=120, json={
        "model": "tts-1", "input": body["text"], "voice": {"id": made.json()["id"]}, "response_format": "wav",
        "seed": 11})
    for r in (as_reference, by_name, openai_route):
        assert r.status_code == 200, r.text
    assert by_name.content == as_reference.content
    a = sf.read(io.BytesIO(as_reference.content))[0]
    b = sf.read(io.BytesIO(openai_route.content))[0]     # streamed in windows: the same tokens, so the same length
    assert len(a) == len(b) and not np.array_equal(b, np.zeros_like(b))
    other = httpx.post(server.url + "/v1/chatterbox-tts", timeout=120, json={
        **body, "reference_audio": base64.b64encode(clip(2)).decode()})
    assert other.status_code == 200 and other.content != by_name.content
    builtin = httpx.post(server.url + "/v1/chatterbox-tts", json=body, timeout=120)
    assert builtin.content != by_name.content


def test_a_clip_the_model_cannot_use_is_refused_at_creation(server):
    buf = io.BytesIO()
    sf.write(buf, np.zeros(24000, dtype=np.float32), 24000, format="WAV")
    r = httpx.post(server.url + "/v1/audio/voices", files={"audio_sample": ("s.wav", buf.getvalue())},
                   data={"name": "silent"}, timeout=60)
    assert r.status_code == 400 and "silent" in r.json()["error"]["message"]
