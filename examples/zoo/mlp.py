"""An MLP with biases on 8×8 digits, trained with Adam and weight decay."""

import torch
from torch import nn

from _digits import digits, fit


def model():
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def data():
    return digits()


def train(net, x, y, steps=500):
    return fit(net, x, y, torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=1e-4), steps)


if __name__ == "__main__":  # trains it and writes mlp.pt: stands in for your own trained model
    torch.manual_seed(0)
    x, y, _, _ = data()
    torch.save(train(model(), x, y).state_dict(), "mlp.pt")
