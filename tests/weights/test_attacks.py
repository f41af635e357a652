"""ℓ1-ball projection vs an independent reference; attacks stay in the budget set and are exact where known."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq

from problems import weight_net
from setsens.weights.attacks import (
    attacked_robust,
    box_attack,
    box_forward,
    materialize_box_perturbation,
    project_rows_l1,
    random_boundary_perturbation,
    random_perturbation_accuracy,
    weight_attack,
)
from setsens.weights.bounds import relative_budget
from setsens.weights.certify import certify
from setsens.weights.network import forward, forward_perturbed, hidden_states

D = torch.float64
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference_projection(v: np.ndarray, r: float) -> np.ndarray:
    """Soft thresholding at the root θ of Σ max(|v| − θ, 0) = r, found by scipy's brentq (no sorting)."""
    if np.abs(v).sum() <= r:
        return v.copy()
    if r == 0:
        return np.zeros_like(v)
    theta = brentq(lambda t: np.maximum(np.abs(v) - t, 0).sum() - r, 0.0, np.abs(v).max(), xtol=1e-14, rtol=1e-15)
    return np.sign(v) * np.maximum(np.abs(v) - theta, 0)


@settings(max_examples=200, **SETTINGS)
@given(v=st.lists(st.floats(-100, 100), min_size=1, max_size=12), r=st.floats(0, 50))
def test_projection_matches_reference(v, r):
    v = np.array(v)
    p = project_rows_l1(torch.tensor(v, dtype=D)[None], r)[0].numpy()
    np.testing.assert_allclose(p, reference_projection(v, r), atol=1e-9, rtol=1e-9)
    assert np.abs(p).sum() <= r * (1 + 1e-12) + 1e-12


@settings(max_examples=50, **SETTINGS)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 10), r=st.floats(0.01, 5))
def test_projection_variational_inequality(seed, n, r):
    """p = Proj(v) iff ⟨v − p, z − p⟩ ≤ 0 for every z in the ball (checked on the ball's vertices)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(3, n, generator=g, dtype=D) * 3
    p = project_rows_l1(v, r)
    verts = torch.cat([torch.eye(n, dtype=D), -torch.eye(n, dtype=D)]) * r
    assert (((v - p)[:, None, :] * (verts[None] - p[:, None, :])).sum(-1) <= 1e-9).all()
    torch.testing.assert_close(project_rows_l1(p, r), p)  # idempotent


def test_projection_batched_radii_and_errors():
    v = torch.tensor([[[3.0, -2.0], [1.0, 1.0]]], dtype=D)
    p = project_rows_l1(v, torch.tensor([[1.0, 0.0]], dtype=D))
    torch.testing.assert_close(p, torch.tensor([[[1.0, 0.0], [0.0, 0.0]]], dtype=D))
    with pytest.raises(ValueError, match="non-negative"):
        project_rows_l1(v, -1.0)
    with pytest.raises(ValueError, match="NaN"):
        project_rows_l1(v * float("nan"), 1.0)


SIZES = (4, 6, 5, 3)


@pytest.mark.parametrize("kind", ["simplex", "vertex"])
def test_random_boundary_rows_on_sphere(kind):
    W, x, y, g = weight_net(0, SIZES, 8)
    eps = relative_budget(W, 0.1)
    for n in (None, 5):
        deltas = random_boundary_perturbation(W, eps, layers=[0, 2], n=n, kind=kind, generator=g)
        assert deltas[1] is None
        for l in (0, 2):
            torch.testing.assert_close(deltas[l].abs().sum(-1), torch.full(deltas[l].shape[:-1], float(eps[l]), dtype=D))


def test_last_layer_attack_is_exact():
    """Only Wᵈ moves: the worst decrease of m_{yt} is exactly 2 ε_d ‖h^{d-1}‖_∞ (linear in ΔWᵈ)."""
    W, x, y, g = weight_net(0, SIZES, 8)
    t = (y + 1) % 3
    eps = [0.0, 0.0, 0.3]
    exact = 2 * 0.3 * hidden_states(W, x)[-2].abs().amax(1)
    _, c_box = box_attack(W, x, y, t, eps, layers=[2], steps=5, generator=g)
    torch.testing.assert_close(c_box, exact)
    _, c_fw = weight_attack(W, x, y, t, eps, layers=[2], method="fw", steps=3, init="zero", generator=g)
    torch.testing.assert_close(c_fw, exact)
    _, c_pgd = weight_attack(W, x, y, t, eps, layers=[2], method="pgd", steps=60, generator=g)
    assert (c_pgd >= 0.999 * exact).all() and (c_pgd <= exact + 1e-9).all()


def test_box_perturbation_is_a_weight_perturbation_in_the_budget():
    W, x, y, g = weight_net(0, SIZES, 8)
    eps = relative_budget(W, 0.2)
    ts, change = box_attack(W, x, y, (y + 2) % 3, eps, steps=10, generator=g)
    deltas = materialize_box_perturbation(W, ts, x)
    torch.testing.assert_close(forward_perturbed(W, deltas, x), box_forward(W, ts, x))
    for l, dl in enumerate(deltas):
        assert float(dl.abs().sum(-1).max()) <= float(eps[l]) * (1 + 1e-12)
    assert (change >= 0).all()


def test_weight_attack_no_weaker_than_random():
    W, x, y, g = weight_net(3, SIZES, 8)
    eps = relative_budget(W, 0.1)
    t = (y + 1) % 3
    _, c = weight_attack(W, x, y, t, eps, steps=30, generator=g)
    m = forward(W, x)
    m0 = m.gather(1, y[:, None]) - m.gather(1, t[:, None])
    for _ in range(20):
        dl = random_boundary_perturbation(W, eps, n=x.shape[0], generator=g)
        mh = forward_perturbed(W, dl, x)
        cr = (m0 - (mh.gather(1, y[:, None]) - mh.gather(1, t[:, None]))).squeeze(1)
        assert (c >= cr - 1e-9).all()


def test_certified_subset_of_attacked_subset_of_correct():
    W, x, y, g = weight_net(5, (4, 8, 3), 40)
    y = y.clone()
    y[:5] = (y[:5] + 1) % 3  # some clean errors
    for frac in (0.0, 0.01, 0.05, 0.2):
        eps = relative_budget(W, frac)
        cert = certify(W, x, y, eps)
        rob = attacked_robust(W, x, y, eps, steps=10, generator=g)
        correct = forward(W, x).argmax(1) == y
        assert (cert <= rob).all() and (rob <= correct).all()
    accs = random_perturbation_accuracy(W, x, y, relative_budget(W, 0.05), samples=4, generator=g)
    assert accs.shape == (4,) and ((0 <= accs) & (accs <= 1)).all()


def test_attack_rejects_target_equal_label():
    W, x, y, g = weight_net(0, SIZES, 8)
    with pytest.raises(ValueError, match="differ"):
        box_attack(W, x, y, y, [0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="method"):
        weight_attack(W, x, y, (y + 1) % 3, [0.1] * 3, method="sgd")
