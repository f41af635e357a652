"""Reference architectures."""

from .mlp import mlp
from .resnet import cifar_resnet, load_cifar_resnet

__all__ = ["mlp", "cifar_resnet", "load_cifar_resnet"]
