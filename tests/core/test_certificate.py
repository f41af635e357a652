"""setsens.certificate: its weight budgets hold every first-order move of K points (dense
pseudo-inverse), its κ is attained by one point, certified predictions survive the moves; the
first-order radius is attained by the linearised attack."""

import pytest
import torch
from problems import dfcnn_problem, small_problem
from torch import nn

from setsens.audit import GramFactor, input_jacobians, scan
from setsens.certificate import first_order_certificate, layer_weights, poisoning_certificate
from setsens.function_space import output_shift
from setsens.models.mlp import UnsupportedNetworkError
from setsens.problem import Perturbation, Problem, cross_entropy
from setsens.weights import forward


def setup():
    problem = dfcnn_problem([4, 12, 3], 6, seed=1, interpolating=True)  # p = 84 > n·K = 18
    x_eval = torch.rand(40, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.1
    return problem, scan(problem, GramFactor(problem)), x_eval


def dense_shift(problem, pert):
    return -torch.linalg.pinv(GramFactor(problem).G) @ output_shift(problem, pert).reshape(-1)


def test_budgets_hold_every_move_of_k_points():
    problem, result, x_eval = setup()
    delta = 1e-3
    cert = poisoning_certificate(problem, result, x_eval, [delta], points=2)
    x, _ = problem.points(torch.arange(problem.n))
    g = torch.Generator().manual_seed(3)
    largest = 0.0
    for _ in range(30):
        points = torch.randperm(problem.n, generator=g)[:2]
        d = torch.randn(2, 4, generator=g, dtype=torch.float64)
        d = d / d.norm(dim=1, keepdim=True) * delta * x[points].norm(dim=1, keepdim=True)
        v = dense_shift(problem, Perturbation(points, d))
        assert float(v.norm()) <= cert.kappa * delta * (1 + 1e-9)
        largest = max(largest, float(v.norm()) / (cert.kappa * delta))
        moved = layer_weights(problem, problem.params + v)
        for W0, W1, eps in zip(layer_weights(problem), moved, cert.budgets[0]):
            assert float((W1 - W0).abs().sum(dim=1).max()) <= float(eps) * (1 + 1e-9)  # ‖ΔWˡ‖_∞ ≤ ε_l
    assert largest > 0.05  # the bound is not vacuous by orders of magnitude


def test_one_point_kappa_is_attained_by_the_worst_direction():
    problem, result, x_eval = setup()
    cert = poisoning_certificate(problem, result, x_eval, [1e-3], points=1)
    x, _ = problem.points(torch.arange(problem.n))
    k = int((result.kappa * x.norm(dim=1)).argmax())
    v = dense_shift(problem, Perturbation(torch.tensor([k]), 1e-3 * x[k].norm() * result.direction[k][None]))
    assert float(v.norm()) == pytest.approx(cert.kappa * 1e-3, rel=1e-8)


def test_certified_predictions_survive_and_the_fraction_falls_with_the_budget():
    problem, result, x_eval = setup()
    deltas = [0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    cert = poisoning_certificate(problem, result, x_eval, deltas, points=2)
    fraction = cert.fraction
    assert fraction[0] == 1.0 and fraction[-1] < 1.0
    assert (fraction[1:] <= fraction[:-1]).all()
    i = int((fraction > 0).nonzero().max())  # the largest δ still certifying some points
    x, _ = problem.points(torch.arange(problem.n))
    g = torch.Generator().manual_seed(4)
    for _ in range(10):
        points = torch.randperm(problem.n, generator=g)[:2]
        d = torch.randn(2, 4, generator=g, dtype=torch.float64)
        d = d / d.norm(dim=1, keepdim=True) * deltas[i] * x[points].norm(dim=1, keepdim=True)
        moved = forward(layer_weights(problem, problem.params + dense_shift(problem, Perturbation(points, d))), x_eval)
        assert torch.equal(moved.argmax(1)[cert.certified[i]], cert.predictions[cert.certified[i]])
    assert cert.largest_delta(float(fraction[i])) == deltas[i]


def test_outside_the_setting_is_refused():
    problem = small_problem(loss="se", bias=True)
    with pytest.raises(UnsupportedNetworkError):
        layer_weights(problem)
    with pytest.raises(ValueError, match="ReLU"):
        layer_weights(small_problem(loss="se", bias=False))
    conv = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3, bias=False))
    images = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    problem = Problem(conv, cross_entropy, (images, torch.tensor([0, 1, 2, 0])))
    with pytest.raises(ValueError, match="need a bias-free ReLU MLP.*not a Sequential with convolutions"):
        layer_weights(problem)  # one line, not an unpacking error


def test_first_order_radius_is_attained_by_the_linearised_attack():
    problem, _, x_eval = setup()
    cert = first_order_certificate(problem, x_eval, [0.0, 1e-2], points=2)
    assert cert.fraction[0] == 1.0 and 0 < float(cert.radius.median()) < float("inf")
    x, _ = problem.points(torch.arange(problem.n))
    A = input_jacobians(problem)
    pinv = torch.linalg.pinv(GramFactor(problem).G)
    for t in cert.radius.argsort()[:3].tolist():  # the three least robust held-out points
        f = lambda w: problem.outputs(w, x_eval[t][None])[0]
        out, c = f(problem.params), int(cert.predictions[t])
        jac = torch.func.jacrev(f)(problem.params)
        worst = float("inf")
        for j in set(range(3)) - {c}:  # the linearised margin under the best move of the best 2 points
            u = pinv.T @ (jac[c] - jac[j])
            steps = torch.einsum("nkd,nk->nd", A, u.reshape(problem.n, -1))
            points = (steps.norm(dim=1) * x.norm(dim=1)).topk(2).indices
            delta = steps[points] / steps[points].norm(dim=1, keepdim=True) * x[points].norm(dim=1, keepdim=True)
            v = dense_shift(problem, Perturbation(points, float(cert.radius[t]) * delta))
            worst = min(worst, float(out[c] - out[j] + (jac[c] - jac[j]) @ v))
        assert abs(worst) < 1e-8 * float(out.abs().max())  # at its radius the prediction is on the edge


def test_the_budget_response_radius_is_attained_by_the_linearised_fine_tuning():
    """With ``training``: the radius of the budget response d_T = −φ_T(𝒢) J Δx (non-stationary tanh network,
    cross-entropy): at it, the best move of the best 2 points — from the dense 𝒢's eigendecomposition and the dense
    data Jacobian — puts the prediction on the edge; the set's radius is another number here."""
    from problems import smooth_mlp

    from setsens.filters import momentum_filter
    from setsens.finetune import Training
    from setsens.operators import dense_data_jacobian, dense_gauss_newton

    problem, (x_eval, _) = smooth_mlp()
    training = Training(steps=40, lr=0.5)
    cert = first_order_certificate(problem, x_eval, [0.0, 1e-2], points=2, training=training)
    assert cert.fraction[0] == 1.0 and 0 < float(cert.radius.median()) < float("inf")
    values, vectors = torch.linalg.eigh(dense_gauss_newton(problem))
    phi = vectors @ torch.diag(momentum_filter(values, training)) @ vectors.T  # φ_T(𝒢)
    J = dense_data_jacobian(problem, torch.arange(problem.n))  # (p, n·d)
    x, _ = problem.points(torch.arange(problem.n))
    for t in cert.radius.argsort()[:3].tolist():
        f = lambda w: problem.outputs(w, x_eval[t][None])[0]  # noqa: E731
        out, c = f(problem.params), int(cert.predictions[t])
        jac = torch.func.jacrev(f)(problem.params)
        worst = float("inf")
        for j in set(range(3)) - {c}:
            steps = (J.T @ (phi @ (jac[c] - jac[j]))).reshape(problem.n, -1)  # ∂m/∂Δx_k = −J_kᵀ φ_T ∇m
            points = (steps.norm(dim=1) * x.norm(dim=1)).topk(2).indices
            move = torch.zeros_like(x)
            move[points] = float(cert.radius[t]) * steps[points] / steps[points].norm(dim=1, keepdim=True) \
                * x[points].norm(dim=1, keepdim=True)
            d = -phi @ (J @ move.reshape(-1))
            worst = min(worst, float(out[c] - out[j] + (jac[c] - jac[j]) @ d))
        assert abs(worst) < 1e-8 * float(out.abs().max())
    middle = float(cert.radius.median())  # certified exactly where the radius exceeds δ: some are not
    halves = first_order_certificate(problem, x_eval, [middle], points=2, training=training)
    assert torch.equal(halves.certified[0], cert.radius > middle) and 0 < float(halves.fraction[0]) < 1
    set_radius = first_order_certificate(problem, x_eval, [0.0], points=2).radius
    assert float(((set_radius - cert.radius).abs() / cert.radius).median()) > 0.1
