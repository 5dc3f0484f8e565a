"""End to end with the real engine: the `tiny-random` checkpoint behind the real server, driven by the SDK and
the `say` command (it speaks noise, but every stage runs: voice cloning, T3, S3Gen, watermark, encoding)."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from chatterbox_serverless.cli import main
from chatterbox_serverless.client import Client
from chatterbox_serverless.engine.pipeline import load_engine
from chatterbox_serverless.testing import start_server


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("tiny")
    engine = load_engine("tiny-random", data_dir=tmp / "models", device="cpu")
    with start_server(tmp, engine=engine, batch_wait=0.01) as s:
        yield s


def test_sdk_and_say_with_the_tiny_random_engine(tiny_server, tmp_path, capsys):
    rate = 16000
    t = np.arange(3 * rate) / rate
    voice = tmp_path / "voice.wav"
    sf.write(str(voice), (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32),
             rate)

    with Client(base_url=tiny_server.url) as c:
        first = c.run_sync("chatterbox-tts", text="Hello there.", seed=5, output_format="wav").content
        again = c.run_sync("chatterbox-tts", text="Hello there.", seed=5, output_format="wav").content
        assert first == again                                   # same input and seed: same audio
        job = c.submit_async("chatterbox-tts", text="Hello there.", reference_audio=voice, output_format="wav")
        result = job.wait(interval=0.05)
        assert result["metrics"]["inference_time"] > 0
        cloned, sr = sf.read(str(job.download(tmp_path / "cloned.wav", result)))
        assert sr == 24000 and len(cloned) > 0

    out = tmp_path / "say.mp3"
    rc = main(["say", "Hello from the command line.", "-o", str(out), "--voice", str(voice), "--seed", "1",
               "--server", tiny_server.url])
    assert rc == 0, capsys.readouterr().err
    audio, sr = sf.read(str(out))
    assert sr == 24000 and len(audio) > 0 and np.isfinite(audio).all()
