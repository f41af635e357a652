"""Fully connected networks, including the paper's bias-free ReLU DFCNN (eq. 8)."""

from __future__ import annotations

from torch import nn


def mlp(widths: list[int], bias: bool = False, activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """``Linear → act → … → Linear`` with layer widths ``widths = [d, m_1, …, K]``.

    With ``bias=False`` and ReLU this is the DFCNN of the paper (eq. 8; a K-dimensional output
    layer generalises its scalar ``a``).

    >>> mlp([64, 32, 10])
    Sequential(
      (0): Linear(in_features=64, out_features=32, bias=False)
      (1): ReLU()
      (2): Linear(in_features=32, out_features=10, bias=False)
    )
    """
    if len(widths) < 2:
        raise ValueError("an MLP needs at least input and output widths")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)
