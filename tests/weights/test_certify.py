"""Certificates: soundness against attacks, largest certified budget (closed form vs bisection)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from problems import weight_net
from setsens.weights.attacks import attacked_robust
from setsens.weights.bounds import relative_budget
from setsens.weights.certify import (
    certified_accuracy,
    certified_margin,
    certified_prediction,
    certify,
    max_certified_budget,
)
from setsens.weights.network import forward, layer_norms

D = torch.float64
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


SIZES = (3, 5, 4, 3)


@settings(max_examples=20, **SETTINGS)
@given(seed=st.integers(0, 10**6), layer=st.integers(0, 2))
def test_closed_form_equals_bisection_single_layer(seed, layer):
    W, x, y, _ = weight_net(seed, SIZES, 30)
    t_closed = max_certified_budget(W, x, y, layers=[layer], method="closed")
    t_bis = max_certified_budget(W, x, y, layers=[layer], method="bisection")
    torch.testing.assert_close(t_bis, t_closed, rtol=1e-9, atol=1e-12)


@settings(max_examples=20, **SETTINGS)
@given(seed=st.integers(0, 10**6))
def test_max_budget_is_the_certification_threshold(seed):
    W, x, y, _ = weight_net(seed, SIZES, 30)
    t = max_certified_budget(W, x, y)  # fraction of each layer's norm, all layers
    M = layer_norms(W)
    pos = t > 0
    assert pos.any()
    for j in torch.nonzero(pos).flatten().tolist():
        assert certify(W, x[j : j + 1], y[j : j + 1], (t[j] * (1 - 1e-6)) * M).all()
        assert not certify(W, x[j : j + 1], y[j : j + 1], (t[j] * (1 + 1e-6)) * M).any()


def test_wrong_predictions_have_zero_budget_and_certificate_implies_correct():
    W, x, y, _ = weight_net(1, SIZES, 30)
    wrong = (y + 1) % 3
    assert (max_certified_budget(W, x, wrong) == 0).all()
    assert not certify(W, x, wrong, [0.0, 0.0, 0.0]).any()
    assert certified_accuracy(W, x, y, [0.0, 0.0, 0.0]) == 1.0


def test_certified_prediction_agrees_with_certify_on_predicted_labels():
    W, x, y, _ = weight_net(2, SIZES, 30)
    eps = relative_budget(W, 0.01)
    pred, cert = certified_prediction(W, x, eps)
    assert torch.equal(pred, y)
    assert torch.equal(cert, certify(W, x, y, eps))
    assert certified_margin(W, x, y, eps).shape == (30,)


def test_certified_points_survive_attacks():
    W, x, y, g = weight_net(4, SIZES, 60)
    for frac in (0.002, 0.01, 0.05):
        eps = relative_budget(W, frac)
        cert = certify(W, x, y, eps)
        rob = attacked_robust(W, x, y, eps, steps=20, restarts=2, generator=g)
        assert not (cert & ~rob).any()


def test_certified_accuracy_decreases_with_budget():
    W, x, y, _ = weight_net(5, SIZES, 80)
    accs = [certified_accuracy(W, x, y, relative_budget(W, f)) for f in (0, 0.001, 0.01, 0.1, 1.0)]
    top2 = forward(W, x).topk(2, dim=1).values
    unique_max = float((top2[:, 0] > top2[:, 1]).double().mean())  # ties (dead ReLUs) are not certified
    assert accs == sorted(accs, reverse=True) and accs[0] == unique_max and accs[-1] < accs[0]


def test_errors():
    W, x, y, _ = weight_net(0, SIZES, 30)
    with pytest.raises(ValueError, match="closed form"):
        max_certified_budget(W, x, y, method="closed")
    with pytest.raises(ValueError, match="method"):
        max_certified_budget(W, x, y, method="newton")
    with pytest.raises(ValueError, match="at least one input"):
        certified_accuracy(W, x[:0], y[:0], [0.1] * 3)


def test_certify_with_the_clean_form_on_a_network():
    """``hidden="clean"``: the certificate of the tighter bound, a superset of the paper's."""
    from torch import nn

    from setsens.weights import margin_change_bound, margins, network_from_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                          nn.Linear(12, 3)).double()
    net = network_from_model(model, input_shape=(1, 4, 4)).detach()
    x = torch.rand(40, 1, 4, 4, dtype=D)
    y = forward(net, x).argmax(1)
    for fraction in (1e-3, 1e-2, 3e-2, 1e-1):
        e = relative_budget(net, fraction)
        paper, clean = certify(net, x, y, e), certify(net, x, y, e, hidden="clean")
        assert torch.equal(paper, certify(net, x, y, e, hidden="paper")) and bool((clean | ~paper).all())
        slack = (margins(forward(net, x), y) - margin_change_bound(net, x, y, e, hidden="clean"))
        expected = slack.masked_fill(torch.nn.functional.one_hot(y, 3).bool(), float("inf")).amin(1)
        assert torch.equal(certified_margin(net, x, y, e, hidden="clean"), expected)
