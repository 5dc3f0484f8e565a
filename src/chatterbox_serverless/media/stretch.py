"""`speed`: a pitch-preserving time-stretch (the duration divides by `speed`, the voice keeps its pitch).

FFmpeg's `atempo` filter through PyAV (the FFmpeg bindings, already used for AAC): WSOLA-style overlap-add,
made for speech and music, in C. One atempo takes 0.5-100; slower speeds chain two (0.25 = 0.5 x 0.5).
"""
from __future__ import annotations

import numpy as np

from chatterbox_serverless.media import MediaError

MIN_SPEED, MAX_SPEED = 0.25, 4.0


def _tempos(speed: float) -> list[float]:
    """Factors, each within atempo's range, whose product is `speed`."""
    tempos = []
    while speed < 0.5:
        tempos.append(0.5)
        speed /= 0.5
    return tempos + [speed]


def time_stretch(samples: np.ndarray, sample_rate: int, speed: float) -> np.ndarray:
    """`samples` (mono float) played `speed` times faster at the same pitch: about len / speed samples."""
    if not MIN_SPEED <= speed <= MAX_SPEED:
        raise MediaError(f"speed must be between {MIN_SPEED:g} and {MAX_SPEED:g}, got {speed:g}")
    x = np.ascontiguousarray(np.asarray(samples, dtype=np.float32).reshape(-1))
    if speed == 1.0 or len(x) == 0:
        return x
    import av
    import av.filter

    graph = av.filter.Graph()
    node = graph.add_abuffer(format="flt", sample_rate=int(sample_rate), layout="mono",
                             time_base=f"1/{int(sample_rate)}")
    source = node
    for tempo in _tempos(float(speed)):
        nxt = graph.add("atempo", repr(tempo))
        node.link_to(nxt)
        node = nxt
    sink = graph.add("abuffersink")
    node.link_to(sink)
    graph.configure()
    del source
    frame = av.AudioFrame.from_ndarray(x[None, :], format="flt", layout="mono")
    frame.sample_rate = int(sample_rate)
    frame.pts = 0
    graph.push(frame)
    graph.push(None)
    out: list[np.ndarray] = []
    while True:
        try:
            got = graph.pull()
        except (av.error.EOFError, av.error.BlockingIOError):
            break
        out.append(got.to_ndarray().reshape(-1).astype(np.float32, copy=False))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
