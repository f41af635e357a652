"""The shared CIFAR-10 ResNet-56 (checkpoint ../shared/data/resnet56-cifar10.th) on 50 shared training images
(eq. 19 and its null projections cost about 1 s a Hessian-vector product each on 2 CPU cores) and 200 held-out ones."""

from pathlib import Path

from setsens.data.cifar import load_cifar10
from setsens.models.resnet import cifar_resnet

SUBSET = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "cifar10-subset.npz"


def model():
    return cifar_resnet(56)


def data(n: int = 50, n_test: int = 200):
    x, y = load_cifar10(SUBSET, "train", n=n, seed=0)
    xt, yt = load_cifar10(SUBSET, "test", n=n_test, seed=0)
    return x, y, xt, yt
