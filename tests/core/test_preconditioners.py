"""Output-space preconditioners of the Gauss–Newton system against the dense Gram matrix, and the
preconditioned estimate against the dense pseudo-inverse (the minimum norm is kept)."""

import pytest
import torch

from problems import interpolating_mlp
from setsens.function_space import OutputJacobian, output_shift
from setsens.krylov import cgne
from setsens.operators import dense_output_jacobian
from setsens.preconditioners import gram_diagonal, gram_nystrom, gram_preconditioner
from setsens.problem import center_classes
from setsens.solution_set import RadiusOptions, SolveOptions, estimate


@pytest.mark.parametrize("loss", ["se", "ce"])
def test_diagonal_estimates_the_gram_diagonal(loss):
    problem, _ = interpolating_mlp(0, loss, batch_size=3)
    G = OutputJacobian(problem, centered=loss == "ce")
    dense = dense_output_jacobian(problem, centered=loss == "ce")
    diag = (dense * dense).sum(1).reshape(problem.n, -1)
    M = gram_diagonal(G, samples=4000)
    r = torch.randn(problem.n, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = r / diag if loss == "se" else center_classes(r / diag)
    assert float((M(r) - want).norm()) < 0.05 * float(want.norm())  # Hutchinson: ~√(2/4000) per entry
    assert float((gram_diagonal(G, samples=2)(r) - want).norm()) > 0.05 * float(want.norm())  # can fail
    assert G.calls == 4002


@pytest.mark.parametrize("loss", ["se", "ce"])
def test_full_rank_nystrom_solves_in_one_step(loss):
    """With the sketch covering range(G Gᵀ), M G Gᵀ = λ_min·I there: CG stops after one step at G⁺r."""
    problem, pert = interpolating_mlp(1, loss, batch_size=3)
    centered = loss == "ce"
    G = OutputJacobian(problem, centered=centered)
    dense = dense_output_jacobian(problem, centered=centered)
    r = output_shift(problem, pert, centered=centered)
    ref = -torch.linalg.pinv(dense) @ r.reshape(-1)
    M = gram_nystrom(G, rank=problem.n * 3)
    sol = cgne(G, -r, precondition=M, maxiter=30, rtol=1e-9, dot=G.dot)
    assert sol.iterations <= 2 and torch.allclose(sol.x, ref, atol=1e-8 * float(ref.norm()))
    # a low-rank sketch shrinks the spread of the spectrum on range(G Gᵀ)
    low = gram_nystrom(OutputJacobian(problem, centered=centered), rank=8)
    gram = dense @ dense.T
    shape = r.shape
    preconditioned = torch.stack([low(c.reshape(shape)).reshape(-1) for c in gram.T], 1)

    def spread(A):
        ev = torch.linalg.eigvals(A).real.abs().sort(descending=True).values
        ev = ev[ev > 1e-10 * ev[0]]
        return float(ev[0] / ev[-1])

    assert spread(preconditioned) < 0.5 * spread(gram), (spread(preconditioned), spread(gram))


@pytest.mark.parametrize("kind", ["diagonal", "nystrom"])
@pytest.mark.parametrize("loss", ["se", "ce"])
def test_preconditioned_estimate_is_the_minimum_norm_shift(kind, loss):
    problem, pert = interpolating_mlp(2, loss, batch_size=3)
    dense = estimate(problem, pert, "gauss-newton", dense=True, solve=SolveOptions(rule="fixed", tau=1e-12),
                     radius=RadiusOptions(directions=0))
    free = estimate(problem, pert, "gauss-newton", radius=RadiusOptions(directions=0),
                    solve=SolveOptions(rule="fixed", maxiter=300, rtol=1e-12, preconditioner=kind, sketch=8))
    assert torch.allclose(free.shift, dense.shift, atol=1e-7 * float(dense.shift.norm()))
    assert free.krylov.converged and free.cost["jvp_vjp_passes"] > 2 * free.krylov.iterations
    # the null projections reuse the preconditioner and match the dense projector
    z = torch.randn(problem.p, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.allclose(free.null_space(z), dense.null_space(z), atol=1e-6 * float(z.norm()))


def test_bad_preconditioner_options():
    with pytest.raises(ValueError, match="preconditioner must be one of"):
        SolveOptions(preconditioner="kfac")
    with pytest.raises(ValueError, match="sketch"):
        SolveOptions(preconditioner="diagonal", sketch=0)
    problem, pert = interpolating_mlp(0, "se", batch_size=3)
    with pytest.raises(ValueError, match="Gauss–Newton solve only"):
        estimate(problem, pert, "hessian", solve=SolveOptions(preconditioner="diagonal"))
    with pytest.raises(ValueError, match="must be one of"):
        gram_preconditioner("jacobi", OutputJacobian(problem), 4)


@pytest.mark.parametrize("kind", ["none", "nystrom"])
def test_float32_products_with_float64_recurrences_keep_the_minimum_norm_shift(kind):
    """Mixed precision: G's products in float32, the Krylov vectors in float64 — the shift stays within
    float32 rounding (1e-5 relative) of the float64 pseudo-inverse, with and without a preconditioner."""
    from setsens.problem import Problem

    problem, pert = interpolating_mlp(3, "se", batch_size=3)
    single = Problem(problem.model, problem.loss, (problem.inputs, problem.targets), params=problem.params,
                     dtype=torch.float32)
    ref = -torch.linalg.pinv(dense_output_jacobian(problem)) @ output_shift(problem, pert).reshape(-1)
    est = estimate(single, pert, "gauss-newton", radius=RadiusOptions(directions=0),
                   solve=SolveOptions(rule="fixed", maxiter=300, rtol=1e-7, preconditioner=kind, sketch=8))
    assert est.krylov.x.dtype == torch.float64
    assert float((est.shift.double() - ref).norm()) <= 1e-5 * float(ref.norm())
