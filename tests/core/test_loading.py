"""setsens.loading: a user's model, checkpoint, data and loss from command-line specs."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from setsens.loading import load_checkpoint, load_data, load_loss, load_model
from setsens.problem import cross_entropy


def test_image_folder_with_train_and_test(tmp_path):
    for split, per_class in (("train", 3), ("test", 2)):
        for label, colour in enumerate(((255, 0, 0), (0, 0, 255))):
            folder = tmp_path / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (5, 4), colour).save(folder / f"{i}.png")
    data = load_data(str(tmp_path))
    assert data.x.shape == (6, 3, 4, 5) and data.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.x_test.shape == (4, 3, 4, 5)
    assert torch.allclose(data.x[0, 0], torch.ones(4, 5)) and torch.allclose(data.x[3, 2], torch.ones(4, 5))


def test_npz_needs_x_and_y(tmp_path):
    np.savez(tmp_path / "d.npz", inputs=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="must hold arrays 'x' and 'y'"):
        load_data(str(tmp_path / "d.npz"))
    np.savez(tmp_path / "e.npz", x=np.zeros((2, 3)), y=np.zeros(3))
    with pytest.raises(ValueError, match="2 inputs but 3 targets"):
        load_data(str(tmp_path / "e.npz"))


def test_checkpoints_prefixes_and_trusted_modules(tmp_path):
    (tmp_path / "m.py").write_text("from torch import nn\ndef net():\n    return nn.Linear(3, 2)\n")
    source = nn.Linear(3, 2)
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "ddp.pt")
    model = load_checkpoint(load_model(f"{tmp_path / 'm.py'}:net"), tmp_path / "ddp.pt")
    assert torch.equal(model.weight, source.weight)
    torch.save(source, tmp_path / "whole.pt")
    with pytest.raises(ValueError, match="--trust-checkpoint"):
        load_checkpoint(None, tmp_path / "whole.pt")
    assert torch.equal(load_checkpoint(None, tmp_path / "whole.pt", trust=True).weight, source.weight)


def test_checkpoint_of_an_older_torch_without_batch_norm_counters(tmp_path):
    (tmp_path / "bn.py").write_text("from torch import nn\ndef net():\n    return nn.Sequential(nn.Linear(3, 2), "
                                    "nn.BatchNorm1d(2))\n")
    source = load_model(f"{tmp_path / 'bn.py'}:net")
    old = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pt")
    model = load_checkpoint(load_model(f"{tmp_path / 'bn.py'}:net"), tmp_path / "old.pt")
    assert torch.equal(model[1].running_var, source[1].running_var)
    del old["1.running_var"]  # anything else missing is still an error
    torch.save(old, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="missing.*running_var"):
        load_checkpoint(load_model(f"{tmp_path / 'bn.py'}:net"), tmp_path / "broken.pt")


def test_losses_by_name_and_from_a_file(tmp_path):
    assert load_loss("cross_entropy") is cross_entropy
    (tmp_path / "l.py").write_text("def hinge(out, y):\n    return (1 - out[:, 0] * y).clamp(min=0)\n")
    assert callable(load_loss(f"{tmp_path / 'l.py'}:hinge"))
    with pytest.raises(ValueError, match="must be one of"):
        load_loss("hinge")


def test_data_function_returning_a_dataset(tmp_path):
    (tmp_path / "ds.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "def train():\n    return TensorDataset(torch.arange(12.).reshape(4, 3), torch.tensor([0, 1, 1, 0]))\n")
    data = load_data(f"{tmp_path / 'ds.py'}:train")
    assert data.x.shape == (4, 3) and data.y.tolist() == [0, 1, 1, 0] and data.test is None


@pytest.mark.parametrize("layout", ["lightning", "lightning+ddp", "compiled", "lightning, loss buffers beside"])
def test_checkpoints_of_common_trainers_load(tmp_path, layout):
    """Lightning keeps ``{"state_dict": {"model.0.weight": …}, "epoch": …}``, DataParallel adds ``module.``,
    torch.compile ``_orig_mod.``; a LightningModule may hold more than the network (a loss with a buffer)."""
    (tmp_path / "m.py").write_text("from torch import nn\ndef net():\n    return nn.Sequential(nn.Linear(3, 4), "
                                   "nn.BatchNorm1d(4), nn.Linear(4, 2))\n")
    source = load_model(f"{tmp_path / 'm.py'}:net")
    with torch.no_grad():
        source[1].running_mean.add_(1.5)
    prefix = {"lightning": "model.", "lightning+ddp": "module.model.", "compiled": "_orig_mod.",
              "lightning, loss buffers beside": "model."}[layout]
    state = {prefix + k: v for k, v in source.state_dict().items()}
    if layout.endswith("beside"):
        state["criterion.weight"] = torch.ones(2)
    torch.save({"state_dict": state, "epoch": 3, "global_step": 30, "pytorch-lightning_version": "2.4.0"},
               tmp_path / "trainer.ckpt")
    model = load_checkpoint(load_model(f"{tmp_path / 'm.py'}:net"), tmp_path / "trainer.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))


def test_a_prefix_that_fits_nothing_is_named_in_one_line(tmp_path):
    (tmp_path / "m.py").write_text("from torch import nn\ndef net():\n    return nn.Linear(3, 2)\n")
    source = nn.Linear(3, 2)
    state = {f"model.{k}": v for k, v in source.state_dict().items()} | {"model.extra": torch.zeros(1)}
    torch.save({"state_dict": state}, tmp_path / "odd.ckpt")
    with pytest.raises(ValueError, match=r"under 'model\.': save that sub-module's state_dict\(\)") as err:
        load_checkpoint(load_model(f"{tmp_path / 'm.py'}:net"), tmp_path / "odd.ckpt")
    assert "\n" not in str(err.value)


def test_held_out_targets_in_another_form_than_the_training_targets(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 3), np.float32), y=np.zeros(4, np.float32),
             x_test=np.zeros((2, 3), np.float32), y_test=np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"held-out targets are torch.float32 of shape \(2,\) per point, training"):
        load_data(str(tmp_path / "d.npz"))
