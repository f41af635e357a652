"""setsens.analyze: the verdict, the predictions and the validation against retraining."""

import pytest
import torch
from torch import nn

from setsens.analysis import analyze, choose_method
from setsens.krylov import power_iteration
from setsens.operators import Hessian
from setsens.perturb import gradient_perturbation
from setsens.problem import NotStationaryWarning, Problem, cross_entropy, squared_error
from setsens.retrain import budget_response, levenberg_marquardt


def fitted(seed=0, n=12, k=2, hidden=8):
    """A tanh MLP fitted exactly (Levenberg–Marquardt) to n random points, plus held-out points."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, k)).double()
    x = torch.randn(n + 40, 3, generator=g, dtype=torch.float64)
    y = torch.randn(n + 40, k, generator=g, dtype=torch.float64)
    problem = Problem(model, squared_error, (x[:n], y[:n]))
    fit = levenberg_marquardt(problem, gtol=1e-13, max_iter=300)
    assert fit.converged
    return Problem(model, squared_error, (x[:n], y[:n]), params=fit.w), (x[n:], y[n:])


def test_auto_method_follows_the_loss():
    problem, _ = fitted()
    assert choose_method(problem)[0] == "gauss-newton"
    ce = Problem(nn.Linear(3, 2).double(), cross_entropy, (torch.randn(4, 3, dtype=torch.float64),
                                                             torch.tensor([0, 1, 0, 1])))
    assert choose_method(ce)[0] == "hessian"


def test_on_a_stationary_fit_the_verdict_passes_and_retraining_agrees():
    problem, test = fitted()
    pert = gradient_perturbation(problem, [2, 7], 0.01)
    a = analyze(problem, pert, test=test, validate=True, steps=1000)
    names = {c.name: c for c in a.verdict.checks}
    assert names["stationarity"].status == "pass" and names["output_residual"].status == "pass"
    v = a.validation
    ref = v["reference_run"]
    assert v["reference_stable"] and ref["stable"] and ref["output_change_norm"] > 1e3 * ref["output_drift_norm"]
    assert v["pearson"] >= 0.9 and v["pearson"] >= v["influence_pearson"] - 1e-3
    assert a.loss_on_points.increase_removed > 0.9
    s = a.summary()
    assert s["verdict"]["status"] in ("pass", "warn") and s["method"] == "gauss-newton"
    assert s["predictions"]["held_out"]["points"] == 40
    assert len(s["set"]["member_distances_from_w_bar"]) == 8


def decayed_classifier():
    """A cross-entropy tanh MLP with weight decay, polished to stationarity, and 40 held-out points."""
    from setsens.retrain import retrain

    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(70, 3, generator=g, dtype=torch.float64)
    y = x.argmax(1)
    problem = Problem(model, cross_entropy, (x[:30], y[:30]), weight_decay=1e-2)
    problem.params = retrain(problem, gtol=1e-9, max_iter=5000).w
    return problem, x, y


def test_with_weight_decay_the_converged_reference_validates_a_classifier():
    """The classifier's minimiser is isolated, so the reference is L-BFGS to convergence (tolerance-
    independent), and eq. 19 — here −H⁻¹JΔx — matches it on held-out outputs to first order (the
    relative error falls with the step)."""
    problem, x, y = decayed_classifier()
    errors = []
    for step in (0.05, 0.01):
        pert = gradient_perturbation(problem, [2, 7], step)
        a = analyze(problem, pert, test=(x[30:], y[30:]), validate=True, steps=3000, members=0)
        ref = a.validation["reference_run"]
        assert ref["kind"] == "converged_response" and ref["stable"] and ref["converged"]
        assert a.method == "hessian" and a.verdict.status == "pass"
        errors.append(a.validation["relative_error"])
    assert a.validation["pearson"] >= 0.999 and errors[1] < 0.05 and errors[1] < errors[0] / 3
    with pytest.raises(ValueError, match="needs weight decay"):
        analyze(fitted()[0], pert, reference="converged")


def test_the_first_order_check_grows_with_the_step_and_flags_a_large_move():
    """The uncancelled share of the gradient change is O(‖Δx‖) for the exact eq.-19 centre: doubling a
    small step doubles it; a large move fails the check, which no other check sees."""
    from setsens.solution_set import RadiusOptions, SolveOptions, estimate
    from setsens.verdict import LossOnPoints, assess, first_order_residual

    problem, _, _ = decayed_classifier()
    residual = {}
    for step in (0.005, 0.01, 1.0):
        pert = gradient_perturbation(problem, [2, 7], step)
        est = estimate(problem, pert, "hessian", dense=True, solve=SolveOptions(rule="fixed", tau=1e-12),
                       radius=RadiusOptions(directions=0))
        residual[step] = first_order_residual(est)
        checks = {c.name: c for c in assess(est, LossOnPoints(1.0, 2.0, 1.5), residual[step]).checks}
        assert checks["first_order"].value == residual[step]
    assert 1.7 < residual[0.01] / residual[0.005] < 2.3 and residual[0.01] < 0.1
    assert checks["first_order"].status == "fail" and "relative_step" in checks["first_order"].advice
    assert checks["stationarity"].status == "pass" and checks["feasibility_residual"].status == "pass"


def test_the_verdict_fails_where_w_bar_is_far_from_stationary():
    problem, test = fitted()
    moved = Problem(problem.model, squared_error, (problem.inputs, problem.targets),
                    params=problem.params + 0.05 * torch.randn(problem.p, generator=torch.Generator().manual_seed(1),
                                                               dtype=torch.float64))
    pert = gradient_perturbation(moved, [2, 7], 0.001)
    with pytest.warns(NotStationaryWarning):
        a = analyze(moved, pert, test=test)
    check = next(c for c in a.verdict.checks if c.name == "stationarity")
    assert check.status == "fail" and check.value > 1 and "stationary" in check.advice
    assert a.verdict.status == "fail"


def test_classifier_predictions_report_flips_margins_and_the_sets_spread():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    problem = Problem(model, cross_entropy, (x[:20], y[:20]))
    pert = gradient_perturbation(problem, [0, 1], 0.2)
    with pytest.warns(NotStationaryWarning):
        a = analyze(problem, pert, test=(x[20:], y[20:]), members=4, method="gauss-newton")
    held = a.predictions["held_out"]
    assert held["points"] == 10 and set(held) >= {"accuracy", "flips", "margin_change", "undetermined_by_set"}
    m0, m1 = (torch.tensor(held["margins"][k], dtype=torch.float64) for k in ("before", "estimate"))
    out0 = problem.outputs(problem.params, x[20:])
    assert torch.allclose(m0, out0.gather(1, y[20:, None])[:, 0] - out0.gather(1, 1 - y[20:, None])[:, 0])
    flipped = ((m0 > 0) != (m1 > 0)).sum()  # two classes: a flip is a margin sign change
    assert held["flips"]["count"] == int(flipped)
    assert a.members.shape == (4, problem.p) and torch.cdist(a.members, a.members).max() > 0


def test_budget_response_cancels_the_common_drift():
    """On a quadratic risk, gradient descent's perturbed-minus-clean difference is the filtered
    −H⁺JΔx whatever the start: from a non-stationary w̄ it equals the difference from the minimiser."""
    problem, _ = fitted()
    pert = gradient_perturbation(problem, [1], 0.01)
    ref = budget_response(problem, pert, steps=50)
    assert ref.drift < 1e-8  # stationary: the clean run stays
    assert float(ref.shift.norm()) > 0 and 0 <= ref.change_when_halved
    with pytest.raises(ValueError, match="at least 2"):
        budget_response(problem, pert, steps=1)


def test_budget_response_shares_its_clean_run():
    """With ``clean_runs`` the clean run is done once per step size and reused: the same answer as without, and a
    second perturbation's response (a different shift) takes its clean run from the cache."""
    problem, _ = fitted()
    runs = {}
    first = budget_response(problem, gradient_perturbation(problem, [1], 0.01), steps=20, clean_runs=runs)
    assert len(runs) == 1
    (key, (end, half)), = runs.items()
    assert torch.equal(end, first.clean) and key[0] == first.lr
    other = gradient_perturbation(problem, [2], 0.01)
    shared = budget_response(problem, other, steps=20, lr=first.lr, clean_runs=runs)
    alone = budget_response(problem, other, steps=20, lr=first.lr)
    assert len(runs) == 1 and torch.equal(shared.shift, alone.shift)
    assert shared.change_when_halved == alone.change_when_halved
    assert not torch.allclose(shared.shift, first.shift)


def test_budget_response_halves_a_step_that_diverges():
    """At 64/λ_max the plain run blows up (checked); the guard halves the step until both runs lower
    their risk, and the result is the run at the step it settled on."""
    problem, _ = fitted()
    pert = gradient_perturbation(problem, [1], 0.01)
    start = torch.randn(problem.p, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lam = float(power_iteration(Hessian(problem), start, 30).values[0])
    w = problem.params.clone()
    opt = torch.optim.SGD([w], lr=64 / lam, momentum=0.9, nesterov=True)
    for _ in range(50):
        w.grad = problem.gradient(w.detach(), pert)
        opt.step()
    assert not problem.risk(w.detach(), pert) <= problem.risk(problem.params, pert)  # diverged (or NaN)
    ref = budget_response(problem, pert, steps=50, lr=64 / lam)
    assert ref.halvings >= 1 and ref.lr == 64 / lam / 2**ref.halvings
    assert problem.risk(ref.perturbed, pert) <= problem.risk(problem.params, pert)
    again = budget_response(problem, pert, steps=50, lr=ref.lr)
    assert again.halvings == 0 and torch.equal(again.perturbed, ref.perturbed)
    with pytest.raises(RuntimeError, match="diverged"):
        budget_response(problem, pert, steps=50, lr=64 / lam, max_halvings=0)


@pytest.mark.parametrize("activation, low, high", [(nn.ReLU, 0.5, 2.0), (nn.Tanh, 0.0, 1e-4)])
def test_the_kink_check_sees_a_relu_at_exactly_zero(activation, low, high):
    """One hidden unit whose pre-activation on the first point is exactly 0, where a ReLU's loss has a
    kink (its slope jumps by the point's residual): the gradient misses the risk's slope by most of it.
    The same network with tanh is smooth there, and the check reads 0."""
    from types import SimpleNamespace

    from setsens.verdict import kink

    model = nn.Sequential(nn.Linear(1, 1), activation(), nn.Linear(1, 1, bias=False)).double()
    x = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    y = torch.tensor([[0.5], [1.9]], dtype=torch.float64)  # residuals −0.5 (at the kink) and 0.1 (or tanh's)
    problem = Problem(model, squared_error, (x, y), params=torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))
    shift = torch.full((3,), 0.01, dtype=torch.float64)
    assert low <= kink(SimpleNamespace(problem=problem, w_bar=problem.params, shift=shift)) <= high
