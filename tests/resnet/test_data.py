"""The data loaders: CIFAR-10 (npz, torchvision folder, flat rows) and the digits."""

import pickle

import numpy as np
import pytest
import torch

from setsens.data.cifar import load_cifar10, load_cifar10_flat, load_cifar10_folder
from setsens.data.digits import load_digits_split, load_digits_subset


def test_npz_and_folder_loaders(tiny_run_files, tmp_path):
    _, npz, _ = tiny_run_files
    x, y = load_cifar10(npz, "train")
    assert x.shape == (12, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    z = np.load(npz)
    assert torch.allclose(x[1, 2], torch.from_numpy(z["train_x"][1, :, :, 2]).float() / 255)
    assert load_cifar10(npz, "train", n=5, seed=1)[0].shape[0] == 5
    # the torchvision folder layout, written from the same images
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    flat = z["train_x"].transpose(0, 3, 1, 2).reshape(12, -1)
    for i in range(1, 6):
        sl = slice(0, 12) if i == 1 else slice(0, 0)
        with open(folder / f"data_batch_{i}", "wb") as fh:
            pickle.dump({b"data": flat[sl], b"labels": z["train_y"][sl].tolist()}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": []}, fh)
    xf, yf = load_cifar10_folder(tmp_path, "train")
    assert torch.equal(xf, x) and torch.equal(yf, y)
    # a process's share (torchrun): the shares of the (seeded) subset, in order, are the subset
    for path in (npz, tmp_path):
        for n, seed in ((None, None), (10, None), (7, 3)):
            whole = load_cifar10(path, "train", n=n, seed=seed)
            parts = [load_cifar10(path, "train", n=n, seed=seed, part=(r, 3)) for r in range(3)]
            assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
            assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])
    with pytest.raises(FileNotFoundError):
        load_cifar10(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_cifar10_folder(tmp_path / "empty")


def test_flat_rows_are_the_images_in_hwc_order(tiny_run_files):
    _, npz, _ = tiny_run_files
    xtr, ytr, xte, yte, classes = load_cifar10_flat(npz)
    x, y = load_cifar10(npz, "test")
    assert xtr.shape == (12, 3072) and xte.shape == (6, 3072) and classes == [str(c) for c in range(10)]
    assert torch.equal(xte, x.permute(0, 2, 3, 1).reshape(6, -1)) and torch.equal(yte, y)


def test_digits_split_is_stratified_and_subset_is_seeded():
    xtr, ytr, xte, yte, names = load_digits_split(0)
    assert xtr.shape == (1437, 64) and xte.shape == (360, 64) and names == [str(c) for c in range(10)]
    assert xtr.dtype == torch.float32 and float(xtr.max()) == 1.0
    assert (torch.bincount(yte, minlength=10) >= 35).all()  # every class in the test split
    x1, _ = load_digits_subset(20, seed=3)
    x2, _ = load_digits_subset(20, seed=3)
    assert torch.equal(x1, x2)
