"""The SDK's voice library (`create_voice`, `list_voices`, `delete_voice`, `voice=`), the `voices` command and
`say --voice NAME`, against the real app (engine double, auth off): a library voice is heard (the double's tone
moves by 50 Hz with a voice)."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import soundfile as sf

from chatterbox_serverless.cli import main
from chatterbox_serverless.client import Client, ParameterError
from chatterbox_serverless.testing import FakeEngineForTests, start_server


def tone_hz(data: bytes) -> float:
    x, rate = sf.read(io.BytesIO(data), dtype="float32")
    return float(np.argmax(np.abs(np.fft.rfft(x))) * rate / len(x))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with start_server(tmp_path_factory.mktemp("cv"), engine=FakeEngineForTests(), batch_wait=0.0) as srv:
        yield srv


@pytest.fixture
def sample(tmp_path):
    path = tmp_path / "me.wav"
    sf.write(path, (0.3 * np.sin(np.arange(24000) / 5)).astype(np.float32), 24000)
    return path


def test_sdk_voice_library_and_voice_parameter(server, sample):
    with Client(base_url=server.url, sync_timeout=30) as c:
        made = c.create_voice("sdk-voice", sample)
        assert made["name"] == "sdk-voice" and made["id"].startswith("voice_")
        assert [v["name"] for v in c.list_voices()] == ["sdk-voice"]
        assert c.get_voice("sdk-voice")["id"] == made["id"]
        plain = c.run_sync("chatterbox-tts", text="hi", output_format="wav").content
        voiced = c.run_sync("chatterbox-tts", text="hi", output_format="wav", voice="sdk-voice").content
        assert tone_hz(voiced) == pytest.approx(tone_hz(plain) + 50, abs=5)
        slow = c.run_sync("chatterbox-tts", text="hi", output_format="wav", speed=0.5).content
        assert sf.info(io.BytesIO(slow)).duration == pytest.approx(2 * sf.info(io.BytesIO(plain)).duration, rel=0.1)
        with pytest.raises(ParameterError, match="not both"):
            c.run_sync("chatterbox-tts", text="hi", voice="sdk-voice", reference_audio=sample)
        with pytest.raises(ParameterError, match="speed"):
            c.run_sync("chatterbox-tts", text="hi", speed=10)
        assert c.delete_voice(made["id"])["deleted"] is True
        assert c.list_voices() == []


def test_voices_command_and_say_voice_name(server, sample, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CHATTERBOX_API_URL", server.url)
    monkeypatch.chdir(tmp_path)
    assert main(["voices", "create", "narrator", str(sample)]) == 0
    voice_id = capsys.readouterr().out.split()[0]
    assert voice_id.startswith("voice_")
    assert main(["voices", "list"]) == 0
    assert "narrator" in capsys.readouterr().out
    assert main(["say", "hello", "-o", "plain.wav", "-q"]) == 0
    assert main(["say", "hello", "-o", "named.wav", "-q", "--voice", "narrator"]) == 0
    assert tone_hz((tmp_path / "named.wav").read_bytes()) == pytest.approx(
        tone_hz((tmp_path / "plain.wav").read_bytes()) + 50, abs=5)
    assert main(["say", "hello", "-o", "x.wav", "-q", "--voice", "nobody"]) == 1
    assert "no voice 'nobody'" in capsys.readouterr().err
    assert main(["voices", "delete", "narrator"]) == 0
    assert f"deleted {voice_id}" in capsys.readouterr().out
    assert main(["voices", "delete", "narrator"]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["voices", "create", "x", str(tmp_path / "missing.wav")]) == 2
    assert not os.path.exists(tmp_path / "x.wav")
