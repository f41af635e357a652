"""Theorem 4: the formula by hand, the ramp loss and the surrogate's relation to certificates."""

import math

import pytest
import torch

from setsens.weights.bounds import relative_budget
from setsens.weights.certify import certify
from setsens.weights.generalization import ramp, rademacher_bound, robust_surrogate_loss, theorem4_bound
from setsens.weights.network import forward

D = torch.float64


def test_rademacher_formula_by_hand():
    M, e, B, n, n0, K, gamma = [2.0, 3.0, 0.5], [0.1, 0.2, 0.05], 1.5, 100, 64, 4, 0.7
    c = K * (K - 1) / gamma
    Pbar, Pbar_e = 2 * 3, 2.1 * 3.2
    t1 = c * 8 * (2 * 3 * 0.5) * B * math.sqrt(2 * math.log(128) / n)
    t2 = c * (0.5 * (Pbar_e - Pbar) + 0.05 * Pbar_e) * B / math.sqrt(n)
    r = rademacher_bound(M, e, B, n, n0, K, gamma)
    assert math.isclose(r["complexity_term"], t1, rel_tol=1e-12)
    assert math.isclose(r["perturbation_term"], t2, rel_tol=1e-12)
    assert math.isclose(r["rademacher"], t1 + t2, rel_tol=1e-12)
    with pytest.raises(ValueError):
        rademacher_bound(M, e, B, 0, n0, K, gamma)


def test_ramp():
    t = torch.tensor([-1.0, 0.0, 0.25, 1.0, 3.0])
    torch.testing.assert_close(ramp(t, 1.0), torch.tensor([1.0, 1.0, 0.75, 0.0, 0.0]))
    with pytest.raises(ValueError):
        ramp(t, 0.0)


def test_surrogate_upper_bounds_uncertified_indicator_and_bound_terms():
    g = torch.Generator().manual_seed(0)
    W = [torch.randn(6, 4, generator=g, dtype=D), torch.randn(3, 6, generator=g, dtype=D)]
    x = torch.rand(50, 4, generator=g, dtype=D)
    y = torch.randint(0, 3, (50,), generator=g)
    eps = relative_budget(W, 0.02)
    loss = robust_surrogate_loss(W, x, y, eps, gamma=0.5)
    assert (loss >= (~certify(W, x, y, eps)).to(D)).all()
    res = theorem4_bound(W, x, y, eps, gamma=0.5, delta=0.1)
    assert math.isclose(res["bound"], res["empirical_surrogate_loss"] + 2 * res["rademacher"]
                        + 3 * math.sqrt(math.log(20) / 100), rel_tol=1e-12)
    # a larger budget can only raise the empirical term and the perturbation term
    res2 = theorem4_bound(W, x, y, relative_budget(W, 0.1), gamma=0.5, delta=0.1)
    assert res2["empirical_surrogate_loss"] >= res["empirical_surrogate_loss"]
    assert res2["perturbation_term"] > res["perturbation_term"]
    assert math.isclose(res2["complexity_term"], res["complexity_term"])
    with pytest.raises(ValueError, match="delta"):
        theorem4_bound(W, x, y, eps, gamma=0.5, delta=1.5)
    assert forward(W, x).shape == (50, 3)
