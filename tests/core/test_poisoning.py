"""setsens.poisoning: the coderivative gradient against a dense pseudo-inverse and finite differences,
the attack against its own linearised optimum and the baselines, the staged attack's budget."""

import pytest
import torch
from problems import fitted_problem
from problems import smooth_mlp as smooth

from setsens.audit import GramFactor, input_jacobians
from setsens.filters import momentum_filter
from setsens.finetune import Training
from setsens.operators import dense_data_jacobian, dense_gauss_newton
from setsens.poisoning import (AttackOptions, baselines, budget_input_gradient, budget_shift, input_gradient, margin,
                               poison, set_shift)
from setsens.problem import Perturbation, cross_entropy, squared_error
from setsens.retrain import levenberg_marquardt, training_response


def held_out(seed=5):
    return torch.randn(3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("loss", [squared_error, cross_entropy])
def test_input_gradient_is_the_dense_coderivative(loss):
    problem = fitted_problem(loss, k=3)
    phi = margin(problem, held_out())
    G = GramFactor(problem).G  # centred for cross-entropy
    u = torch.linalg.pinv(G).T @ torch.func.grad(phi)(problem.params)  # (Gᵀ)⁺ ∇φ, by SVD
    A = input_jacobians(problem)  # (n, K, d)
    dense = -torch.einsum("nkd,nk->nd", A, u.reshape(problem.n, -1))
    for solve in ({"factor": GramFactor(problem)}, {"maxiter": 500, "rtol": 1e-13}):
        g = input_gradient(problem, phi, **solve)
        assert float((g - dense).norm() / dense.norm()) < 1e-6, solve
    assert float(dense.norm()) > 0


def test_input_gradient_matches_finite_differences_of_the_moved_set():
    problem = fitted_problem(k=3)
    phi, factor = margin(problem, held_out()), GramFactor(problem)
    points = torch.tensor([1, 4, 7])
    base = Perturbation(points, 0.05 * torch.randn(3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    g = input_gradient(problem, phi, base, factor)[points]
    d = torch.randn(3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    value = lambda t: float(phi(problem.params + set_shift(problem, Perturbation(points, base.delta + t * d), factor)))
    h = 1e-5
    assert (value(h) - value(-h)) / (2 * h) == pytest.approx(float((g * d).sum()), rel=1e-5)


def test_attack_reaches_the_linearised_optimum_and_beats_the_baselines():
    problem = fitted_problem(k=3)
    phi = margin(problem, held_out())
    factor = GramFactor(problem)
    lin = lambda pert: float(torch.func.grad(phi)(problem.params) @ set_shift(problem, pert, factor))
    result = poison(problem, phi, AttackOptions(points=3, budget=1e-3, steps=1))
    x, _ = problem.points(result.perturbation.indices)
    assert torch.allclose(result.perturbation.delta.norm(dim=1), 1e-3 * x.norm(dim=1), rtol=1e-10)  # on the boundary
    best = lin(result.perturbation)
    assert best < 0
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # no other move of these points at this budget drops the linearised φ further
        moves = baselines(problem, result.perturbation.indices, 1e-3, g)
        assert all(lin(q) >= best * (1 + 1e-8) for q in moves.values())
    assert result.predicted == pytest.approx(float(phi(problem.params + set_shift(problem, result.perturbation, factor))))


def test_staged_attack_stays_in_budget_and_retrains_after_each_stage():
    problem = fitted_problem(k=3)
    phi = margin(problem, held_out())
    calls = []

    def retrain(pert):
        calls.append(pert)
        return levenberg_marquardt(problem, None, pert, gtol=1e-12).w

    options = AttackOptions(points=2, budget=0.05, steps=3, stages=3)
    result = poison(problem, phi, options, retrain=retrain)
    assert len(calls) == 3 and len(result.retrained) == 3
    x, _ = problem.points(result.perturbation.indices)
    assert (result.perturbation.delta.norm(dim=1) <= 0.05 * x.norm(dim=1) * (1 + 1e-12)).all()
    assert result.retrained[-1] == pytest.approx(float(phi(result.weights)))
    assert result.retrained[-1] < result.start  # retraining on the poisoned data lowers the margin
    with pytest.raises(ValueError, match="retrain"):
        poison(problem, phi, options)
    with pytest.raises(ValueError, match="solver"):
        AttackOptions(solver="lsqr")


TRAINING = Training(steps=40, lr=0.5)


def _dense_budget_gradient(problem, phi, w):
    """``−Jᵀ φ_T(𝒢) ∇φ(w)`` from the eigendecomposition of the dense Gauss–Newton matrix."""
    values, vectors = torch.linalg.eigh(dense_gauss_newton(problem))
    u = vectors @ (momentum_filter(values, TRAINING) * (vectors.T @ torch.func.grad(phi)(w)))
    return -(dense_data_jacobian(problem, torch.arange(problem.n)).T @ u).reshape(problem.n, -1)


def test_the_budget_gradient_is_the_dense_filtered_coderivative():
    """At a non-stationary w̄ (random weights), the budget response's input gradient against −Jᵀ φ_T(𝒢) ∇φ by
    eigendecomposition (at Δx = 0 and at a move, where ∇φ is taken at w̄ + d_T), and against finite differences of
    φ(w̄ + d_T(Δx)); the set's gradient is another vector here."""
    problem, (x_eval, _) = smooth()
    phi = margin(problem, x_eval[0])
    g = budget_input_gradient(problem, phi, TRAINING, rank=problem.p)
    dense = _dense_budget_gradient(problem, phi, problem.params)
    assert float((g - dense).norm() / dense.norm()) < 1e-8 and float(dense.norm()) > 0
    points = torch.tensor([1, 6, 11])
    base = Perturbation(points, 0.05 * torch.randn(3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    moved = budget_input_gradient(problem, phi, TRAINING, base, rank=problem.p)
    w = problem.params + budget_shift(problem, base, TRAINING, rank=problem.p)
    assert float((moved - _dense_budget_gradient(problem, phi, w)).norm() / moved.norm()) < 1e-8
    d = torch.randn(3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    value = lambda t: float(phi(problem.params + budget_shift(problem, Perturbation(points, base.delta + t * d),
                                                              TRAINING, rank=problem.p)))
    h = 1e-5
    assert (value(h) - value(-h)) / (2 * h) == pytest.approx(float((moved[points] * d).sum()), rel=1e-5)
    set_g = input_gradient(problem, phi, maxiter=500, rtol=1e-13)
    assert float((set_g - g).norm() / g.norm()) > 0.1
    factor = GramFactor(problem)  # the exact filter from the Gram factor: no Lanczos
    assert float((budget_input_gradient(problem, phi, TRAINING, factor=factor) - dense).norm() / dense.norm()) < 1e-8
    moved_exact = budget_input_gradient(problem, phi, TRAINING, base, factor=factor)
    assert float((moved_exact - moved).norm() / moved.norm()) < 1e-8


def test_the_budget_attack_predicts_and_moves_the_fine_tuning_it_follows():
    """``response="budget"``: the attack's move stays in budget, its prediction is φ at w̄ + d_T, and fine-tuning
    by the same training on the poisoned data (its reference) lowers the margin as far as predicted, to first
    order — further than the baselines of the same points."""
    problem, (x_eval, _) = smooth()
    phi = margin(problem, x_eval[0])
    options = AttackOptions(points=3, budget=1e-3, steps=1, response="budget", training=TRAINING, rank=problem.p)
    result = poison(problem, phi, options)
    x, _ = problem.points(result.perturbation.indices)
    assert torch.allclose(result.perturbation.delta.norm(dim=1), 1e-3 * x.norm(dim=1), rtol=1e-10)
    assert result.predicted == pytest.approx(float(phi(problem.params + budget_shift(problem, result.perturbation,
                                                                                     TRAINING, rank=problem.p))))
    drop = lambda pert: result.start - float(phi(problem.params + training_response(problem, pert, TRAINING,
                                                                                    floor_factor=0).shift))
    predicted, true = result.start - result.predicted, drop(result.perturbation)
    assert predicted > 0 and true == pytest.approx(predicted, rel=0.1)
    moves = baselines(problem, result.perturbation.indices, 1e-3, torch.Generator().manual_seed(0))
    assert all(drop(q) < true for q in moves.values())
    with pytest.raises(ValueError, match="response"):
        AttackOptions(response="converged")
    with pytest.raises(ValueError, match="response='budget'"):
        AttackOptions(training=TRAINING)
