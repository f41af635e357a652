"""A small CIFAR-10 CNN with biases everywhere (conv, BatchNorm, max pooling, two dense layers), trained on
the 1000 shared training images with Adam and random flips, as people train one; certified on 500 held-out
images by ``setsens weights --model examples/weights/cifar_cnn.py:model --checkpoint cifar_cnn.pt
--data examples/weights/cifar_cnn.py:data``.

    python examples/weights/cifar_cnn.py            # trains it (about a minute on 2 cores), writes cifar_cnn.pt
"""

from pathlib import Path

import torch
from torch import nn

from setsens.data.cifar import load_cifar10

SUBSET = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "cifar10-subset.npz"


def model():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def data(n: int = 1000, n_test: int = 500):
    x, y = load_cifar10(SUBSET, "train", n=n, seed=0)
    xt, yt = load_cifar10(SUBSET, "test", n=n_test, seed=0)
    return x, y, xt, yt


def train(net, x, y, epochs: int = 40, batch: int = 50, seed: int = 0):
    """Adam (lr 1e-3, weight decay 5e-4), minibatches in a seeded order, each image flipped left–right at random."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=5e-4)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch):
            xb = x[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            opt.zero_grad()
            nn.functional.cross_entropy(net(xb), y[idx]).backward()
            opt.step()
    return net.eval()


if __name__ == "__main__":
    torch.manual_seed(0)
    x, y, xt, yt = data()
    net = train(model(), x, y)
    with torch.no_grad():
        print(f"train accuracy {(net(x).argmax(1) == y).float().mean():.3f}, "
              f"held-out accuracy {(net(xt).argmax(1) == yt).float().mean():.3f}")
    torch.save(net.state_dict(), "cifar_cnn.pt")
