"""A CIFAR-10 CNN the zoo never saw: GroupNorm and GELU, trained with SGD and Nesterov momentum on 500 of the
shared CIFAR-10 images (../shared/data/cifar10-subset.npz); 200 held-out ones."""

from pathlib import Path

import torch
from torch import nn

from setsens.data.cifar import load_cifar10

SUBSET = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "cifar10-subset.npz"


def block(c_in, c_out, stride):
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(4, c_out), nn.GELU()]


def model():
    return nn.Sequential(*block(3, 16, 1), *block(16, 32, 2), *block(32, 32, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def data(n: int = 500, n_test: int = 200):
    x, y = load_cifar10(SUBSET, "train", n=n, seed=0)
    xt, yt = load_cifar10(SUBSET, "test", n=n_test, seed=0)
    return x, y, xt, yt


def train(net, x, y, epochs=150, batch=50):
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net


if __name__ == "__main__":  # trains it and writes gn_cnn.pt: stands in for your own trained model
    torch.manual_seed(0)
    x, y, _, _ = data()
    torch.save(train(model(), x, y).state_dict(), "gn_cnn.pt")
