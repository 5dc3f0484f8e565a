"""Perth watermark, reimplemented without librosa/torchaudio, with the weights shipped in resemble-perth."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from chatterbox_serverless.engine.checkpoint import CheckpointError
from chatterbox_serverless.engine.tiny import synthetic_voice
from chatterbox_serverless.engine.watermark import Watermarker, perth_weights_path


@pytest.fixture(scope="module")
def wm() -> Watermarker:
    return Watermarker()


@pytest.mark.parametrize("sr", [24000, 16000])
def test_apply_keeps_length_and_is_detected(wm, sr):
    x = synthetic_voice(sr, 2.0, seed=1)[:int(1.7 * sr) + 17]     # a length that is no multiple of the hop
    y = wm.apply(x, sr)
    assert y.shape == x.shape and y.dtype == np.float32 and np.isfinite(y).all()
    snr_db = 10 * np.log10((x ** 2).sum() / ((x - y) ** 2).sum())
    assert 5 < snr_db < 60                      # changed, but the audio is still the audio
    assert wm.detect(y, sr) > 0.7
    assert wm.detect(x, sr) < 0.3
    assert np.array_equal(wm.apply(x, sr), y)   # deterministic


def test_accepts_float64_and_leaves_tiny_clips_alone(wm):
    x = synthetic_voice(24000, 0.5, seed=2).astype(np.float64)
    assert wm.apply(x, 24000).dtype == np.float32
    short = np.linspace(-0.1, 0.1, 300, dtype=np.float32)
    assert np.array_equal(wm.apply(short, 24000), short)
    with pytest.raises(ValueError, match="mono"):
        wm.apply(np.zeros((2, 4000), np.float32), 24000)


def test_weights_load_strictly(tmp_path):
    ckpt = torch.load(perth_weights_path(), map_location="cpu", weights_only=True)
    model = dict(ckpt["model"])
    del model["encoder.layers.3.conv.bias"]
    model["decoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "perth.pth.tar"
    torch.save({"model": model, "step": 1}, path)
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.3\.conv\.bias.*decoder\.extra\.weight"):
        Watermarker(path)
