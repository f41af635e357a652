"""The theory-driven loss (against a direct computation) and the acceptance check on digits."""

import pytest
import torch
from torch import nn

from setsens.weights.bounds import margin_change_bound, relative_budget
from setsens.weights.certify import certified_accuracy
from setsens.data.digits import load_digits_split
from setsens.weights.network import forward, layer_norms
from setsens.weights.training import TrainConfig, model_weights, robust_loss, train_mlp

D = torch.float64


def test_robust_loss_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    W = [torch.randn(5, 4, generator=g, dtype=D), torch.randn(3, 5, generator=g, dtype=D)]
    x = torch.rand(7, 4, generator=g, dtype=D)
    y = torch.randint(0, 3, (7,), generator=g)
    lam, mu, rho = 0.7, 0.01, 0.02
    logits = forward(W, x)
    eta = margin_change_bound(W, x, y, relative_budget(W, rho))
    hinge = []
    for j in range(7):
        hinge.append(max(max(0.0, float(eta[j, i] - (logits[j, y[j]] - logits[j, i]))) for i in range(3) if i != y[j]))
    expected = float(nn.functional.cross_entropy(logits, y)) + lam * sum(hinge) / 7 + mu * float(layer_norms(W).sum())
    loss, parts = robust_loss(W, x, y, lam, mu, rho)
    assert abs(float(loss) - expected) < 1e-10
    assert abs(parts["robust_term"] - sum(hinge) / 7) < 1e-12
    eta_max = [max(float(eta[j, i]) for i in range(3) if i != y[j]) for j in range(7)]
    loss2, _ = robust_loss(W, x, y, lam, 0.0, rho, variant="max_eta")
    assert abs(float(loss2) - float(nn.functional.cross_entropy(logits, y)) - lam * sum(eta_max) / 7) < 1e-10
    loss0, _ = robust_loss(W, x, y, 0.0, 0.0, rho)
    assert abs(float(loss0) - float(nn.functional.cross_entropy(logits, y))) < 1e-12
    # the normalised hinge is invariant to rescaling a layer (as the certificate is)
    a, _ = robust_loss(W, x, y, 1.0, 0.0, rho, variant="hinge_normalized")
    b, _ = robust_loss([W[0] * 3.0, W[1]], x, y, 1.0, 0.0, rho, variant="hinge_normalized")
    c, _ = robust_loss([W[0] * 3.0, W[1]], x, y, 0.0, 0.0, rho)
    assert abs((float(a) - float(robust_loss(W, x, y, 0.0, 0.0, rho)[0])) - (float(b) - float(c))) < 1e-10
    with pytest.raises(ValueError, match="variant"):
        robust_loss(W, x, y, 1.0, 0.0, rho, variant="bogus")


def test_config_validation():
    with pytest.raises(ValueError):
        TrainConfig(lam=-1.0)
    with pytest.raises(ValueError):
        TrainConfig(variant="nope")
    with pytest.raises(ValueError):
        TrainConfig(epochs=0)


def test_training_is_deterministic():
    x = torch.rand(40, 6, generator=torch.Generator().manual_seed(1))
    y = torch.arange(40) % 3
    cfg = TrainConfig(hidden=(8,), epochs=2, batch_size=16, lam=0.1)
    m1, h1 = train_mlp(x, y, 3, cfg, seed=3)
    m2, h2 = train_mlp(x, y, 3, cfg, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model_weights(m1), model_weights(m2)))
    assert h1 == h2 and all(l.bias is None for l in m1 if isinstance(l, nn.Linear))


def test_robust_loss_raises_certified_accuracy_on_digits():
    """Acceptance (small version): ≥ 10 points of certified accuracy at ρ = 1 % over standard training."""
    torch.manual_seed(0)
    xtr, ytr, xte, yte, _ = load_digits_split(0)
    res = {}
    for lam in (0.0, 0.1):
        cfg = TrainConfig(hidden=(32,), epochs=10, lr=5e-3, batch_size=128, lam=lam, train_budget=0.01, ramp_epochs=3)
        model, _ = train_mlp(xtr, ytr, 10, cfg, seed=0)
        W = [w.detach() for w in model_weights(model)]
        clean = float((forward(W, xte).argmax(1) == yte).double().mean())
        res[lam] = (clean, certified_accuracy(W, xte, yte, relative_budget(W, 0.01)))
    assert res[0.1][1] >= res[0.0][1] + 0.10, res
    assert res[0.1][0] >= 0.85, res
