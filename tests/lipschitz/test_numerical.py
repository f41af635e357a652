"""Coderivative criterion and numerical modulus: toy values, independent references, matrix-free."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from setsens.lipschitz import (
    STABILITY_RTOL,
    DenseModulus,
    matrix_free_modulus,
    modulus_from_matrices,
    toy_modulus,
)
from setsens.operators import dense_data_jacobian, dense_hessian
from setsens.problem import Problem, squared_error


def _toy():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    y = torch.tensor([2.0, 4.0], dtype=torch.float64)
    net = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)).double()
    return Problem(net, squared_error, (x[:, None], y[:, None]),
                   params=torch.tensor([1.0, 2.0], dtype=torch.float64), reduction="sum")


def test_toy_modulus_exact_and_paper_scale():
    r = toy_modulus()
    assert r["kappa"] == pytest.approx(0.4, abs=1e-6)
    assert r["kappa_times_dx"] == pytest.approx(0.178885, abs=1e-6)
    assert r["aubin_residual"] < 1e-12
    # the paper's printed 0.2 is the 1/|K| = 1/2 scaling of J against the sum-loss Hessian
    assert toy_modulus("paper")["kappa"] == pytest.approx(0.2, abs=1e-6)


def test_toy_matrix_free():
    res = matrix_free_modulus(_toy(), tau=1e-9)
    assert res.kappa == pytest.approx(0.4, abs=1e-6)
    assert res.aubin_residual < 1e-6
    # worst-case direction: Δx ∝ (1, 2) up to sign, and the weight response has norm κ
    d = res.direction.reshape(-1)
    assert abs(float(d @ torch.tensor([1.0, 2.0], dtype=torch.float64))) / 5**0.5 == pytest.approx(1.0, abs=1e-6)
    assert float(res.response.norm()) == pytest.approx(0.4, abs=1e-6)


@pytest.mark.parametrize("tau", [1e-10, 1e-4])
def test_dense_against_numpy_pinv(make_random, tau):
    pb = make_random([4, 6, 3], n=5, seed=7)
    K = [0, 2, 3]
    H = dense_hessian(pb).numpy()
    J = dense_data_jacobian(pb, K).numpy()
    dm = DenseModulus(pb, indices=K)
    for name, sl in [("network", slice(0, pb.p)), *pb.blocks()]:
        Hb, Jb = H[sl, sl], J[sl]
        ref = np.linalg.norm(np.linalg.pinv(Hb, rcond=tau, hermitian=True) @ Jb, 2)
        res = dm.modulus(name, tau=tau)
        assert res.kappa == pytest.approx(ref, rel=1e-8)
        kap, aub = modulus_from_matrices(torch.from_numpy(Hb), torch.from_numpy(Jb), tau)
        assert res.kappa == pytest.approx(kap, rel=1e-8)
        assert res.aubin_residual == pytest.approx(aub, rel=1e-6, abs=1e-12)


def test_worst_direction_attains_and_random_directions_do_not_exceed(make_random):
    pb = make_random([4, 6, 3], n=5, seed=8)
    K = [1, 4]
    H = dense_hessian(pb)
    J = dense_data_jacobian(pb, K)
    tau = 1e-8
    dm = DenseModulus(pb, indices=K)
    res = dm.modulus(tau=tau)
    Hp = torch.linalg.pinv(H, rtol=tau, hermitian=True)
    mu = res.direction.reshape(-1)
    assert float(mu.norm()) == pytest.approx(1.0)
    assert float((Hp @ J @ mu).norm()) == pytest.approx(res.kappa, rel=1e-8)
    assert float(res.response.norm()) == pytest.approx(res.kappa, rel=1e-8)
    # explicit sup over random y in the kept eigenspace: ‖Jᵀy‖/‖Hy‖ never beats κ
    g = torch.Generator().manual_seed(0)
    lam, U = torch.linalg.eigh(H)
    Uk = U[:, lam.abs() > tau * lam.abs().max()]
    Y = Uk @ torch.randn(Uk.shape[1], 2000, generator=g, dtype=torch.float64)
    ratios = (J.T @ Y).norm(dim=0) / (H @ Y).norm(dim=0)
    assert float(ratios.max()) <= res.kappa * (1 + 1e-10)
    # and y = H⁺ z with z = H⁺ J μ* (top left singular vector) attains it: ‖Jᵀ y‖ / ‖H y‖ = κ
    y = Hp @ (Hp @ (J @ mu))
    assert float((J.T @ y).norm() / (H @ y).norm()) == pytest.approx(res.kappa, rel=1e-8)


def test_scale_option(make_random):
    pb = make_random([4, 5, 2], n=6, seed=9)
    K = [0, 3]
    exact = DenseModulus(pb, indices=K).modulus(tau=1e-8, stability=False).kappa
    paper = DenseModulus(pb, indices=K, scale="paper").modulus(tau=1e-8, stability=False).kappa
    assert paper == pytest.approx(exact * pb.n / len(K), rel=1e-10)
    with pytest.raises(ValueError, match="scale"):
        DenseModulus(pb, scale="wrong")


def test_per_point_moduli_match_single_point_sets(make_random):
    pb = make_random([3, 5, 2], n=4, seed=10)
    dm = DenseModulus(pb, per_point=True, tau=1e-8)
    for k in range(pb.n):
        single = DenseModulus(pb, indices=[k], hessian=dm.H)
        for name in dm.blocks:
            assert dm.point_kappa[name][k].item() == pytest.approx(
                single.modulus(name, tau=1e-8, stability=False).kappa, rel=1e-8)


def test_criterion_residual_and_failure():
    H = torch.diag(torch.tensor([2.0, 0.0], dtype=torch.float64))
    eps = 1e-2
    J = torch.tensor([[1.0], [eps]], dtype=torch.float64)
    kappa, res = modulus_from_matrices(H, J, tau=1e-8)
    assert kappa == pytest.approx(0.5)
    assert res == pytest.approx(eps / math.sqrt(1 + eps**2))
    # when the null space is read more generously, the would-be null direction is divided by a tiny λ
    H2 = torch.diag(torch.tensor([2.0, 1e-7], dtype=torch.float64))
    assert modulus_from_matrices(H2, J, tau=1e-8)[0] == pytest.approx(eps / 1e-7)
    assert modulus_from_matrices(H2, J, tau=1e-6)[0] == pytest.approx(0.5)


def test_stability_report_is_consistent(make_interpolating):
    pb = make_interpolating([4, 6, 2], n=3, seed=11)
    dm = DenseModulus(pb)
    for tau in (1e-9, 1e-6, 1e-3):
        res = dm.modulus(tau=tau)
        lo = dm.modulus(tau=tau / 10, stability=False).kappa
        hi = dm.modulus(tau=tau * 10, stability=False).kappa
        change = max(abs(lo - res.kappa), abs(hi - res.kappa)) / res.kappa
        assert res.stability["relative_change"] == pytest.approx(change)
        assert res.ill_determined == (change > STABILITY_RTOL)


@pytest.mark.parametrize("block", ["network", "0.weight"])
def test_matrix_free_matches_dense_tikhonov(make_interpolating, block):
    pb = make_interpolating([4, 6, 2], n=3, seed=12)
    dm = DenseModulus(pb)
    ref = dm.modulus(block, tau=1e-5, filter="tikhonov", stability=False)
    mf = matrix_free_modulus(pb, tau=1e-5, block=block)
    assert mf.kappa == pytest.approx(ref.kappa, rel=1e-5)
    assert mf.aubin_residual == pytest.approx(ref.aubin_residual, rel=0.05, abs=1e-6)
    assert mf.cost["hvp"] > 0 and mf.cost["solves"] > 0


def test_matrix_free_criterion_on_non_stationary_problem(make_random):
    pb = make_random([3, 4, 2], n=2, seed=13)
    dm = DenseModulus(pb)
    ref = dm.modulus(tau=1e-3, filter="tikhonov", stability=False)
    mf = matrix_free_modulus(pb, tau=1e-3)
    assert mf.kappa == pytest.approx(ref.kappa, rel=1e-5)
    assert mf.aubin_residual == pytest.approx(ref.aubin_residual, rel=0.05)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_theorem3_combination_bounds_the_block_modulus_when_given_true_per_point_moduli(make_interpolating, seed):
    """(Σ_k κ_k²)^½ bounds the multi-point modulus when κ_k are the true per-point moduli (triangle
    inequality + Cauchy–Schwarz on the linearised map).  With Theorem 2's closed-form κ it does not
    (the closed form is no bound on κ_k): there it is the paper's heuristic (docs/lipschitz.md)."""
    from setsens.lipschitz import theorem3_modulus

    pb = make_interpolating([3, 6, 2], n=4, seed=seed)
    dm = DenseModulus(pb, per_point=True, tau=1e-8)
    for name in dm.blocks:
        combined = float(theorem3_modulus(torch.as_tensor(dm.point_kappa[name])[:, None])[0])
        assert dm.modulus(name, tau=1e-8, stability=False).kappa <= combined * (1 + 1e-9), name
