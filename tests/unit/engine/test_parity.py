"""The parity command's comparisons (the full run needs the 3 GB reference dumps of shared/reference)."""
import torch

from chatterbox_serverless.engine.parity import REL_TOL, compare, compare_cut_distribution


def test_compare_is_relative_to_the_largest_value_and_exact_for_ids():
    ref = torch.tensor([0.5, -2.0, 1.0])
    assert compare(ref + 1e-5, ref)[2]
    assert not compare(ref + 1e-3, ref)[2]
    assert not compare(ref[:2], ref)[2]
    assert compare(torch.tensor([1, 2]), torch.tensor([1, 2]))[2]
    assert not compare(torch.tensor([1, 3]), torch.tensor([1, 2]))[2]


def _cut(p: torch.Tensor, min_p: float) -> torch.Tensor:
    kept = torch.where(p >= min_p * p.max(dim=-1, keepdim=True).values, p, torch.zeros(()))
    return kept / kept.sum(dim=-1, keepdim=True)


def test_a_token_at_the_min_p_cutoff_may_be_kept_by_one_side_only():
    min_p = 0.05
    p = torch.tensor([[0.5, 0.3, 0.05 * 0.5, 0.01, 0.165], [0.4, 0.4, 0.1, 0.05, 0.05]], dtype=torch.float64)
    theirs = _cut(p, min_p)                                   # keeps token 2 of step 0 (exactly at the cutoff)
    nudged = p.clone()
    nudged[0, 2] *= 1 - REL_TOL / 10                          # ours: a hair below, dropped
    ours = _cut(nudged, min_p)
    assert ours[0, 2] == 0 and theirs[0, 2] > 0
    diff, rel, ok, at_cut = compare_cut_distribution(ours, theirs, min_p)
    assert ok and at_cut == [(0, 2)] and rel < 1e-12
    # a token well above the cutoff dropped by one side is a real difference
    wrong = ours.clone()
    wrong[0, 1] = 0
    assert not compare_cut_distribution(wrong, theirs, min_p)[2]
    # and so is a difference in the kept probabilities
    assert not compare_cut_distribution(_cut(p * torch.tensor([1, 1.01, 1, 1, 1]), min_p), theirs, min_p)[2]
