"""setsens.audit: every point's modulus and many queries from one Gram factorisation, against
independent matrix-free solves."""

import pytest
import torch
from problems import fitted_problem

from setsens.audit import GramFactor, answer_queries, exact_modulus, group_modulus, input_jacobians, scan
from setsens.problem import Perturbation, cross_entropy, squared_error
from setsens.solution_set import SolveOptions, estimate


@pytest.mark.parametrize("loss", [squared_error, cross_entropy])
def test_scan_matches_per_point_solves_and_its_direction_attains_it(loss):
    problem = fitted_problem(loss, k=3)
    factor = GramFactor(problem)
    result = scan(problem, factor)
    exact = torch.tensor([exact_modulus(problem, k) for k in range(problem.n)], dtype=torch.float64)
    assert torch.allclose(result.kappa, exact, rtol=1e-6)
    assert float(exact.max() / exact.min()) > 1.5  # the points differ: a ranking that can fail
    k = int(result.ranking[0])
    x, _ = problem.points([k])
    worst = answer_queries(problem, [Perturbation(torch.tensor([k]), result.direction[k][None])], factor)[0]
    assert float(worst.norm()) == pytest.approx(float(result.kappa[k]), rel=1e-8)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):  # no direction moves the set further
        d = torch.randn(x.shape, generator=g, dtype=torch.float64)
        v = answer_queries(problem, [Perturbation(torch.tensor([k]), d / d.norm())], factor)[0]
        assert float(v.norm()) <= float(result.kappa[k]) * (1 + 1e-10)


def test_many_queries_match_individual_estimates():
    problem = fitted_problem(k=2)
    g = torch.Generator().manual_seed(2)
    perts = [Perturbation(torch.tensor([i % problem.n]), 0.01 * torch.randn(1, 3, generator=g, dtype=torch.float64))
             for i in range(6)]
    shifts = answer_queries(problem, perts)
    for pert, v in zip(perts, shifts):
        ref = estimate(problem, pert, "gauss-newton", solve=SolveOptions(rule="fixed", rtol=1e-13, maxiter=500)).shift
        assert float((v - ref).norm() / ref.norm()) < 1e-6


@pytest.mark.parametrize("loss", [squared_error, cross_entropy])
def test_group_modulus_against_the_pseudo_inverse_and_its_members(loss):
    problem = fitted_problem(loss, k=3)
    factor = GramFactor(problem)
    points = torch.tensor([1, 4, 6])
    kappa, direction = group_modulus(problem, points, factor)
    A = input_jacobians(problem, points)
    rows = (points[:, None] * 3 + torch.arange(3)).reshape(-1)
    dense = torch.linalg.pinv(factor.G)[:, rows] @ torch.block_diag(*A)  # Δx_G ↦ G⁺ E A Δx_G, by SVD
    assert kappa == pytest.approx(float(torch.linalg.matrix_norm(dense, ord=2)), rel=1e-8)
    v = answer_queries(problem, [Perturbation(points, direction)], factor)[0]
    assert float(direction.norm()) == pytest.approx(1.0) and float(v.norm()) == pytest.approx(kappa, rel=1e-8)
    single = scan(problem, factor).kappa[points]
    assert float(single.max()) <= kappa * (1 + 1e-10) <= float(single.norm()) * (1 + 1e-10)  # Cauchy–Schwarz
