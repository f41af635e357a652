"""Data loaders (no downloads needed for the defaults)."""

from .cifar import load_cifar10
from .digits import load_digits_subset

__all__ = ["load_digits_subset", "load_cifar10"]
