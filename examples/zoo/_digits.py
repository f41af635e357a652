"""Shared by the zoo: scikit-learn's 8×8 digits split 300 / 500 (train / held-out), and full-batch training."""

import torch
from sklearn.datasets import load_digits


def digits(n_train: int = 300, n_test: int = 500, seed: int = 0):
    d = load_digits()
    order = torch.randperm(len(d.target), generator=torch.Generator().manual_seed(seed))
    x = torch.as_tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(d.target)
    tr, te = order[:n_train], order[n_train:n_train + n_test]
    return x[tr], y[tr], x[te], y[te]


def fit(net, x, y, optimizer, steps: int):
    """Full-batch cross-entropy training, as people train a small classifier."""
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    return net
