"""The cheap predictions at w̄: the Gauss–Newton matrix against its dense form, the linearised-training filter
against the recurrence run with the dense matrix, the proximal prediction against a dense solve and against the
proximal Bregman response it predicts."""

import pytest
import torch

from setsens.filters import ggn_filter, momentum_filter, proximal_prediction
from setsens.finetune import Training
from setsens.operators import DataJacobian, GaussNewtonMatrix, dense_data_jacobian, dense_gauss_newton
from setsens.perturb import gradient_perturbation
from setsens.retrain import pbrf_response, proximal_response
from problems import smooth_mlp as smooth


@pytest.mark.parametrize("loss", ["ce", "se"])
def test_the_gauss_newton_matrix_equals_its_dense_form(loss):
    problem, _ = smooth(loss=loss)
    dense = dense_gauss_newton(problem)
    v = torch.randn(problem.p, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(GaussNewtonMatrix(problem) @ v, dense @ v, rtol=1e-10, atol=1e-12)
    assert float(torch.linalg.eigvalsh(dense).min()) > -1e-12  # PSD, unlike the Hessian here
    pert = gradient_perturbation(problem, [1, 7], 0.01)
    J = dense_data_jacobian(problem, pert.indices)
    assert torch.allclose((DataJacobian(problem, pert.indices) @ pert.delta), J @ pert.delta.reshape(-1), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("training", [Training(steps=40, lr=0.5), Training(steps=40, lr=0.5, nesterov=False),
                                      Training(steps=15, lr=0.3, momentum=0.0)])
def test_the_filter_is_the_linearised_training_run(training):
    problem, _ = smooth()
    pert = gradient_perturbation(problem, [1, 7], 0.01)
    G, b = dense_gauss_newton(problem), (DataJacobian(problem, pert.indices) @ pert.delta)
    d, buf = torch.zeros_like(b), torch.zeros_like(b)  # the recurrence with the dense matrix, step by step
    for t in range(1, training.steps + 1):
        g = G @ d + b
        buf = training.momentum * buf + g if t > 1 else g
        d = d - training.lr * ((g + training.momentum * buf if training.nesterov else buf) if training.momentum else g)
    pred = ggn_filter(problem, pert, training, rank=problem.p)
    assert float((pred.shift - d).norm() / d.norm()) < 1e-8
    # a filter that ignored T would match the run with a different T
    shorter = ggn_filter(problem, pert, Training(**{**training.__dict__, "steps": training.steps // 2}),
                         rank=problem.p)
    assert float((shorter.shift - d).norm() / d.norm()) > 0.05
    assert momentum_filter(torch.tensor([0.0]), Training(steps=10, lr=0.1, momentum=0.0))[0] == pytest.approx(1.0)


def test_the_proximal_prediction_predicts_the_proximal_response():
    problem, (x_eval, _) = smooth()
    pert = gradient_perturbation(problem, [1, 7], 0.003)
    lam = 0.05
    pred = proximal_prediction(problem, pert, lam)
    b = (DataJacobian(problem, pert.indices) @ pert.delta)
    exact = -torch.linalg.solve(dense_gauss_newton(problem) + lam * torch.eye(problem.p, dtype=b.dtype), b)
    assert float((pred.shift - exact).norm() / exact.norm()) < 1e-6
    ref = pbrf_response(problem, pert, lam)
    assert ref.stable
    assert float((pred.shift - ref.shift).norm() / ref.shift.norm()) < 0.02
    # the plain proximal response is another quantity at random weights (its curvature is H, not 𝒢): the
    # comparison can fail
    plain = proximal_response(problem, pert, lam, gtol=1e-8).shift
    assert float((pred.shift - plain).norm() / plain.norm()) > 0.3


@pytest.mark.parametrize("loss, decay", [("ce", 0.0), ("se", 0.0), ("ce", 0.02)])
def test_the_budget_filter_from_the_gram_factor_is_the_dense_filter(loss, decay):
    """φ_T(𝒢) from an exact Gram factor's Gauss–Newton spectrum against the eigendecomposition of the dense 𝒢 —
    on 𝒢's range and off it (rank 𝒢 < p here), with and without weight decay; Lanczos is exact only at full rank,
    and a Nyström factor falls back to it."""
    from setsens.audit import GramFactor
    from setsens.filters import budget_filter

    problem, _ = smooth(loss=loss)
    problem.weight_decay = decay
    training = Training(steps=40, lr=0.5)
    values, vectors = torch.linalg.eigh(dense_gauss_newton(problem))
    factor = GramFactor(problem)
    mu, _ = factor.gauss_newton_spectrum
    nonzero = (values - decay)[values - decay > 1e-10 * values.max()]
    assert len(mu) == len(nonzero) < problem.p and torch.allclose(mu.sort().values, nonzero, rtol=1e-8)
    V = torch.randn(4, problem.p, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dense = ((V @ vectors) * momentum_filter(values, training)) @ vectors.T
    error = lambda got: float((got - dense).norm() / dense.norm())  # noqa: E731
    exact = budget_filter(problem, training, factor=factor)
    assert error(exact(V)) < 1e-8 and error(torch.stack([exact(v) for v in V])) < 1e-8
    assert error(budget_filter(problem, training, rank=3)(V)) > 1e-3
    nystrom = GramFactor(problem, path="nystrom", rank=8)
    assert error(budget_filter(problem, training, rank=problem.p, factor=nystrom)(V)) < 1e-8
    with pytest.raises(ValueError, match="exact path"):
        nystrom.gauss_newton_spectrum
