"""The SDK and the `say` command against the real server (uvicorn on loopback, FakeEngineForTests)."""
from __future__ import annotations

import asyncio
import io
import time

import numpy as np
import pytest
import soundfile as sf

import chatterbox_serverless.client as cbc
from chatterbox_serverless.cli import main
from chatterbox_serverless.client import (AsyncClient, ChatterboxError, Client, InferenceFailed, InferenceTimeout,
                                          ParameterError)
from chatterbox_serverless.testing import FakeEngineForTests, start_server


@pytest.fixture
def server(tmp_path):
    with start_server(tmp_path, engine=FakeEngineForTests(), batch_wait=0.01) as s:
        yield s


def voice_file(path, seconds: float = 1.0, rate: int = 16000):
    t = np.arange(int(seconds * rate)) / rate
    sf.write(str(path), (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate)
    return path


def test_the_hosted_sdk_snippet_with_only_the_import_changed(server, monkeypatch, tmp_path):
    monkeypatch.setenv("CHATTERBOX_API_URL", server.url)
    monkeypatch.setattr(cbc, "_default_client", None)
    from chatterbox_serverless import client as segmind
    from chatterbox_serverless.client import SegmindClient

    result = segmind.run("chatterbox-tts", text="Hello from the snippet.", exaggeration=0.5, temperature=0.8,
                         seed=42, cfg_weight=0.5, min_p=0.05, top_p=1, repetition_penalty=1.2)
    print(result["status"]); print(result.get("output")); print(result["metrics"]["inference_time"])  # noqa: E702
    assert result["status"] == "COMPLETED" and result["output"].startswith(server.url)
    assert result["metrics"]["inference_time"] >= 0

    payload = {"text": "Hello again.", "seed": 7, "output_format": "wav"}
    client = SegmindClient()
    job = client.submit_async("chatterbox-tts", **payload)
    done = job.wait(timeout=600, interval=1.0)
    assert done["request_id"] == job.request_id and job.status()["status"] == "COMPLETED"
    audio, rate = sf.read(str(job.download(tmp_path / "again.wav", done)))
    assert rate == 24000 and len(audio) > 0

    response = segmind.run_sync("chatterbox-tts", text="Hello, synchronously.", output_format="flac")
    assert response.headers["content-type"] == "audio/flac"
    assert sf.read(io.BytesIO(response.content))[1] == 24000


def test_failure_carries_the_servers_reason(server):
    with Client(base_url=server.url) as c:
        job = c.submit_async("chatterbox-tts", text="please FAIL-ME")
        with pytest.raises(InferenceFailed) as e:
            job.wait(interval=0.02)
        assert "cannot be spoken" in e.value.detail and e.value.request_id == job.request_id
        with pytest.raises(InferenceFailed, match="cannot be spoken") as e:
            c.run_sync("chatterbox-tts", text="FAIL-ME too")
        assert e.value.status == 422


def test_timeouts_name_the_request_which_can_be_picked_up_later(tmp_path):
    with start_server(tmp_path, engine=FakeEngineForTests(delay=0.6), batch_wait=0.01, sync_timeout=0.2) as s:
        with Client(base_url=s.url) as c:
            job = c.submit_async("chatterbox-tts", text="Slow one.")
            start = time.monotonic()
            with pytest.raises(InferenceTimeout) as e:
                job.wait(timeout=0.1, interval=0.02)
            assert e.value.request_id == job.request_id and time.monotonic() - start < 0.5
            assert c.job(e.value.request_id).wait(interval=0.05)["status"] == "COMPLETED"

            with pytest.raises(InferenceTimeout) as e:         # /v1 answers 504 with the id; the job goes on
                c.run_sync("chatterbox-tts", text="Slow sync one.")
            assert e.value.status == 504
            assert c.job(e.value.request_id).wait(interval=0.05)["status"] == "COMPLETED"


def test_server_side_refusals_are_clear_errors(server):
    with Client(base_url=server.url) as c:
        with pytest.raises(ChatterboxError) as e:
            c.submit_async("chatterbox-tts", text="x" * 6000)
        assert e.value.status == 400 and "text" in e.value.detail
        with pytest.raises(ChatterboxError) as e:
            c.run("other-model", text="Hi.")
        assert e.value.status == 404 and "not found" in e.value.detail
        with pytest.raises(ChatterboxError) as e:
            c.job("00000000-0000-0000-0000-000000000000").status()
        assert e.value.status == 404
        with pytest.raises(ParameterError):
            c.run("chatterbox-tts", text="Hi.", top_p=1.5)


def test_api_key_from_the_environment_and_clear_account_errors(tmp_path, monkeypatch):
    from chatterbox_serverless.accounts import open_account_store
    from chatterbox_serverless.accounts.service import Accounts, Pricing

    accounts = Accounts(open_account_store(tmp_path / "data"), Pricing(credits_per_second=1.0, minimum=1))
    key, _ = accounts.create_key("sdk", 1000, 0, False)
    poor, _ = accounts.create_key("poor", 0, 0, False)
    try:
        with start_server(tmp_path, engine=FakeEngineForTests(), batch_wait=0.01,
                          accounts=accounts) as s:
            monkeypatch.delenv("CHATTERBOX_API_KEY", raising=False)
            monkeypatch.setenv("SEGMIND_API_KEY", key)             # the hosted SDK's variable works too
            with Client(base_url=s.url) as c:
                assert c.submit_async("chatterbox-tts", text="Hi.").wait(interval=0.02)["status"] == "COMPLETED"
            for wrong, status in ((None, 401), ("not-a-key", 401), (poor, 406)):
                monkeypatch.delenv("SEGMIND_API_KEY")
                with Client(base_url=s.url, api_key=wrong) as c, pytest.raises(ChatterboxError) as e:
                    c.submit_async("chatterbox-tts", text="Hi.")
                assert e.value.status == status and e.value.detail
                monkeypatch.setenv("SEGMIND_API_KEY", key)
    finally:
        accounts.store.close()


def test_async_client_against_the_server(server, tmp_path):
    async def go():
        async with AsyncClient(base_url=server.url) as c:
            jobs = [await c.submit_async("chatterbox-tts", text=f"Line {i}.", seed=i, output_format="wav")
                    for i in range(4)]
            seen: list[str] = []
            results = await asyncio.gather(*(j.wait(interval=0.02, on_progress=lambda p: seen.append(p.status))
                                             for j in jobs))
            assert [r["request_id"] for r in results] == [j.request_id for j in jobs]
            assert seen.count("COMPLETED") == 4
            path = await jobs[0].download(tmp_path / "a.wav", results[0])
            assert sf.info(str(path)).samplerate == 24000
            failing = await c.submit_async("chatterbox-tts", text="FAIL-ME")
            with pytest.raises(InferenceFailed, match="cannot be spoken"):
                await failing.wait(interval=0.02)
            assert (await c.run_sync("chatterbox-tts", text="Sync.")).headers["content-type"] == "audio/mpeg"

    asyncio.run(go())


def test_say_writes_a_playable_file(server, tmp_path, capsys):
    out = tmp_path / "hello.mp3"
    voice = voice_file(tmp_path / "me.wav")
    rc = main(["say", "Hello from the command line.", "-o", str(out), "--voice", str(voice), "--seed", "3",
               "--server", server.url])
    err = capsys.readouterr().err
    assert rc == 0, err
    audio, rate = sf.read(str(out))
    assert rate == 24000 and len(audio) > 0.1 * rate and np.abs(audio).max() > 0.05
    assert f"wrote {out}" in err


def test_say_a_long_file_in_pieces(server, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("\n\n".join(f"Paragraph number {i}. It is short." for i in range(5)))
    out = tmp_path / "long.ogg"
    rc = main(["say", "--file", str(tmp_path / "in.txt"), "-o", str(out), "--max-chars", "70", "-q",
               "--server", server.url])
    assert rc == 0, capsys.readouterr().err
    audio, rate = sf.read(str(out))
    assert rate == 24000 and len(audio) > 5 * 0.3 * rate


def test_say_reports_a_failure(server, tmp_path, capsys):
    rc = main(["say", "FAIL-ME", "-o", str(tmp_path / "x.wav"), "-q", "--server", server.url])
    assert rc == 1 and "cannot be spoken" in capsys.readouterr().err
    assert not (tmp_path / "x.wav").exists()
