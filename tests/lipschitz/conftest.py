import pytest
import torch

from setsens.models.mlp import mlp
from setsens.problem import Problem, squared_error


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield


def interpolating_problem(widths, n, seed=0, reduction="mean"):
    """A DFCNN with random weights and targets ``y = f(x, w̄)``: w̄ interpolates exactly (∇L = 0)."""
    g = torch.Generator().manual_seed(seed)
    net = mlp(widths).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / p.shape[1] ** 0.5 * 1.5)
    x = torch.rand(n, widths[0], generator=g, dtype=torch.float64) + 0.1
    with torch.no_grad():
        y = net(x)
    return Problem(net, squared_error, (x, y), reduction=reduction)


def random_problem(widths, n, seed=0):
    """A DFCNN at random weights with random targets (not stationary)."""
    g = torch.Generator().manual_seed(seed)
    net = mlp(widths).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / p.shape[1] ** 0.5)
    x = torch.rand(n, widths[0], generator=g, dtype=torch.float64)
    y = torch.randn(n, widths[-1], generator=g, dtype=torch.float64)
    return Problem(net, squared_error, (x, y))


@pytest.fixture
def make_interpolating():
    return interpolating_problem


@pytest.fixture
def make_random():
    return random_problem
