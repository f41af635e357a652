import pytest
import torch

from setsens.landscape import filter_normalized_direction, landscape, plane_directions
from setsens.models.mlp import mlp
from setsens.problem import Problem, cross_entropy


def test_landscape_equals_direct_evaluations():
    torch.manual_seed(0)
    model = mlp([5, 7, 3], bias=True).double()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    prob = Problem(model, cross_entropy, (x, y))
    est = prob.params + 0.1 * torch.randn(prob.p, dtype=torch.float64)
    d1, d2 = plane_directions(prob, est, torch.Generator().manual_seed(0))
    assert abs(float(d1 @ d2)) < 1e-10 and float(d2.norm()) == pytest.approx(float(d1.norm()))
    ls = landscape(prob, d1, d2, [-1, 0, 1, 2], [0, 0.5], marks={"original": prob.params, "est": est})
    for i, b in enumerate([0, 0.5]):
        for j, a in enumerate([-1, 0, 1, 2]):
            assert ls.loss[i, j] == pytest.approx(prob.risk(prob.params + a * d1 + b * d2), rel=1e-12)
    a, b, off, loss = ls.marks["est"]
    assert (a, b) == pytest.approx((1.0, 0.0), abs=1e-10) and off < 1e-10 and loss == pytest.approx(ls.loss[0, 2])
    assert ls.marks["original"][:3] == pytest.approx((0.0, 0.0, 0.0), abs=1e-12)
    # filter normalisation: each row of each weight matrix has the norm of w̄'s row; biases get 0
    d = filter_normalized_direction(prob, torch.Generator().manual_seed(3))
    for (name, sl), shape in zip(prob.blocks(), prob.shapes):
        if len(shape) == 1:
            assert float(d[sl].abs().max()) == 0.0
        else:
            assert torch.allclose(d[sl].view(shape).norm(dim=1), prob.params[sl].view(shape).norm(dim=1))
    with pytest.raises(ValueError, match="plane kind"):
        plane_directions(prob, est, torch.Generator(), kind="bogus")
