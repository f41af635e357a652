"""Fixtures shared by every test directory; the problems themselves come from :mod:`problems`."""

import pytest
import torch
from problems import dfcnn_problem, resnet_run_files, small_problem


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield


@pytest.fixture
def problem():
    return small_problem()


@pytest.fixture
def make_interpolating():
    """``(widths, n, seed=0, reduction="mean") → Problem``: a DFCNN that interpolates its targets."""
    return lambda widths, n, seed=0, reduction="mean": dfcnn_problem(widths, n, seed, True, reduction)


@pytest.fixture
def make_random():
    """``(widths, n, seed=0) → Problem``: a DFCNN at random weights with random targets."""
    return lambda widths, n, seed=0: dfcnn_problem(widths, n, seed)


@pytest.fixture
def tiny_run_files(tmp_path):
    """A random ResNet-8 checkpoint (DataParallel layout) and a 12+6-image npz."""
    return resnet_run_files(tmp_path)
