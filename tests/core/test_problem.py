"""Problem: the caller's model mode is kept, a shuffling loader is refused, loss properties."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from problems import small_problem
from setsens.problem import Problem, cross_entropy, squared_error


def data(n=10):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (n,), generator=g)


def test_the_callers_model_keeps_its_mode_and_batchnorm_is_evaluated_in_eval_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().train()
    x, y = data()
    problem = Problem(model, cross_entropy, (x, y))
    problem.risk()
    assert model.training and all(m.training for m in model.modules())
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(model.eval()(x), y))
    assert problem.risk() == pytest.approx(expected, rel=1e-12)  # running statistics, not batch ones


def test_a_shuffling_loader_is_refused():
    x, y = data()
    with pytest.raises(ValueError, match="shuffle"):
        Problem(nn.Linear(3, 2).double(), cross_entropy, DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True))
    ok = Problem(nn.Linear(3, 2).double(), cross_entropy, DataLoader(TensorDataset(x, y), batch_size=4))
    assert ok.n == 10


def test_loss_properties_declared_or_detected():
    x, y = data()
    model = nn.Linear(3, 2).double()
    assert Problem(model, cross_entropy, (x, y)).loss_ignores_output_shift
    assert Problem(model, squared_error, (x, y)).loss_is_squared_error

    def my_cross_entropy(out, t):  # a user's own, undeclared: detected numerically
        return -torch.log_softmax(out, dim=1).gather(1, t[:, None])[:, 0]

    def my_mse(out, t):
        return 0.5 * ((out - nn.functional.one_hot(t, 2).to(out)) ** 2).sum(dim=1)

    mine = Problem(model, my_cross_entropy, (x, y))
    assert mine.loss_ignores_output_shift and not mine.loss_is_squared_error
    mse = Problem(model, my_mse, (x, y))
    assert mse.loss_is_squared_error and not mse.loss_ignores_output_shift


def test_weight_decay_adds_its_term_to_risk_gradient_and_hessian():
    from setsens.operators import Hessian, dense_hessian

    plain = small_problem()
    decayed = Problem(plain.model, plain.loss, (plain.inputs, plain.targets), batch_size=5, weight_decay=0.3)
    w = plain.params
    assert decayed.risk() == pytest.approx(plain.risk() + 0.15 * float(w @ w), rel=1e-12)
    assert torch.allclose(decayed.gradient(), plain.gradient() + 0.3 * w, atol=1e-12)
    H = dense_hessian(decayed)
    assert torch.allclose(H, dense_hessian(plain) + 0.3 * torch.eye(plain.p, dtype=w.dtype), atol=1e-10)
    v = torch.randn(plain.p, dtype=w.dtype)
    assert torch.allclose(Hessian(decayed)(v), H @ v, atol=1e-10)
    with pytest.raises(ValueError, match="weight_decay"):
        Problem(plain.model, plain.loss, (plain.inputs, plain.targets), weight_decay=-1.0)


def test_attention_models_get_forward_mode_derivatives():
    """nn.TransformerEncoderLayer's fused CPU attention has no forward-mode AD; the Problem evaluates
    attention through the math kernel so that H v (forward over reverse) works and matches the dense H."""
    from setsens.operators import Hessian, dense_hessian

    torch.manual_seed(0)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.TransformerEncoderLayer(8, nhead=2, dim_feedforward=8, dropout=0.0, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.encoder(x).mean(dim=1))

    x = torch.randn(6, 3, 8, dtype=torch.float64)
    problem = Problem(Tiny().double().eval(), cross_entropy, (x, torch.tensor([0, 1, 0, 1, 1, 0])))
    v = torch.randn(problem.p, dtype=torch.float64)
    w, h = problem.params, 1e-6
    finite_difference = (problem.gradient(w + h * v) - problem.gradient(w - h * v)) / (2 * h)
    for hv in (Hessian(problem)(v), dense_hessian(problem) @ v):
        assert float((hv - finite_difference).norm() / finite_difference.norm()) < 1e-7
    single = Problem(problem.model.float(), cross_entropy, (x.float(), problem.targets))  # the fused fast path's dtype
    hv = Hessian(single)(v.float()).double()
    assert float((hv - finite_difference).norm() / finite_difference.norm()) < 1e-3
    from setsens.function_space import output_shift
    from setsens.problem import Perturbation

    dx = torch.randn(2, 3, 8)
    r = output_shift(single, Perturbation(torch.tensor([0, 1]), dx))[:2]  # forward mode in x, no reverse pass
    with torch.no_grad():
        f = lambda t: single.outputs(single.params, x[:2].float() + t * dx)
        assert torch.allclose(r, (f(1e-3) - f(-1e-3)) / 2e-3, rtol=1e-2, atol=1e-4)
    assert torch.backends.mha.get_fastpath_enabled()  # the caller's setting is back


def _regression(n=12):
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return model, x, torch.sin(x.sum(1))


def _my_mse(out, t):  # a user's own squared error, written for targets of the outputs' shape
    return 0.5 * ((out - t) ** 2).sum(dim=1)


@pytest.mark.parametrize("loss", [squared_error, _my_mse])
def test_a_one_dimensional_regression_target_is_the_column_it_stands_for(loss):
    """Targets (n,) against outputs (n, 1) once broadcast to n × n inside the loss (each point's error summed over
    every target): now every path — risk, estimate, Levenberg–Marquardt, a DataLoader — matches (n, 1) targets."""
    from setsens import estimate, gradient_perturbation
    from setsens.retrain import levenberg_marquardt

    model, x, y = _regression()
    flat, column = Problem(model, loss, (x, y), batch_size=5), Problem(model, loss, (x, y[:, None]), batch_size=5)
    loader = Problem(model, loss, DataLoader(TensorDataset(x, y), batch_size=5))
    with torch.no_grad():
        expected = 0.5 * float(((model(x)[:, 0] - y) ** 2).mean())
    for p in (flat, column, loader):
        assert p.risk() == pytest.approx(expected, rel=1e-12)
    pert = gradient_perturbation(column, [1, 4], 0.01)
    shifts = [estimate(p, pert, "gauss-newton").shift for p in (flat, column, loader)]
    assert all(float((s - shifts[1]).norm()) <= 1e-10 * float(shifts[1].norm()) for s in shifts)
    assert torch.allclose(estimate(flat, pert, "hessian").shift, estimate(column, pert, "hessian").shift,
                          rtol=0, atol=1e-10 * float(shifts[1].norm()))
    if loss is squared_error:
        fits = [levenberg_marquardt(p, None, pert, max_iter=5).w for p in (flat, column)]
        assert float((fits[0] - fits[1]).norm()) <= 1e-10 * float(fits[1].norm())


@pytest.mark.parametrize("targets, loss, message", [
    (lambda y: torch.stack([y, y], 1), squared_error, r"targets of shape \(2,\) per point do not match outputs"),
    (lambda y: y[:, None, None].expand(-1, 1, 3), squared_error, r"\(1, 3\) per point do not match"),
    (lambda y: y, lambda out, t: 0.5 * ((out - t[:, None, None]) ** 2).sum(dim=(1, 2)), "depends on the other points"),
    (lambda y: y, cross_entropy, "use the loss squared_error"),
])
def test_targets_that_do_not_match_the_outputs_are_refused_in_one_line(targets, loss, message):
    model, x, y = _regression()
    with pytest.raises(ValueError, match=message) as err:
        Problem(model, loss, (x, targets(y)))
    assert "\n" not in str(err.value)
