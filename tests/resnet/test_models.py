"""The reference architectures: CIFAR ResNets (counts, checkpoints) and the MLP factory and reader."""

import pytest
import torch
from torch import nn

from setsens.data.cifar import load_cifar10
from setsens.models.mlp import UnsupportedNetworkError, mlp, mlp_layers
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


@pytest.mark.skipif(not (CKPT.exists() and NPZ.exists()), reason="shared ResNet-56 checkpoint / CIFAR subset not found in ../shared/data")
def test_shared_checkpoint_accuracy():
    torch.set_num_threads(2)
    model = load_cifar_resnet(CKPT)
    x, y = load_cifar10(NPZ, "test")
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).double().mean())
    assert 0.80 <= acc <= 0.85  # README: ≈ 82 % on the shared test subset


def test_mlp_seeded_init_named_activation_and_read_back():
    a = mlp([4, 6, 3], activation="relu6", generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    b = mlp([4, 6, 3], activation="relu6", generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a[0].weight.dtype == torch.float64 and a[0].weight.abs().max() <= 6**0.5 / 2
    linears, act = mlp_layers(a)
    assert [m.weight.shape for m in linears] == [(6, 4), (3, 6)] and act == "relu6"
    with pytest.raises(UnsupportedNetworkError, match="unknown activation"):
        mlp([4, 3], activation="tanh")
    with pytest.raises(UnsupportedNetworkError, match="alternates Linear and ReLU"):
        mlp_layers(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)), flatten=False)
