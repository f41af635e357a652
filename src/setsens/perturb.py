"""Perturbation directions Δx for chosen training points."""

from __future__ import annotations

import torch
from torch import Tensor

from .problem import Perturbation, Problem

__all__ = ["gradient_perturbation", "random_perturbation", "scale_to_relative"]


def scale_to_relative(x: Tensor, direction: Tensor, relative_step: float) -> Tensor:
    """Rescale each point's direction to ``relative_step · ‖x_i‖`` (the paper's step in % of norm)."""
    flat_d = direction.reshape(direction.shape[0], -1)
    dn = flat_d.norm(dim=1)
    if (dn == 0).any():
        raise ValueError("a perturbation direction is zero (the loss gradient vanishes at that point)")
    xn = x.reshape(x.shape[0], -1).norm(dim=1)
    return (flat_d * (relative_step * xn / dn)[:, None]).reshape(direction.shape)


def gradient_perturbation(problem: Problem, indices, relative_step: float, w: Tensor | None = None) -> Perturbation:
    """Move each point along its own input-gradient ``∇_{x_i} ℓ(x_i, y_i, w̄)`` (loss ascent)."""
    idx = problem.check_indices(indices)
    w = problem.params if w is None else w

    def rows(x, y, mine):
        g = torch.func.grad(lambda x: problem.per_sample_loss(w, x, y).sum())(x)
        return scale_to_relative(x, g, relative_step)

    return problem.check_perturbation(Perturbation(idx, problem.per_point(idx, rows, problem.input_shape)))


def random_perturbation(problem: Problem, indices, relative_step: float, generator: torch.Generator) -> Perturbation:
    """Move each point along a Gaussian random direction (seeded by ``generator``)."""
    idx = problem.check_indices(indices)
    d = torch.randn((idx.numel(), *problem.input_shape), generator=generator, dtype=torch.float64)

    def rows(x, y, mine):
        return scale_to_relative(x, d[mine].to(x), relative_step)

    return problem.check_perturbation(Perturbation(idx, problem.per_point(idx, rows, problem.input_shape)))
