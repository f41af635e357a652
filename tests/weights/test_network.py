"""Reading an nn.Sequential into weight matrices, and what it refuses."""

import pytest
import torch
from torch import nn

from setsens.weights.network import UnsupportedNetworkError, forward, network_from_model


@pytest.mark.parametrize(
    "model, match",
    [
        (nn.Sequential(nn.Conv2d(1, 2, 3)), "Conv2d"),
        (nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 2, bias=False)), "negative values"),
        (nn.Sequential(nn.Linear(3, 4, bias=False), nn.Sigmoid(), nn.Linear(4, 2, bias=False)), "σ\\(0\\) ≠ 0"),
        (nn.Sequential(nn.Linear(3, 4, bias=False), nn.LeakyReLU(), nn.Linear(4, 2, bias=False)), "negative values"),
        (nn.Sequential(nn.Linear(3, 4, bias=False), nn.Hardtanh(), nn.Linear(4, 2, bias=False)), "min_val = 0"),
        (nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), "biases"),
        (nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False)), "consecutive"),
        (nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU()), "end with"),
        (nn.Linear(3, 2, bias=False), "nn.Sequential"),
    ],
)
def test_unsupported_networks(model, match):
    with pytest.raises(UnsupportedNetworkError, match=match):
        network_from_model(model)


def test_network_from_model_roundtrip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5, bias=False), nn.ReLU6(), nn.Linear(5, 3, bias=False))
    W, b, act = network_from_model(model)
    assert b is None and act == "relu6"
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(forward([w.detach() for w in W], x.flatten(1), act), model(x))
    Wb, bb, _ = network_from_model(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), allow_bias=True)
    assert len(bb) == 2
