"""Retraining: the distance it measures is the distance to the new solution set."""

import torch
from torch import nn

from setsens.problem import Perturbation, Problem
from setsens.retrain import distance_to_solution_set, retrain


def test_underdetermined_least_squares_retrain_is_orthogonal_projection():
    """Linear regression with p > n: S = {w : Xw = y}; warm-started retraining lands on the
    orthogonal projection of the start, so its distance equals d(w0, S) = ‖X⁺(Xw0 − y)‖."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(6, 15, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    model = nn.Linear(15, 1, bias=False).double()
    problem = Problem(model, lambda out, t: 0.5 * (out[:, 0] - t) ** 2, (X, y))
    w0 = torch.randn(15, generator=g, dtype=torch.float64)
    r = retrain(problem, w0, gtol=1e-13)
    proj = w0 - torch.linalg.pinv(X) @ (X @ w0 - y)
    assert r.converged
    assert torch.allclose(r.w, proj, atol=1e-7)
    pert = Perturbation(torch.tensor([1]), 0.1 * torch.ones(1, 15, dtype=torch.float64))
    Xp = X.clone()
    Xp[1] += 0.1
    d = distance_to_solution_set(problem, w0, pert, gtol=1e-13).distance
    assert abs(d - float((torch.linalg.pinv(Xp) @ (Xp @ w0 - y)).norm())) < 1e-7


def test_cross_entropy_reference_is_stable_where_plain_retraining_is_not():
    """Separable data, cross-entropy: no finite minimiser, so "retrain until ‖∇L‖ ≤ gtol" moves further
    the smaller gtol is.  The proximal response is a finite minimiser: it moves ≤ 5 % when its
    tolerance is tightened 100×, and to first order it is −(H + λI)⁻¹ J Δx (3 % off at this 0.1 % step,
    6 % at λ = 0.01; 0.6 % at a 0.01 % step: first-order convergence)."""
    from problems import small_problem
    from setsens.influence import influence_shift
    from setsens.perturb import gradient_perturbation
    from setsens.retrain import proximal_response

    problem = small_problem(seed=0, n=12, d=3, hidden=8, k=2, loss="ce", batch_size=12)
    problem.params = retrain(problem, gtol=1e-4, max_iter=500).w  # a separable fit, as trained in practice
    pert = gradient_perturbation(problem, torch.tensor([0, 5]), 1e-3)
    plain = [retrain(problem, None, pert, gtol=tol, max_iter=20000).distance for tol in (1e-5, 1e-7)]
    assert plain[1] > 1.05 * plain[0]  # the "ground truth" moves with its tolerance
    lam = 0.1
    ref = proximal_response(problem, pert, damping=lam, gtol=1e-8)
    assert ref.stable and ref.change_when_tightened <= 0.05
    first_order = influence_shift(problem, pert, "damped", damping=lam, maxiter=500)
    assert float((ref.shift - first_order).norm()) <= 0.1 * float(ref.shift.norm())


def test_converged_response_with_weight_decay_is_the_undamped_influence_and_flags_an_unconverged_run():
    """With weight decay the minimiser is isolated: λ = 0 gives the converged response, tolerance-
    independent, and to first order −H⁻¹ J Δx.  A run cut short by max_iter is never called stable."""
    import pytest

    from problems import small_problem
    from setsens.influence import influence_shift
    from setsens.perturb import gradient_perturbation
    from setsens.retrain import proximal_response

    problem = small_problem(seed=0, n=12, d=3, hidden=8, k=2, loss="ce", batch_size=12)
    with pytest.raises(ValueError, match="weight decay"):
        proximal_response(problem, None, 0.0)
    from setsens.problem import cross_entropy

    problem = Problem(problem.model, cross_entropy, problem.points(torch.arange(12)), weight_decay=1e-2, batch_size=12)
    problem.params = retrain(problem, gtol=1e-9, max_iter=5000).w  # stationary (to its precision floor)
    pert = gradient_perturbation(problem, torch.tensor([0, 5]), 1e-3)
    ref = proximal_response(problem, pert, 0.0)
    assert ref.stable and ref.perturbed.converged
    exact = influence_shift(problem, pert, "exact")
    assert float((ref.shift - exact).norm()) <= 0.05 * float(ref.shift.norm())
    short = proximal_response(problem, pert, 0.0, gtol=1e-12, max_iter=2)
    assert not short.stable
