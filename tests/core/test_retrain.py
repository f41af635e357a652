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
