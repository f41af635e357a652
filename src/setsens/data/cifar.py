"""CIFAR-10: the shared npz subset and the standard torchvision folder (``cifar-10-batches-py``).

The loaders return float images in [0, 1] of shape (n, 3, 32, 32) and int64 labels; the
normalisation the pretrained ResNets expect is part of the model (:mod:`setsens.models.resnet`).
:func:`load_cifar10_flat` gives both splits of the npz as flat rows (for MLPs).
Reading the torchvision folder needs no torchvision: the batches are Python pickles.
"""

from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["load_cifar10", "load_cifar10_npz", "load_cifar10_folder", "load_cifar10_flat", "CIFAR10_CLASSES",
           "CIFAR10_URL"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_FOLDER = "cifar-10-batches-py"


def _to_tensor(x: np.ndarray, dtype) -> torch.Tensor:
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (n, 32, 32, 3), got {x.shape}")
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(dtype) / 255.0


def load_cifar10_npz(path, split: str = "train", dtype=torch.float32):
    """``(x, y)`` from an npz with ``train_x/train_y/test_x/test_y`` (uint8 NHWC images)."""
    x, y = _npz_arrays(path, split)
    return _to_tensor(x, dtype), torch.from_numpy(y)


def _npz_arrays(path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 NHWC images and int64 labels of ``split`` in an npz (nothing converted yet)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 npz not found: {path}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    with np.load(path) as z:
        keys = (f"{split}_x", f"{split}_y")
        if not all(k in z for k in keys):
            raise ValueError(f"{path} lacks the arrays {keys} (has {sorted(z.files)})")
        return z[keys[0]], z[keys[1]].astype(np.int64)


def _download(root: Path) -> None:
    import urllib.request

    root.mkdir(parents=True, exist_ok=True)
    archive = root / "cifar-10-python.tar.gz"
    try:
        urllib.request.urlretrieve(CIFAR10_URL, archive)
    except OSError as err:  # no network
        raise RuntimeError(f"could not download CIFAR-10 from {CIFAR10_URL}: {err}") from err
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")


def load_cifar10_folder(root, split: str = "train", dtype=torch.float32, download: bool = False):
    """``(x, y)`` from the standard torchvision layout ``root/cifar-10-batches-py`` (or ``root`` itself).

    With ``download=True`` the archive is fetched into ``root`` when the folder is missing.
    """
    x, y = _folder_arrays(root, split, download)
    return _to_tensor(x, dtype), torch.from_numpy(y)


def _folder_arrays(root, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 NHWC images and int64 labels of ``split`` in a torchvision folder (nothing converted yet)."""
    root = Path(root)
    folder = root if (root / "batches.meta").is_file() else root / _FOLDER
    if not folder.is_dir():
        if not download:
            raise FileNotFoundError(f"no CIFAR-10 folder at {root} (expected {root / _FOLDER}); pass download=True")
        _download(root)
        folder = root / _FOLDER
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    xs, ys = [], []
    for name in names:
        f = folder / name
        if not f.is_file():
            raise FileNotFoundError(f"CIFAR-10 batch file missing: {f}")
        with open(f, "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(d[b"labels"], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def load_cifar10(path, split: str = "train", n: int | None = None, seed: int | None = None,
                 dtype=torch.float32, download: bool = False, part: tuple[int, int] | None = None):
    """CIFAR-10 from an ``.npz`` file or a torchvision folder; optionally the first ``n`` images
    (or ``n`` drawn at random with ``seed``).

    ``part=(rank, world)``: only that process's contiguous share of those images
    (:func:`setsens.distributed.shard`; it starts at ``shard(n, rank, world).start``).  Only the share
    is converted to floats: a process holds its rows, not the data set.
    """
    path = Path(os.fspath(path))
    if path.suffix == ".npz":
        x, y = _npz_arrays(path, split)
    else:
        x, y = _folder_arrays(path, split, download)
    idx = None
    if n is not None:
        if not 0 < n <= len(y):
            raise ValueError(f"n must be in [1, {len(y)}], got {n}")
        if seed is None:
            idx = np.arange(n)
        else:
            idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n].sort().values.numpy()
    if part is not None:
        from ..distributed import shard

        idx = np.arange(len(y)) if idx is None else idx
        idx = idx[shard(len(idx), *part)]
    if idx is not None:
        x, y = x[idx], y[idx]
    return _to_tensor(x, dtype), torch.from_numpy(y)


def load_cifar10_flat(path, dtype=torch.float32):
    """Both splits of a CIFAR-10 ``.npz`` as rows of 3072 pixels in [0, 1] (HWC order), for MLPs.

    Returns ``(x_train, y_train, x_test, y_test, class_names)``; the names come from the file's
    ``classes`` array when it has one, else ``"0"`` … ``"9"``.
    """
    xs = []
    for split in ("train", "test"):
        x, y = load_cifar10_npz(path, split, torch.float64)
        xs += [x.permute(0, 2, 3, 1).reshape(x.shape[0], -1).to(dtype), y.reshape(-1)]
    with np.load(path) as z:
        classes = [str(c) for c in z["classes"]] if "classes" in z.files else [str(c) for c in range(10)]
    return (*xs, classes)
