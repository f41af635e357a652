import pickle

import numpy as np
import pytest
import torch

from setsens.data.cifar import load_cifar10, load_cifar10_folder
from setsens.models.resnet import cifar_resnet, load_cifar_resnet

from problems import CKPT, NPZ


@pytest.mark.parametrize("depth,params", [(20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018), (110, 1_727_962)])
def test_parameter_counts(depth, params):
    assert sum(p.numel() for p in cifar_resnet(depth).parameters()) == params


def test_unknown_depth():
    with pytest.raises(ValueError, match="6k \\+ 2"):
        cifar_resnet(51)


def test_checkpoint_roundtrip_and_errors(tiny_run_files, tmp_path):
    ckpt, _, model = tiny_run_files
    loaded = load_cifar_resnet(ckpt)
    assert loaded.depth == 8 and not loaded.training
    x = torch.rand(3, 3, 32, 32)
    model.eval()
    assert torch.allclose(loaded(x), model(x))
    with pytest.raises(ValueError, match="ResNet-8"):
        load_cifar_resnet(ckpt, depth=20)
    with pytest.raises(FileNotFoundError):
        load_cifar_resnet(tmp_path / "nope.th")
    bad = {"module.conv1.weight": torch.zeros(16, 3, 3, 3), "module.layer1.0.conv1.weight": torch.zeros(16, 16, 3, 3),
           "module.foo": torch.zeros(1)}
    torch.save(bad, tmp_path / "bad.th")
    with pytest.raises(ValueError, match="keys do not match"):
        load_cifar_resnet(tmp_path / "bad.th")
    torch.save({"state_dict": {"module.fc.weight": torch.zeros(3)}}, tmp_path / "nolayer.th")
    with pytest.raises(ValueError, match="not a CIFAR ResNet"):
        load_cifar_resnet(tmp_path / "nolayer.th")


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
    with pytest.raises(FileNotFoundError):
        load_cifar10(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_cifar10_folder(tmp_path / "empty")


@pytest.mark.skipif(not (CKPT.exists() and NPZ.exists()), reason="shared ResNet-56 checkpoint / CIFAR subset not found in ../shared/data")
def test_shared_checkpoint_accuracy():
    torch.set_num_threads(2)
    model = load_cifar_resnet(CKPT)
    x, y = load_cifar10(NPZ, "test")
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).double().mean())
    assert 0.80 <= acc <= 0.85  # README: ≈ 82 % on the shared test subset
