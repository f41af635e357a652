import pytest
import torch
from torch import nn

from setsens.problem import Problem, cross_entropy, squared_error


def small_problem(seed=0, n=12, d=3, hidden=4, k=2, act=nn.Tanh, bias=True, loss="ce", batch_size=5):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, hidden, bias=bias), act(), nn.Linear(hidden, k, bias=bias)).double()
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    fn = cross_entropy if loss == "ce" else squared_error
    return Problem(model, fn, (x, y), batch_size=batch_size)


@pytest.fixture
def problem():
    return small_problem()
