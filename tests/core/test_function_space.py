"""The function-space (Gauss–Newton) estimate against dense linear algebra."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from setsens.function_space import OutputJacobian, output_shift
from setsens.operators import DataJacobian, cache_budget, dense_hessian, dense_output_jacobian
from setsens.problem import Perturbation, Problem, squared_error
from setsens.solution_set import RadiusOptions, SolveOptions, estimate

from problems import small_problem


def _wide(seed, loss="ce", n=6, batch_size=4):
    """p = 59 > n·K = 18: the output Jacobian has full row rank."""
    return small_problem(seed=seed, n=n, d=3, hidden=8, k=3, loss=loss, batch_size=batch_size)


def _gauss_newton(problem, pert):
    """v₀ of the Gauss–Newton form, run to convergence, and its CGLS record."""
    est = estimate(problem, pert, "gauss-newton", solve=SolveOptions(rule="fixed", maxiter=200, rtol=1e-12),
                   radius=RadiusOptions(directions=0))
    return est.shift, est.krylov


def _perturbation(problem, k, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(problem.n, generator=g)[:k]
    return Perturbation(idx, 0.1 * torch.randn(k, *problem.input_shape, generator=g, dtype=torch.float64))


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 1000), batch=st.integers(1, 7), centered=st.booleans(),
       cache=st.sampled_from(["auto", "none", 3000]))
def test_output_jacobian_products_match_dense(seed, batch, centered, cache):
    problem = _wide(seed, batch_size=batch)
    G = dense_output_jacobian(problem)  # (n·K) × p, rows point-major
    if centered:
        P = torch.eye(3, dtype=G.dtype) - 1 / 3
        G = torch.block_diag(*[P] * problem.n) @ G
    op = OutputJacobian(problem, centered=centered, cache=cache)
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):  # the second round builds the cache, the third runs on it
        v = torch.randn(problem.p, generator=g, dtype=torch.float64)
        u = torch.randn(problem.n, 3, generator=g, dtype=torch.float64)
        assert torch.allclose((op @ v).reshape(-1), G @ v, atol=1e-10)
        assert torch.allclose(op.T @ u, G.T @ u.reshape(-1), atol=1e-10)
    assert op.calls == 6
    assert cache == "auto" or op.cached_bytes <= cache_budget(cache, problem.device)


def test_cache_holds_what_fits_and_equals_recomputation_to_rounding(monkeypatch):
    monkeypatch.setattr("setsens.function_space.memory_in_use", lambda device: 0)  # sizes by estimate only
    problem = _wide(5, n=7, batch_size=3)  # batches of 3, 3, 1 points
    per_point = OutputJacobian(problem)._bytes_per_point
    assert per_point > 0
    none, some, auto = (OutputJacobian(problem, cache=c) for c in ("none", 4 * per_point, "auto"))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(problem.p, generator=g, dtype=torch.float64)
        u = torch.randn(problem.n, 3, generator=g, dtype=torch.float64)
        ref, ref_t = none @ v, none.T @ u
        for op in (some, auto):
            assert torch.allclose(op @ v, ref, rtol=1e-13, atol=1e-15)
            assert torch.allclose(op.T @ u, ref_t, rtol=1e-13, atol=1e-15)
    assert (none.cached_bytes, len(none._linear)) == (0, 0)
    once = OutputJacobian(problem)
    once @ v
    assert once.cached_bytes == 0  # a one-off product builds nothing
    assert sorted(some._linear) == [0, 2] and some.cached_bytes == 4 * per_point  # batch 1 (3 points) did not fit
    assert sorted(auto._linear) == [0, 1, 2]


def test_cache_rejects_a_bad_budget():
    with pytest.raises(ValueError, match="cache"):
        OutputJacobian(_wide(0), cache="all")
    with pytest.raises(ValueError, match="cache"):
        OutputJacobian(_wide(0), cache=-1)


def test_output_shift_is_the_derivative_of_the_outputs_along_the_data():
    problem = _wide(3)
    pert = _perturbation(problem, 2, 3)
    r = output_shift(problem, pert)
    eps = 1e-6

    def outputs(scale):
        return torch.cat([problem.outputs(problem.params, x) for x, _ in problem.batches(pert.scaled(scale))])

    fd = (outputs(eps) - outputs(-eps)) / (2 * eps)
    assert torch.allclose(r, fd, atol=1e-7)
    assert r[~torch.isin(torch.arange(problem.n), pert.indices)].abs().max() == 0


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 1000), k=st.integers(1, 3))
def test_converged_estimate_is_the_minimum_norm_output_preserving_shift(seed, k):
    """CE: v = −(PG)⁺ P r, the pseudo-inverse computed densely."""
    problem = _wide(seed)
    pert = _perturbation(problem, k, seed)
    v, res = _gauss_newton(problem, pert)
    assert problem.loss_ignores_output_shift
    P = torch.block_diag(*[torch.eye(3, dtype=torch.float64) - 1 / 3] * problem.n)
    G = P @ dense_output_jacobian(problem)
    r = output_shift(problem, pert, centered=True).reshape(-1)
    ref = -torch.linalg.pinv(G, rtol=1e-12) @ r
    assert torch.allclose(v, ref, rtol=1e-6, atol=1e-9 * float(ref.norm()))
    assert res.residuals[-1] < 1e-9
    assert all(a >= b - 1e-12 for a, b in zip(res.residuals, res.residuals[1:]))  # monotone


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 1000), k=st.integers(1, 3))
def test_squared_error_at_zero_residual_equals_minimum_norm_solution_of_eq19(seed, k):
    """There H = c·GᵀG and JΔx = c·Gᵀr exactly, so −G⁺r = −H⁺JΔx (eq. 19's minimum-norm solution)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = model(x)  # zero residual
    problem = Problem(model, squared_error, (x, y), batch_size=4)
    pert = _perturbation(problem, k, seed)
    v, res = _gauss_newton(problem, pert)
    assert not problem.loss_ignores_output_shift
    H = dense_hessian(problem)
    Jdx = DataJacobian(problem, pert.indices) @ pert.delta
    ref = -torch.linalg.pinv(H, hermitian=True, rtol=1e-10) @ Jdx
    assert torch.allclose(v, ref, rtol=1e-6, atol=1e-8 * float(ref.norm()))
    assert float((H @ v + Jdx).norm() / Jdx.norm()) < 1e-6
