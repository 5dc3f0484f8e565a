"""The public `segmind` SDK (PyPI), unchanged, pointed at this server: only the base URL differs."""
from __future__ import annotations

import io

import httpx
import pytest
import soundfile as sf

from chatterbox_serverless.testing import FakeEngineForTests, ServerWithKeys, start_server

segmind = pytest.importorskip("segmind")
from segmind.exceptions import SegmindError  # noqa: E402
from segmind.v2 import InferenceFailed  # noqa: E402

SLUG = "chatterbox-tts"


@pytest.fixture(scope="module")
def sdk(tmp_path_factory):
    with start_server(tmp_path_factory.mktemp("sdk"), engine=FakeEngineForTests(), batch_wait=0.0) as srv:
        client = segmind.SegmindClient(api_key="unused-when-auth-is-off", base_url=srv.url + "/v1")
        yield client


def test_run_sync_returns_audio_bytes(sdk):
    r = sdk.run_sync(SLUG, text="Hello from the SDK.", output_format="wav")
    assert r.headers["content-type"] == "audio/wav"
    assert sf.info(io.BytesIO(r.content)).duration > 0.1


def test_run_waits_for_the_v2_job(sdk):
    body = sdk.run(SLUG, text="Queued through v2.", exaggeration=0.7, cfg_weight=0.3, seed=11)
    assert body["status"] == "COMPLETED"
    assert body["metrics"]["inference_time"] >= 0
    audio = httpx.get(body["output"])
    assert audio.status_code == 200 and audio.headers["content-type"] == "audio/mpeg"


def test_submit_async_then_wait(sdk):
    job = sdk.submit_async(SLUG, text="Handle and wait.", output_format="flac")
    assert job.status()["status"] in ("QUEUED", "PROCESSING", "COMPLETED")
    result = job.wait(timeout=30, interval=0.05)
    assert result["request_id"] == job.request_id and result["output"].split("?")[0].endswith(".flac")


def test_inference_failed_carries_the_servers_reason(sdk):
    job = sdk.submit_async(SLUG, text="FAIL-ME please")
    with pytest.raises(InferenceFailed) as e:
        job.wait(timeout=30, interval=0.05)
    assert e.value.detail == "fake engine: this text cannot be spoken"
    with pytest.raises(InferenceFailed):
        sdk.run(SLUG, text="FAIL-ME too")


def test_sdk_errors_carry_the_servers_message(sdk):
    with pytest.raises(SegmindError) as e:
        sdk.run_sync(SLUG, text="hi", temperature=5)
    assert e.value.status == 400 and "'temperature'" in e.value.detail
    with pytest.raises(SegmindError) as e:
        sdk.submit_async("some-other-model", text="hi")
    assert e.value.status == 404 and "not found" in e.value.detail


def test_segmind_sdk_with_keys(tmp_path):
    """The hosted API's own SDK, unchanged: its api_key is our key; errors surface as the SDK's exceptions."""
    with ServerWithKeys(tmp_path / "data") as server:
        key = server.key(credits=100)
        client = segmind.SegmindClient(api_key=key, base_url=server.url + "/v1")
        body = client.run("chatterbox-tts", text="x" * 40, output_format="wav")
        assert body["status"] == "COMPLETED"
        assert server.settled(key)["balance"] == 98
        for bad_key, status in (("cbx_wrong", 401), (server.key(credits=0), 406)):
            with pytest.raises(SegmindError) as e:
                segmind.SegmindClient(api_key=bad_key, base_url=server.url + "/v1").run("chatterbox-tts",
                                                                                          text="x" * 40)
            assert e.value.status == status and e.value.detail
