"""Regression: a SiLU MLP with one output on scikit-learn's diabetes data (squared error), trained with Adam."""

import torch
from sklearn.datasets import load_diabetes
from torch import nn


def model():
    return nn.Sequential(nn.Linear(10, 32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 1))


def data(n_train: int = 300, seed: int = 0):
    """Standardised inputs and targets, split 300 / 142 (train / held-out); targets of shape (n, 1)."""
    d = load_diabetes()
    x = torch.as_tensor(d.data, dtype=torch.float32)
    y = torch.as_tensor(d.target, dtype=torch.float32)[:, None]
    x, y = (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = order[:n_train], order[n_train:]
    return x[tr], y[tr], x[te], y[te]


def train(net, x, y, steps=500):
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * ((net(x) - y) ** 2).sum(1).mean()).backward()
        opt.step()
    return net


if __name__ == "__main__":  # trains it and writes regression.pt: stands in for your own trained model
    torch.manual_seed(0)
    x, y, _, _ = data()
    torch.save(train(model(), x, y).state_dict(), "regression.pt")
