"""scikit-learn's 8×8 digits (shipped with scikit-learn, no download), pixels scaled to [0, 1]."""

from __future__ import annotations

import torch
from torch import Tensor


def _digits(dtype) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.as_tensor(data.data, dtype=dtype) / 16.0, torch.as_tensor(data.target, dtype=torch.long)


def load_digits_subset(n: int = 300, seed: int = 0, dtype=torch.float64, test: bool = False):
    """``n`` digits drawn at random (seeded); labels as int64.

    Returns ``(x, y)``, or ``(x, y, x_test, y_test)`` with the remaining images when ``test``.
    """
    x, y = _digits(dtype)
    if not 0 < n <= len(y):
        raise ValueError(f"n must be in [1, {len(y)}], got {n}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    train, rest = order[:n], order[n:]
    if test:
        return x[train], y[train], x[rest], y[rest]
    return x[train], y[train]


def load_digits_split(seed: int = 0, test_fraction: float = 0.2, dtype=torch.float32):
    """All 1797 digits in a stratified train/test split drawn with ``seed`` (scikit-learn's).

    Returns ``(x_train, y_train, x_test, y_test, class_names)``.
    """
    from sklearn.model_selection import train_test_split

    x, y = _digits(dtype)
    train, test = train_test_split(torch.arange(len(y)).numpy(), test_size=test_fraction, random_state=seed,
                                   stratify=y.numpy())
    train, test = torch.as_tensor(train), torch.as_tensor(test)
    return x[train], y[train], x[test], y[test], [str(c) for c in range(10)]

