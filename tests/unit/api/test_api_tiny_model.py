"""End to end with the real engine on the `tiny-random` checkpoint (random weights: it speaks noise, but every
stage of the product runs): v1 and v2 over HTTP, the segmind SDK, same seed -> same bytes."""
from __future__ import annotations

import io

import httpx
import pytest
import soundfile as sf

from chatterbox_serverless.testing import start_server

pipeline = pytest.importorskip("chatterbox_serverless.engine.pipeline")
segmind = pytest.importorskip("segmind")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import torch
    torch.set_num_threads(1)
    data = tmp_path_factory.mktemp("e2e")
    engine = pipeline.load_engine("tiny-random", data_dir=data, device="cpu")
    with start_server(data, engine=engine, batch_wait=0.05) as srv:
        yield srv


def test_v1_speaks_with_the_tiny_model(server):
    body = {"text": "Hello from the tiny model.", "seed": 5, "output_format": "wav"}
    a = httpx.post(server.url + "/v1/chatterbox-tts", json=body, timeout=120)
    assert a.status_code == 200, a.text
    samples, rate = sf.read(io.BytesIO(a.content))
    assert rate == server.engine.sample_rate and len(samples) > rate * 0.1 and abs(samples).max() > 0
    b = httpx.post(server.url + "/v1/chatterbox-tts", json=body, timeout=120)
    assert a.content == b.content


def test_v2_through_the_segmind_sdk(server):
    client = segmind.SegmindClient(api_key="unused", base_url=server.url + "/v1", timeout=120)
    result = client.submit_async("chatterbox-tts", text="Queued, then polled.", output_format="ogg").wait(
        timeout=120, interval=0.1)
    assert result["status"] == "COMPLETED" and result["metrics"]["inference_time"] > 0
    audio = httpx.get(result["output"], timeout=30)
    assert audio.status_code == 200 and sf.info(io.BytesIO(audio.content)).format == "OGG"
