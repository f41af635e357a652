"""Bad input gets a clear error (or a warning with the figure) and loses nothing."""

import pytest
import torch
from torch import nn

from setsens.problem import NotStationaryWarning, Perturbation, Problem, squared_error
from setsens.report import prepare_out_dir
from setsens.solution_set import estimate



def test_shape_mismatch_between_model_and_data():
    model = nn.Linear(3, 2).double()
    with pytest.raises(ValueError, match="cannot be applied to inputs of shape"):
        Problem(model, squared_error, (torch.randn(5, 4, dtype=torch.float64), torch.zeros(5, dtype=torch.long)))
    with pytest.raises(ValueError, match="rows"):
        Problem(model, squared_error, (torch.randn(5, 3), torch.zeros(4, dtype=torch.long)))


def test_nan_and_inf():
    model = nn.Linear(3, 2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        Problem(model, squared_error, (x, torch.zeros(5, dtype=torch.long)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        Problem(model, squared_error, (x.nan_to_num(), torch.zeros(5, dtype=torch.long)), params=torch.full((8,), float("inf")))
    with pytest.raises(ValueError, match="NaN or Inf"):
        Perturbation(torch.tensor([0]), torch.tensor([[float("inf"), 0.0, 0.0]]))


def test_indices_out_of_range_and_zero_perturbation(problem):
    with pytest.raises(IndexError, match="out of range"):
        problem.check_perturbation(Perturbation(torch.tensor([0, 99]), torch.ones(2, 3, dtype=torch.float64)))
    with pytest.raises(ValueError, match="zero"):
        estimate(problem, Perturbation(torch.tensor([1]), torch.zeros(1, 3, dtype=torch.float64)))
    with pytest.raises(ValueError, match="point shape"):
        problem.check_perturbation(Perturbation(torch.tensor([1]), torch.ones(1, 4, dtype=torch.float64)))


def test_not_stationary_warns_with_the_figure(problem):
    with pytest.warns(NotStationaryWarning, match=r"‖∇L‖ = \d"):
        info = problem.stationarity()
    assert info["grad_norm"] > 0


def test_missing_output_parent(tmp_path):
    with pytest.raises(FileNotFoundError, match="parent directory"):
        prepare_out_dir(tmp_path / "missing" / "out")
    assert prepare_out_dir(tmp_path / "out").is_dir()
