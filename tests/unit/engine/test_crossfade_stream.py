"""chunking.CrossfadeStream: crossfade_join done incrementally hands out pieces that concatenate to exactly the
joined audio, whatever the clip lengths (shorter than the fade, empty, one clip), and holds short pieces."""
from __future__ import annotations

import numpy as np
import pytest

from chatterbox_serverless.engine.chunking import CrossfadeStream, crossfade_join

RATE = 24000


@pytest.mark.parametrize("lengths", [[5000], [5000, 7000, 3000], [100, 5000], [5000, 100, 100, 5000],
                                     [0, 5000, 0, 3000, 0], [1199, 1200, 1201, 2400, 50], [3, 2, 1]])
@pytest.mark.parametrize("min_samples", [0, 2000])
def test_pieces_concatenate_to_the_joined_audio(lengths, min_samples):
    rng = np.random.default_rng(sum(lengths))
    clips = [rng.standard_normal(n).astype(np.float32) * 0.3 for n in lengths]
    joiner = CrossfadeStream(RATE, 0.05, min_samples=min_samples)
    pieces = [joiner.push(c, last=i == len(clips) - 1) for i, c in enumerate(clips)]
    pieces.append(joiner.finish())
    whole = crossfade_join(clips, RATE, 0.05)
    assert np.array_equal(np.concatenate(pieces), whole)          # bit for bit
    sent = [p for p in pieces if len(p)]
    assert all(len(p) >= min_samples for p in sent[:-1])         # only the last may be short


def test_a_piece_is_final_once_handed_out_and_the_tail_waits_for_the_next_clip():
    clips = [np.ones(10_000, np.float32), np.full(10_000, -1.0, np.float32)]
    joiner = CrossfadeStream(RATE, 0.05)
    first = joiner.push(clips[0])
    assert len(first) == 10_000 - 1200 and np.all(first == 1.0)  # the crossfaded tail is held back
    second = joiner.push(clips[1], last=True)
    assert len(second) == 1200 + 10_000 - 1200
    assert np.all(np.diff(second[:1200]) < 0)                    # the joined region opens the next piece
    assert len(joiner.finish()) == 0


def test_without_a_last_flag_finish_hands_out_the_tail():
    joiner = CrossfadeStream(RATE, 0.05)
    a = joiner.push(np.ones(5000, np.float32))
    assert len(a) == 3800 and len(joiner.finish()) == 1200
