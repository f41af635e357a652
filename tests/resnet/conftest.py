from pathlib import Path

import numpy as np
import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
CKPT = SHARED / "resnet56-cifar10.th"
NPZ = SHARED / "cifar10-subset.npz"


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield


@pytest.fixture
def tiny_run_files(tmp_path):
    """A random ResNet-8 checkpoint (DataParallel layout) and a 12+6-image npz."""
    from setsens.models.resnet import cifar_resnet

    torch.manual_seed(0)
    model = cifar_resnet(8)
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}, "best_prec1": 0.0},
               tmp_path / "r8.th")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", train_x=rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8),
             train_y=rng.integers(0, 10, 12).astype(np.int64),
             test_x=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), test_y=rng.integers(0, 10, 6).astype(np.int64))
    return tmp_path / "r8.th", tmp_path / "c.npz", model
