"""The estimated set: toy closed form, influence function when H is non-singular, a real set
(distinct members inside U), both paths, both forms, set distances on the estimate."""

import math

import pytest
import torch
from torch import nn

from problems import interpolating_mlp, small_problem
from setsens.experiments.toy import toy_problem, toy_study
from setsens.influence import influence_shift
from setsens.operators import dense_hessian, dense_output_jacobian
from setsens.perturb import gradient_perturbation
from setsens.problem import Perturbation, Problem, cross_entropy
from setsens.retrain import retrain
from setsens.solution_set import SolveOptions, estimate


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
    # the erratum: at the toy's own step S(xᵖ) is not inside S(x̄) + κ‖Δx‖𝔹 (κ is infinitesimal)
    lo, hi = s["aubin_inclusion"]["distance_of_new_solutions_to_old_set"]
    assert lo > s["aubin_inclusion"]["kappa_times_delta_x"] and not s["aubin_inclusion"]["holds"]


@pytest.mark.parametrize("method", ["hessian", "gauss-newton"])
@pytest.mark.parametrize("dense", [True, False])
def test_toy_every_path_gives_the_closed_form(method, dense):
    problem, pert = toy_problem()
    est = estimate(problem, pert, method, dense=dense)
    assert torch.allclose(est.shift, torch.tensor([0.16, 0.08], dtype=torch.float64), atol=1e-8)
    assert est.feasibility_residual < 1e-8 and est.residual < 1e-8
    # U is not the ball through v₀: the set is a segment of the line 2v₁ + v₂ = 0.4
    assert est.radius > est.distance_from_original() * 1.5
    members = est.sample(6, torch.Generator().manual_seed(0))
    v = members - problem.params
    assert torch.allclose(2 * v[:, 0] + v[:, 1], torch.full((6,), 0.4, dtype=torch.float64), atol=1e-8)
    assert float(v.norm(dim=1).max()) <= est.radius
    assert len({round(float(x), 6) for x in v[:, 0]}) == 6  # distinct


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
    problem.params = retrain(problem, gtol=1e-12).w
    return problem


def test_estimate_equals_influence_function_when_hessian_nonsingular():
    problem = logistic_problem()
    H = dense_hessian(problem)
    assert float(torch.linalg.eigvalsh(H).min()) > 1e-3
    pert = Perturbation(torch.tensor([1, 4, 9]), 0.01 * torch.randn(3, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    exact = influence_shift(problem, pert, "exact")
    dense = estimate(problem, pert, "hessian", dense=True, solve=SolveOptions(rule="fixed", tau=1e-12))
    krylov = estimate(problem, pert, "hessian", solve=SolveOptions(rule="fixed", maxiter=50))
    assert torch.allclose(dense.shift, exact, atol=1e-10)
    assert torch.allclose(krylov.shift, exact, atol=1e-8)
    assert dense.null_space.dim == 0 and dense.radius == pytest.approx(float(exact.norm()))
    for variant in ("pinv", "damped"):
        assert torch.allclose(influence_shift(problem, pert, variant, damping=0.0), exact, atol=1e-8)
    lissa = influence_shift(problem, pert, "lissa", damping=0.0, lissa_steps=3000)
    assert torch.allclose(lissa, exact, rtol=1e-3, atol=1e-6)
    # and the first-order shift predicts retraining to second order
    moved = retrain(problem, problem.params, pert, gtol=1e-12).w - problem.params
    assert float((moved - exact).norm()) < 0.05 * float(moved.norm())


@pytest.mark.parametrize("loss", ["se", "ce"])
def test_the_set_is_a_set_on_random_small_networks(loss):
    """12 networks per loss: sample(8) gives members pairwise ≥ 0.1·r apart, inside U, on the
    first-order set (dense membership residual ≤ 1e-6) — a collapsed set would fail every line."""
    for seed in range(12):
        problem, pert = interpolating_mlp(seed, loss)
        est = estimate(problem, pert, "gauss-newton", dense=True)
        assert est.radius_record["determined"], (seed, est.radius_record)
        members = est.sample(8, torch.Generator().manual_seed(seed))
        dist = torch.cdist(members, members)[~torch.eye(8, dtype=torch.bool)]
        assert float(dist.min()) >= 0.1 * est.radius, (seed, float(dist.min()), est.radius)
        assert float((members - problem.params).norm(dim=1).max()) <= est.radius
        assert max(est.membership_residual(m) for m in members) <= 1e-6 + est.residual
        # and the members fit the perturbed problem as the centre does, within the rule's margin
        rec = est.radius_record
        assert all(problem.risk(m, pert) <= rec["risk_w_bar"] for m in members)


@pytest.mark.parametrize("loss", ["se", "ce"])
def test_matrix_free_set_matches_the_dense_set(loss):
    problem, pert = interpolating_mlp(3, loss)
    dense = estimate(problem, pert, "gauss-newton", dense=True)
    free = estimate(problem, pert, "gauss-newton", solve=SolveOptions(maxiter=400, rule="fixed", rtol=1e-12))
    assert torch.allclose(free.shift, dense.shift, atol=1e-6 * float(dense.shift.norm()))
    members = free.sample(4, torch.Generator().manual_seed(0))
    assert float((members - problem.params).norm(dim=1).max()) <= free.radius
    assert max(dense.membership_residual(m) for m in members) <= 1e-6
    # projection: idempotent, members are their own projection, distance 0 on the set
    w = problem.params + 0.3 * torch.randn(problem.p, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for est in (dense, free):
        q = est.project(w)
        assert torch.allclose(est.project(q), q, atol=1e-7)
        assert est.distance(q) < 1e-7 and est.distance(w) > 0
    assert abs(dense.distance(w) - free.distance(w)) < 1e-5 * max(dense.distance(w), 1)


def test_the_options_of_a_long_run(tmp_path):
    """Start, checkpoint and resume, per-iteration callback, AD mode, one-solve MINRES with a recycled
    deflation space, no radius search: what the ResNet study asks of estimate."""
    from setsens.krylov import Deflation
    from setsens.solution_set import RadiusOptions

    problem, pert = interpolating_mlp(3, "ce")
    only_v0 = RadiusOptions(directions=0)
    fixed = dict(rule="fixed", rtol=0.0)
    straight = estimate(problem, pert, "gauss-newton", solve=SolveOptions(maxiter=12, **fixed), radius=only_v0)
    assert straight.radius == pytest.approx(float(straight.shift.norm())) and not straight.radius_record["determined"]
    ck, seen = str(tmp_path / "gn.pt"), []
    estimate(problem, pert, "gauss-newton", solve=SolveOptions(maxiter=6, checkpoint=ck, **fixed), radius=only_v0)
    resumed = estimate(problem, pert, "gauss-newton", radius=only_v0, solve=SolveOptions(
        maxiter=12, checkpoint=ck, callback=lambda k, res, v: seen.append((k, res)), **fixed))
    assert resumed.krylov.resumed_from == 6 and [k for k, _ in seen] == list(range(7, 13))
    assert torch.equal(resumed.shift, straight.shift) and seen[-1][1] == straight.krylov.residual
    # from x0 the converged shift keeps x0's part in the null space: another member of the set
    dense = estimate(problem, pert, "gauss-newton", dense=True)
    x0 = 0.1 * torch.randn(problem.p, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    moved = estimate(problem, pert, "gauss-newton", solve=SolveOptions(maxiter=400, rtol=1e-13, x0=x0, rule="fixed"),
                     radius=only_v0)
    assert torch.allclose(moved.shift, dense.shift + dense.null_space(x0), atol=1e-7)
    # eq. 19 by one MINRES solve; its Lanczos basis deflates the next solve on the same H
    one = SolveOptions(maxiter=15, min_norm=False, keep_basis=True, hvp_mode="auto", **fixed)
    first = estimate(problem, pert, "hessian", solve=one, radius=only_v0)
    assert first.krylov.products == 15 and first.cost["hvp"] == 16  # and one for the feasibility residual
    deflation = Deflation.from_krylov(first.krylov, 5)
    again = estimate(problem, pert.scaled(2.0), "hessian", radius=only_v0,
                     solve=SolveOptions(maxiter=15, min_norm=False, deflation=deflation, **fixed))
    assert again.krylov.deflation is deflation and again.feasibility_residual < first.feasibility_residual


def test_gauss_newton_set_is_the_null_space_of_the_output_jacobian():
    problem, pert = interpolating_mlp(5, "se")
    est = estimate(problem, pert, "gauss-newton", dense=True)
    G = dense_output_jacobian(problem)
    null = est.null_space.basis
    assert null.shape[1] == problem.p - torch.linalg.matrix_rank(G)
    assert float((G @ null).abs().max()) < 1e-8
    assert float((null.T @ est.shift).abs().max()) < 1e-10  # v₀ ⟂ N: the set's point nearest w̄


def test_hausdorff_between_the_set_and_retrained_points_on_both_paths():
    problem, pert = interpolating_mlp(1, "se")
    dense = estimate(problem, pert, "gauss-newton", dense=True)
    free = estimate(problem, pert, "gauss-newton", solve=SolveOptions(maxiter=400, rule="fixed", rtol=1e-12))
    members = dense.sample(3, torch.Generator().manual_seed(0))
    # points off the set by a known normal offset: e(D, C) is that offset
    normal = torch.randn(problem.p, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    normal = normal - dense.null_space(normal)
    normal = 0.01 * normal / normal.norm()
    D = members + normal
    for est in (dense, free):
        h = est.hausdorff(D)
        assert h >= 0.01 - 1e-6  # at least the normal offset
        assert est.excess_over(D) <= est.radius * 2 + 0.01
        assert abs(max(est.distance(d) for d in D) - 0.01) < 1e-5


def test_validated_rule_beats_tiny_cutoff_on_overparameterized_net():
    """A pseudo-inverse with a tiny cut-off divides by rounding noise; the validated rule does not."""
    problem = small_problem(seed=1, n=10, d=4, hidden=12, k=3, act=nn.ReLU, loss="se", batch_size=10)
    problem.params = retrain(problem, gtol=1e-12, max_iter=5000).w
    pert = gradient_perturbation(problem, torch.arange(3), 0.01)
    validated = estimate(problem, pert, "hessian", dense=True)
    tiny = estimate(problem, pert, "hessian", dense=True, solve=SolveOptions(rule="fixed", tau=1e-14))
    before = problem.risk(perturbation=pert)
    assert problem.risk(validated.centre, pert) < before
    assert problem.risk(validated.centre, pert) <= problem.risk(tiny.centre, pert)


def test_influence_method_is_a_point_with_the_same_result_type():
    problem, pert = interpolating_mlp(2, "se")
    est = estimate(problem, pert, "influence")
    assert est.null_space.dim == 0 and est.null_radius == 0.0
    assert torch.equal(est.sample(3, torch.Generator()), est.centre.expand(3, -1))
    assert set(est.summary()) >= {"feasibility_residual", "output_residual", "cost", "radius"}


def test_the_validated_band_is_measured_on_the_reduction_when_unmoved_points_dominate():
    """Risk 1.0 at w̄, best 0.999: a 5 % band on the risk (0.05) would admit candidates worse than
    not moving at all; the band on the reduction (0.001) does not."""
    from setsens.solution_set import _band

    assert _band(0.999, 1.0, 0.05) == pytest.approx(0.999 + 0.05 * 0.001)
    assert _band(0.999, 1.0, 0.05) < 1.0
    assert _band(0.01, 1.0, 0.05) == pytest.approx(0.0105)  # far below w̄: 5 % of the risk, as before
    assert _band(1.2, 1.0, 0.05) == 1.2  # nothing improves on w̄: exact ties only


def test_a_solve_option_the_method_does_not_read_is_refused():
    problem = small_problem()
    pert = gradient_perturbation(problem, [0, 1], 0.01)
    for method, options in (("gauss-newton", dict(min_norm=False)), ("hessian", dict(sketch=5)),
                            ("influence", dict(rule="fixed")), ("gauss-newton", dict(influence_damping=1e-2))):
        with pytest.raises(ValueError, match=f"SolveOptions.{next(iter(options))} not read by method '{method}'"):
            estimate(problem, pert, method, solve=SolveOptions(**options))
    with pytest.raises(ValueError, match=r"SolveOptions.maxiter not read by method 'hessian' \(dense\)"):
        estimate(problem, pert, "hessian", dense=True, solve=SolveOptions(maxiter=5))


def test_without_a_null_space_the_matrix_free_set_is_its_centre_as_the_dense_one():
    """With weight decay H is non-singular: a random direction's null projection is rounding, not a direction
    (the radius search used to normalise it and report ρ ≈ 0.03, determined)."""
    base = small_problem()
    problem = Problem(base.model, cross_entropy, (base.inputs, base.targets), weight_decay=0.1)
    pert = gradient_perturbation(problem, [0, 1], 0.01)
    assert float(torch.linalg.eigvalsh(dense_hessian(problem)).abs().min()) > 1e-3
    for dense in (True, False):
        est = estimate(problem, pert, "hessian", dense=dense)
        assert est.radius_record["rho"] == 0.0 and not est.radius_record["determined"]
