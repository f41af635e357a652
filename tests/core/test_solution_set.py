"""The estimator: toy closed form, influence function when H is non-singular, set operations."""

import math

import pytest
import torch
from torch import nn

from setsens.experiments.toy import toy_problem, toy_study
from setsens.influence import influence_shift
from setsens.operators import Hessian, dense_hessian
from setsens.problem import Perturbation, Problem, cross_entropy
from setsens.solution_set import estimate_solution_set


def test_toy_values_match_design():
    s = toy_study()
    assert abs(s["min_norm_shift"] - 0.4 / math.sqrt(5)) < 1e-6
    assert abs(s["risk_original"] - 0.4) < 1e-9
    assert abs(s["risk_min_norm"] - 0.012166) < 1e-6
    assert torch.allclose(torch.tensor(s["min_norm_shift_vector"], dtype=torch.float64), torch.tensor([0.16, 0.08], dtype=torch.float64), atol=1e-9)
    assert s["hessian"] == [[20.0, 10.0], [10.0, 5.0]]
    for e in s["estimated_solutions"]:
        v = torch.tensor(e["w"], dtype=torch.float64) - torch.tensor([1.0, 2.0], dtype=torch.float64)
        assert abs(2 * v[0] + v[1] - 0.4) < 1e-9  # member of DS(x̄|w̄)(Δx)
        assert float(v.norm()) <= 0.2 + 1e-9  # inside U
    assert s["distance_estimate_to_new_set"] < 0.2 * s["distance_w_bar_to_new_set"]


@pytest.mark.parametrize("method", ["dense", "krylov"])
def test_toy_matrix_free_equals_dense(method):
    problem, pert = toy_problem()
    est = estimate_solution_set(problem, pert, method=method)
    assert torch.allclose(est.shift, torch.tensor([0.16, 0.08], dtype=torch.float64), atol=1e-8)
    assert est.feasibility_residual < 1e-8


def logistic_problem(lam=1e-2, seed=0):
    """L2-regularised logistic regression: H is positive definite."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = (X[:, 0] + 0.5 * torch.randn(40, generator=g, dtype=torch.float64) > 0).long()
    model = nn.Linear(5, 2, bias=False).double()
    problem = Problem(model, cross_entropy, (X, y))
    # add the ridge through the per-sample loss: ℓ_i + (λ/2)‖w‖² keeps H ≻ 0
    base = problem.per_sample_loss
    problem.per_sample_loss = lambda w, x, t: base(w, x, t) + 0.5 * lam * (w**2).sum()
    from setsens.retrain import retrain

    problem.params = retrain(problem, gtol=1e-12).w
    return problem


def test_estimate_equals_influence_function_when_hessian_nonsingular():
    problem = logistic_problem()
    H = dense_hessian(problem)
    assert float(torch.linalg.eigvalsh(H).min()) > 1e-3
    pert = Perturbation(torch.tensor([1, 4, 9]), 0.01 * torch.randn(3, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    exact = influence_shift(problem, pert, "exact")
    dense = estimate_solution_set(problem, pert, method="dense", rule="fixed", tau=1e-12)
    krylov = estimate_solution_set(problem, pert, method="krylov", rule="fixed", maxiter=50)
    assert torch.allclose(dense.shift, exact, atol=1e-10)
    assert torch.allclose(krylov.shift, exact, atol=1e-8)
    assert dense.null_basis.shape[1] == 0
    for variant in ("pinv", "damped"):
        assert torch.allclose(influence_shift(problem, pert, variant, damping=0.0), exact, atol=1e-8)
    lissa = influence_shift(problem, pert, "lissa", damping=0.0, lissa_steps=3000)
    assert torch.allclose(lissa, exact, rtol=1e-3, atol=1e-6)
    # and the first-order shift predicts retraining to second order
    from setsens.retrain import retrain

    moved = retrain(problem, problem.params, pert, gtol=1e-12).w - problem.params
    assert float((moved - exact).norm()) < 0.05 * float(moved.norm())


def test_members_projection_and_membership():
    from core_helpers import small_problem

    problem = small_problem(seed=3, n=6, hidden=6)  # p = 38 > n: singular H
    from setsens.retrain import retrain

    problem.params = retrain(problem, gtol=1e-10, max_iter=3000).w
    pert = Perturbation(torch.tensor([0, 2]), 0.01 * torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    est = estimate_solution_set(problem, pert, method="dense", rule="fixed", tau=1e-6)
    assert est.null_basis.shape[1] > 0
    members = est.sample(4, torch.Generator().manual_seed(0))
    for m in members:
        assert est.membership_residual(m) <= est.feasibility_residual + 1e-6
        assert float((m - problem.params).norm()) <= est.radius + 1e-9
        assert torch.allclose(est.project(m), m, atol=1e-9)
    w = problem.params + torch.randn(problem.p, dtype=torch.float64)
    q = est.project(w)
    assert torch.allclose(est.project(q), q, atol=1e-9)  # idempotent
    assert float(est.null_basis.T @ (w - q) @ (est.null_basis.T @ (w - q))) < 1e-18  # w − q ⟂ null space


def test_validated_rule_beats_tiny_cutoff_on_overparameterized_net():
    """A pseudo-inverse with a tiny cut-off divides by rounding noise; the validated rule does not."""
    from core_helpers import small_problem
    from setsens.perturb import gradient_perturbation
    from setsens.retrain import retrain

    problem = small_problem(seed=1, n=10, d=4, hidden=12, k=3, act=nn.ReLU, loss="se", batch_size=10)
    problem.params = retrain(problem, gtol=1e-12, max_iter=5000).w
    pert = gradient_perturbation(problem, torch.arange(3), 0.01)
    validated = estimate_solution_set(problem, pert, method="dense")
    tiny = estimate_solution_set(problem, pert, method="dense", rule="fixed", tau=1e-14)
    before = problem.risk(perturbation=pert)
    assert problem.risk(validated.centre, pert) < before
    assert problem.risk(validated.centre, pert) <= problem.risk(tiny.centre, pert)
