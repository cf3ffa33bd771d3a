import itertools
import math

import numpy as np
import pytest
import torch

from evatok.assignment import (AssignmentSpace, RewardStats, best_assignment, estimate_stats, reward,
                               reward_percentile)


def test_space_order_roundtrip_and_totals():
    sp = AssignmentSpace()
    assert sp.size == len(sp) == 625 and sp.table.shape == (625, 4)
    # block 1 most significant, level 0 = fewest tokens: itertools.product gives exactly that order
    expect = list(itertools.product((8, 16, 32, 64, 128), repeat=4))
    assert [tuple(r) for r in sp.table.tolist()] == expect
    assert sp.index((8, 8, 8, 8)) == 0 and sp.index((128, 128, 128, 128)) == 624
    assert sp.index((16, 8, 8, 8)) == 125 and sp.index((8, 8, 8, 16)) == 1
    assert torch.equal(sp.index(sp.table), torch.arange(625))
    assert torch.equal(sp.counts(torch.tensor([3, 600])), sp.table[[3, 600]])
    assert sp.totals[sp.index((64, 32, 8, 128))] == 232
    assert sp.uniform_index(32) == sp.index((32,) * 4) == 2 * (125 + 25 + 5 + 1)
    # the 5 children of a prefix are contiguous
    kids = sp.table[sp.index((16, 64, 8, 8)):][:5]
    assert (kids[:, :3] == torch.tensor([16, 64, 8])).all() and kids[:, 3].tolist() == [8, 16, 32, 64, 128]


def test_training_samples_share_a_total_and_each_row_is_uniform_over_the_space():
    """``AssignmentSpace.sample``: the rows of a batch have one total (no padding), yet each row, across
    batches, is uniform over all 625 assignments (chi-square over 62,500 draws: 624 degrees of freedom,
    bound at ~5 sigma), the rows of a batch are not all the same, and a seeded generator repeats."""
    sp = AssignmentSpace()
    g = torch.Generator().manual_seed(0)
    batches = [sp.sample(8, g) for _ in range(62_500 // 4)]
    assert all(len(set(b.sum(1).tolist())) == 1 for b in batches)
    assert sum(len({tuple(r) for r in b.tolist()}) > 1 for b in batches) > 0.8 * len(batches)
    for row in (0, 5):
        freq = torch.bincount(sp.index(torch.stack([b[row] for b in batches])), minlength=625).double()
        expect = freq.sum() / 625
        chi2 = float(((freq - expect) ** 2 / expect).sum())
        assert chi2 < 624 + 5 * math.sqrt(2 * 624), chi2
    assert torch.equal(sp.sample(8, torch.Generator().manual_seed(3)), sp.sample(8, torch.Generator().manual_seed(3)))
    iid = sp.sample(4096, torch.Generator().manual_seed(1), equal_total=False)
    assert len(set(iid.sum(1).tolist())) > 20 and sp.index(iid).unique().numel() > 600


def test_space_errors():
    sp = AssignmentSpace((32, 64, 128, 256, 512))
    with pytest.raises(ValueError, match="not among the candidates"):
        sp.index((32, 64, 100, 32))
    with pytest.raises(ValueError, match="4 block counts"):
        sp.index((32, 64))
    with pytest.raises(IndexError):
        sp.counts(625)
    with pytest.raises(ValueError):
        AssignmentSpace((64, 32))


def test_reward_hand_computed():
    stats = RewardStats(mu_d=0.2, sigma_d=0.1, mu_L=100.0, sigma_L=50.0)
    d = torch.tensor([[0.1, 0.3]])
    totals = torch.tensor([150, 50])
    # a: Q = -(0.1-0.2)/0.1 = 1, L = 1 -> 1.2*1 - 0.8*1 = 0.4 ; b: Q = -1, L = -1 -> -1.2 + 0.8 = -0.4
    r = reward(d, totals, stats, w_q=1.2, w_l=0.8)
    assert torch.allclose(r, torch.tensor([[0.4, -0.4]]))
    # higher-is-better metric flips the sign of Q only
    up = RewardStats(0.2, 0.1, 100.0, 50.0, higher_is_better=True)
    assert torch.allclose(reward(d, totals, up), torch.tensor([[-2.0, 2.0]]))
    # numpy in, numpy out
    rn = reward(d.numpy(), totals.numpy(), stats)
    assert isinstance(rn, np.ndarray) and np.allclose(rn, [[0.4, -0.4]])
    assert best_assignment(d, totals, stats).tolist() == [0]
    assert best_assignment(d, totals, stats, w_q=0.1, w_l=1.9).tolist() == [1]  # length dominates
    assert isinstance(best_assignment(d.numpy(), totals.numpy(), stats), np.ndarray)


def test_estimate_stats_matches_sampled_pairs():
    g = torch.Generator().manual_seed(1)
    d = torch.rand(7, 625, generator=g)
    totals = AssignmentSpace().totals
    s = estimate_stats(d, totals, n_samples=200_000, seed=3, metric="psnr")
    assert s.higher_is_better is True
    assert math.isclose(s.mu_d, float(d.mean()), abs_tol=3e-3)
    assert math.isclose(s.sigma_d, float(d.std()), abs_tol=3e-3)
    assert math.isclose(s.mu_L, float(totals.double().mean()), rel_tol=1e-2)
    assert math.isclose(s.sigma_L, float(totals.double().std()), rel_tol=1e-2)
    # paper-scale: uniform over the 625 gives 793.6 / 349.1 (population std)
    t = AssignmentSpace((32, 64, 128, 256, 512)).totals.double()
    assert round(float(t.mean()), 1) == 793.6 and round(float(t.std(unbiased=False)), 1) == 349.1
    assert estimate_stats(d.numpy(), totals.numpy(), 100, seed=3) == estimate_stats(d, totals, 100, seed=3)
    with pytest.raises(KeyError):
        estimate_stats(d, totals, 10, metric="fvd")


def test_reward_percentile_hand_computed():
    r = torch.tensor([[0.0, 1.0, 4.0], [2.0, 3.0, 6.0]])  # best mean 5, worst mean 1
    assert reward_percentile(r, torch.tensor([2, 2])) == 100.0
    assert reward_percentile(r, torch.tensor([0, 0])) == 0.0
    # chosen mean (1 + 3) / 2 = 2 -> (2 - 1) / (5 - 1) = 25%
    assert math.isclose(reward_percentile(r, torch.tensor([1, 1])), 25.0)
    assert math.isclose(reward_percentile(r.numpy(), np.array([1, 1])), 25.0)
    assert math.isclose(reward_percentile(r, 1), 25.0)
    with pytest.raises(ValueError, match="undefined"):
        reward_percentile(torch.ones(2, 3), torch.tensor([0, 1]))
