"""Data sets for the weight-perturbation experiment, as float tensors in [0, 1] (I/O at the edge)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["load_digits_split", "load_cifar10_subset"]


def load_digits_split(seed: int = 0, test_fraction: float = 0.2, dtype=torch.float32):
    """scikit-learn's 8×8 digits (1797 images, pixels/16), stratified train/test split with ``seed``.

    Returns ``(x_train, y_train, x_test, y_test, class_names)``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = data.data.astype(np.float64) / 16.0
    xtr, xte, ytr, yte = train_test_split(x, data.target, test_size=test_fraction, random_state=seed,
                                          stratify=data.target)
    t = lambda a: torch.as_tensor(a, dtype=dtype)  # noqa: E731
    return t(xtr), torch.as_tensor(ytr).long(), t(xte), torch.as_tensor(yte).long(), [str(c) for c in range(10)]


def load_cifar10_subset(path, dtype=torch.float32):
    """The CIFAR-10 subset ``.npz`` (train_x/test_x uint8 (n, 32, 32, 3)), flattened to 3072 pixels/255."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 subset not found at '{path}' (pass --data PATH to the .npz file)")
    with np.load(path, allow_pickle=False) as z:
        missing = {"train_x", "train_y", "test_x", "test_y"} - set(z.files)
        if missing:
            raise ValueError(f"{path} lacks the arrays {sorted(missing)}")
        arrays = {k: z[k] for k in ("train_x", "train_y", "test_x", "test_y")}
        classes = [str(c) for c in z["classes"]] if "classes" in z.files else [str(c) for c in range(10)]
    f = lambda a: torch.as_tensor(a.reshape(a.shape[0], -1).astype(np.float64) / 255.0, dtype=dtype)  # noqa: E731
    g = lambda a: torch.as_tensor(a.astype(np.int64)).reshape(-1)  # noqa: E731
    return f(arrays["train_x"]), g(arrays["train_y"]), f(arrays["test_x"]), g(arrays["test_y"]), classes
