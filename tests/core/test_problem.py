"""Problem: the caller's model mode is kept, a shuffling loader is refused, loss properties."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

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
