"""training/tally.py: the streaming sums against whole-tensor formulas, on small random tensors."""

from __future__ import annotations

import pytest
import torch

from training.tally import Tally


def test_tally_matches_direct_formulas():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=gen) * 3 + 5           # large mean: a naive sum-of-squares FVU would lose digits
    x_hat = x + 0.3 * torch.randn(300, 8, generator=gen)
    f = torch.relu(torch.randn(300, 16, generator=gen) - 1)
    f[:, 3] = 0                                              # one dead feature
    t = Tally(8, 16)
    for lo in (0, 7, 100, 233):                              # uneven batches
        hi = {0: 7, 7: 100, 100: 233, 233: 300}[lo]
        t.add_reconstruction(x[lo:hi], x_hat[lo:hi], f[lo:hi])
    s = t.stats(0.0, 1, 8)
    xd, xhd = x.double(), x_hat.double()
    assert s.mse == pytest.approx(float(((xd - xhd) ** 2).mean()), rel=1e-9)
    assert s.l1 == pytest.approx(float(f.double().abs().sum(1).mean()), rel=1e-9)
    assert s.l0 == pytest.approx(float((f > 0).double().sum(1).mean()), rel=1e-9)
    fvu = ((xd - xhd) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum()
    assert s.fvu == pytest.approx(float(fvu), rel=1e-9)
    assert s.variance_explained == pytest.approx(1 - float(fvu), rel=1e-9)
    assert s.frac_alive == pytest.approx(15 / 16)
    assert s.density["dead"] == 1
    assert s.tokens == 300


def test_l0_and_frac_alive_on_hand_built_features():
    f = torch.zeros(4, 6)
    f[0, [0, 1]] = 1.0          # 2 active
    f[1, [0]] = 2.0             # 1 active
    f[2, [0, 1, 4]] = 0.5       # 3 active
    f[3, 5] = -1.0              # negative: not active (f > 0), but counts in L1
    t = Tally(2, 6)
    t.add_reconstruction(torch.zeros(4, 2), torch.zeros(4, 2), f)
    s = t.stats(0.0, 1, 2)
    assert s.l0 == pytest.approx(6 / 4)
    assert s.frac_alive == pytest.approx(3 / 6)              # features 0, 1, 4; 5 is never positive
    assert s.l1 == pytest.approx((2 + 2 + 1.5 + 1) / 4)
    assert (t.fired / t.tokens).tolist() == [0.75, 0.5, 0.0, 0.0, 0.25, 0.0]
