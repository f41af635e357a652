"""Every entry point validates at the boundary (#28): bad input is refused by setsens, at once, in one line that
names the argument and says what to pass — not by torch, deep inside, after a pass over the data."""

import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import setsens
from problems import small_problem
from setsens.analysis import analyze
from setsens.perturb import gradient_perturbation
from setsens.problem import NotStationaryWarning, Perturbation, Problem, cross_entropy, squared_error

PACKAGE = Path(setsens.__file__).resolve().parent


def data(n=12, k=2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, k, (n,), generator=g)


def net():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


class TupleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = net()

    def forward(self, x):
        return (self.net(x),)


class DictModel(TupleModel):
    def forward(self, x):
        return {"logits": self.net(x)}  # Hugging Face style


class DictDataset(Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, i):
        x, y = data()
        return {"x": x[i], "y": y[i]}


def nan_targets():
    x, _ = data()
    y = torch.randn(12, 2, dtype=torch.float64)
    y[5, 1] = float("nan")
    return Problem(net(), squared_error, (x, y))


def labels_out_of_range(point=7):
    x, y = data()
    y[point] = 2  # the model has 2 outputs
    return Problem(net(), cross_entropy, (x, y))


def unavailable_device():
    name = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    return Problem(net(), cross_entropy, data(), device=name)


BAD = {
    "nan float targets": (nan_targets, r"targets contain NaN or Inf"),
    "labels out of range": (labels_out_of_range, r"^targets: class labels must lie in \[0, 2\).*point 7"),
    "labels out of range in the first two": (lambda: labels_out_of_range(0), r"^targets: class labels .*point 0"),
    "labels out of range in a loader's first batch": (
        lambda: Problem(net(), cross_entropy, DataLoader(TensorDataset(data()[0], data()[1] + 2), batch_size=5)),
        r"^targets: class labels must lie in \[0, 2\)"),
    "tuple-returning model": (lambda: Problem(TupleModel(), cross_entropy, data()),
                              r"^the model returned a tuple: pass a model whose forward returns the output tensor"),
    "dict-returning model": (lambda: Problem(DictModel(), cross_entropy, data()), r"^the model returned a dict"),
    "a Dataset": (lambda: Problem(net(), cross_entropy, TensorDataset(*data())),
                  r"^data is a Dataset: wrap it in DataLoader\(dataset, batch_size=…, shuffle=False\)"),
    "dict-batch loader": (lambda: Problem(net(), cross_entropy, DataLoader(DictDataset(), batch_size=5)),
                          r"^data: the DataLoader's batches are dicts .*\(inputs, targets\) tuples"),
    "unavailable device": (unavailable_device, r"^device 'cuda(:\d+)?' is not available"),
    "invalid dtype string": (lambda: Problem(net(), cross_entropy, data(), dtype="float128"),
                             r"^dtype 'float128' .*float32, float64"),
    "integer dtype": (lambda: Problem(net(), cross_entropy, data(), dtype=torch.int64),
                      r"^dtype must be a floating dtype"),
    "a single tensor as data": (lambda: Problem(net(), cross_entropy, data()[0]), r"^data is a Tensor: pass \(inputs"),
    "a triple as data": (lambda: Problem(net(), cross_entropy, (*data(), data()[1])), r"^data is a tuple of length 3"),
    "a list as delta": (lambda: Perturbation(torch.tensor([0]), [[1.0, 0.0, 0.0]]),
                        r"^perturbation delta must be a tensor"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_by_setsens_at_once_with_a_one_line_message(case):
    build, message = BAD[case]
    start = time.perf_counter()
    with pytest.raises((ValueError, TypeError), match=message) as info:
        build()
    assert time.perf_counter() - start < 1.0
    assert "\n" not in str(info.value)
    assert PACKAGE in Path(info.traceback[-1].path).resolve().parents  # raised by setsens, not inside torch


def test_dtype_by_name_is_accepted():
    assert Problem(net(), cross_entropy, data(), dtype="float32").dtype == torch.float32
    problem = Problem(net(), cross_entropy, data(), dtype="float64", device="cpu")
    assert problem.dtype == torch.float64 and problem.params.dtype == torch.float64
    assert problem.device == torch.device("cpu")


def test_a_list_of_batches_and_in_range_labels_are_accepted():
    x, y = data()
    problem = Problem(net(), cross_entropy, [(x[:5], y[:5]), (x[5:9], y[5:9]), (x[9:], y[9:])])
    assert problem.n == 12
    single = nn.Sequential(nn.Linear(3, 1)).double()  # one output: integer targets are not class indices
    bce = lambda out, t: nn.functional.binary_cross_entropy_with_logits(out[:, 0], t.to(out), reduction="none")  # noqa: E731
    assert Problem(single, bce, (x, y)).n == 12


def test_analyze_on_a_loader_matches_tensors():
    tensors = small_problem(n=12, batch_size=5)
    loader = Problem(tensors.model, cross_entropy,
                     DataLoader(TensorDataset(tensors.inputs, tensors.targets), batch_size=5, shuffle=False))
    pert = gradient_perturbation(tensors, [1, 7], 0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotStationaryWarning)
        a, b = analyze(tensors, pert), analyze(loader, pert)
    assert torch.allclose(a.estimate.shift, b.estimate.shift, rtol=1e-6, atol=1e-6)
    assert a.verdict.status == b.verdict.status

    def close(u, v):
        if isinstance(u, dict):
            assert u.keys() == v.keys()
            for key in u:
                close(u[key], v[key])
        elif isinstance(u, (list, tuple)):
            assert len(u) == len(v)
            for s, t in zip(u, v):
                close(s, t)
        elif isinstance(u, torch.Tensor):
            assert torch.allclose(u.double(), v.double(), rtol=1e-6, atol=1e-6)
        elif isinstance(u, float):
            assert u == pytest.approx(v, rel=1e-6, abs=1e-6, nan_ok=True)
        else:
            assert u == v

    close(a.predictions, b.predictions)


def test_squared_error_on_integer_labels_vmaps_without_the_fallback():
    outputs = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batched = torch.func.vmap(lambda out: squared_error(out, y))(outputs)  # one-hot encoded under vmap
    assert not [w for w in caught if "performance drop" in str(w.message)]
    assert torch.allclose(batched, torch.stack([squared_error(out, y) for out in outputs]), rtol=1e-15, atol=0)
    one_hot = nn.functional.one_hot(y, 3).double()
    assert torch.equal(squared_error(outputs[0], y), 0.5 * ((outputs[0] - one_hot) ** 2).sum(1))


def test_the_top_level_exports():
    assert setsens.analyze is analyze and setsens.Analysis.__name__ == "Analysis"
    assert callable(setsens.scan) and setsens.Scan.__name__ == "Scan"
    assert all(hasattr(setsens, name) for name in setsens.__all__)
