"""A small CNN with BatchNorm and biases on 8×8 digits, trained in float32 with Adam (as people train)."""

import torch
from torch import nn

from _digits import digits, fit


def model():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))


def data():
    x, y, xt, yt = digits()
    return x.reshape(-1, 1, 8, 8), y, xt.reshape(-1, 1, 8, 8), yt


def train(net, x, y, steps=300):
    return fit(net, x, y, torch.optim.Adam(net.parameters(), lr=1e-2), steps)


if __name__ == "__main__":  # trains it and writes cnn.pt: stands in for your own trained model
    torch.manual_seed(0)
    x, y, _, _ = data()
    torch.save(train(model(), x, y).state_dict(), "cnn.pt")
