"""scikit-learn's 8×8 digits (shipped with scikit-learn, no download)."""

from __future__ import annotations

import torch
from torch import Tensor


def load_digits_subset(n: int = 300, seed: int = 0, dtype=torch.float64, test: bool = False):
    """``n`` digits drawn at random (seeded), pixels scaled to [0, 1]; labels as int64.

    Returns ``(x, y)``, or ``(x, y, x_test, y_test)`` with the remaining images when ``test``.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    if not 0 < n <= len(data.target):
        raise ValueError(f"n must be in [1, {len(data.target)}], got {n}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.target), generator=g)
    x = torch.as_tensor(data.data, dtype=dtype) / 16.0
    y = torch.as_tensor(data.target, dtype=torch.long)
    train, rest = order[:n], order[n:]
    if test:
        return x[train], y[train], x[rest], y[rest]
    return x[train], y[train]


def one_hot(y: Tensor, k: int = 10, dtype=torch.float64) -> Tensor:
    return torch.nn.functional.one_hot(y, k).to(dtype)
