"""Targeted poisoning through the coderivative (Gauss–Newton form): how to move K training points so
that an objective of the weights — by default a held-out point's margin — drops the most.

To first order the solution set moves by ``v(Δx) = −G⁺ r(Δx)`` with ``r = E A Δx`` (the outputs'
change at the moved points, :func:`~setsens.function_space.output_shift`).  For an objective
φ(w), the gradient of ``φ(w̄ + v(Δx))`` with respect to the move of point k is

    ∂φ/∂Δx_k = −A_kᵀ u_k,    u = (Gᵀ)⁺ ∇φ(w̄ + v)

— the coderivative of the solution map applied to ∇φ.  Each gradient costs one adjoint
least-squares solve (CGLS on Gᵀ, or two products with a :class:`~setsens.audit.GramFactor`) and one
reverse pass over the training outputs.  That shift is the answer of retraining to convergence; a
victim who fine-tunes for a budget (T steps of SGD from w̄, a network not at a minimum) moves by the
linearised-training response ``d_T = −φ_T(𝒢) J Δx`` instead (:mod:`setsens.filters`), whose
gradient is ``∂φ/∂Δx = −Jᵀ φ_T(𝒢) ∇φ`` (φ_T(𝒢) is symmetric): ``response="budget"`` follows it.

The attack (:func:`poison`) is projected gradient descent on Δx under a per-point budget
``‖Δx_k‖ ≤ budget·‖x_k‖``; its first step is the exact optimum of the linearised objective.  Whether
the poisoning really moves the model is for retraining to say (the ``setsens audit --attack`` check).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import Tensor

from .audit import GramFactor
from .finetune import Training, resolve_lr
from .filters import budget_filter
from .function_space import OutputJacobian, gauss_newton_shift, output_shift
from .krylov import cgls
from .linear import LinearOperator
from .operators import DataJacobian, data_jacobian_adjoint
from .perturb import gradient_perturbation, random_perturbation
from .problem import Perturbation, Problem

__all__ = ["margin", "AttackOptions", "Poisoning", "set_shift", "input_gradient", "budget_shift",
           "budget_input_gradient", "poison", "baselines"]

Objective = Callable[[Tensor], Tensor]


def margin(problem: Problem, x: Tensor, label: int | None = None) -> Objective:
    """``φ(w) = f_c(x; w) − max_{j≠c} f_j(x; w)`` for one input ``x``; ``c`` is ``label`` or the class
    predicted at w̄.  Negative once the prediction of x is no longer c."""
    x = x.to(problem.params)[None]
    if label is None:
        label = int(problem.outputs(problem.params, x).argmax())

    def phi(w: Tensor) -> Tensor:
        f = problem.outputs(w, x).reshape(-1)
        others = torch.cat([f[:label], f[label + 1:]])
        return f[label] - others.max()

    return phi


@dataclass(frozen=True)
class AttackOptions:
    """``points``: K training points moved (chosen by the first gradient unless given); ``budget``:
    ``‖Δx_k‖ ≤ budget·‖x_k‖`` in all; ``steps``: projected-gradient steps per stage; ``stages``: the
    budget is spent in this many equal stages, each followed by retraining and a new linearisation
    (more than one needs ``retrain``); ``response``: the first-order move of the weights the attack
    follows — ``"set"``, the solution set's ``−G⁺ r`` (retraining to convergence), or ``"budget"``,
    the linearised fine-tuning ``training``'s ``−φ_T(𝒢) J Δx`` (exact from a :class:`GramFactor` on an exact
    path when :func:`poison` is given one, else ``rank`` Lanczos steps per solve;
    ``training`` defaults to :class:`~setsens.finetune.Training()`, its lr resolved once);
    ``solver`` (``response="set"``): ``"factor"`` (a :class:`GramFactor` per stage) or ``"cgls"``
    (matrix-free, ``maxiter``/``rtol`` per solve)."""

    points: int = 10
    budget: float = 0.1
    steps: int = 10
    stages: int = 1
    solver: str = "factor"
    maxiter: int = 200
    rtol: float = 1e-8
    response: str = "set"
    training: Training | None = None
    rank: int = 40

    def __post_init__(self):
        if self.points < 1 or self.steps < 1 or self.stages < 1 or self.rank < 1 or not self.budget > 0:
            raise ValueError(f"points, steps, stages and rank must be ≥ 1 and budget > 0, got {self}")
        if self.solver not in ("factor", "cgls"):
            raise ValueError(f"solver must be 'factor' or 'cgls', got {self.solver!r}")
        if self.response not in ("set", "budget"):
            raise ValueError(f"response must be 'set' or 'budget', got {self.response!r}")
        if self.training is not None and self.response != "budget":
            raise ValueError("training is the budget response's: give it with response='budget'")


@dataclass
class Poisoning:
    """The attack's Δx (all stages) and its record: ``start`` = φ(w̄); ``predicted`` = φ(w̄ + v(Δx))
    of the last stage's first-order set; ``retrained`` = φ after each stage's retraining (with
    ``retrain``), ``weights`` the last of them; ``solves`` forward plus adjoint solves."""

    perturbation: Perturbation
    start: float
    predicted: float
    retrained: list[float] = field(default_factory=list)
    weights: Tensor | None = None
    solves: int = 0


def set_shift(problem: Problem, perturbation: Perturbation, factor=None, maxiter: int = 200,
              rtol: float = 1e-8) -> Tensor:
    """The minimum-norm Gauss–Newton shift ``v = −G⁺ r(Δx)`` (:func:`~setsens.function_space.gauss_newton_shift`):
    one product with ``factor`` or one CGLS."""
    r = output_shift(problem, perturbation, centered=problem.loss_ignores_output_shift)
    return gauss_newton_shift(problem, r, factor, maxiter=maxiter, rtol=rtol)


def _adjoint(problem: Problem, g: Tensor, factor, maxiter: int, rtol: float) -> Tensor:
    """``u = (Gᵀ)⁺ g`` of shape (n, K): the least-squares output vector whose ``Gᵀ u`` is nearest g."""
    if factor is not None:
        return (factor.T @ g[None])[0]
    return cgls(_flat_adjoint(problem), g, maxiter=maxiter, rtol=rtol).x.to(problem.params).reshape(problem.n, -1)


def _flat_adjoint(problem: Problem) -> LinearOperator:
    """``Gᵀ`` (``.T``: ``G``) on flattened output vectors, as CGLS iterates vectors."""
    return OutputJacobian(problem, centered=problem.loss_ignores_output_shift).T.flattened()


def input_gradient(problem: Problem, objective: Objective, perturbation: Perturbation | None = None,
                   factor=None, maxiter: int = 200, rtol: float = 1e-8) -> Tensor:
    """``∂φ(w̄ + v(Δx))/∂x_k`` for every training point k (shape of the inputs, (n, …)), at the move
    ``perturbation`` (none: Δx = 0).  Cost: one forward solve when Δx ≠ 0, one adjoint solve, one
    reverse pass over the training outputs."""
    w = problem.params
    if perturbation is not None:
        w = w + set_shift(problem, perturbation, factor, maxiter, rtol)
    u = _adjoint(problem, torch.func.grad(objective)(w), factor, maxiter, rtol).reshape(problem.n, -1)
    grads, start = [], 0
    for x, _ in problem.batches():
        ub = u[start:start + x.shape[0]].to(x)
        grads.append(-torch.func.grad(lambda x_: (problem.outputs(problem.params, x_).reshape(len(x_), -1)
                                                  * ub).sum())(x))
        start += x.shape[0]
    return torch.cat(grads)


def budget_shift(problem: Problem, perturbation: Perturbation, training: Training, rank: int = 40,
                 factor: GramFactor | None = None) -> Tensor:
    """``d_T = −φ_T(𝒢) J Δx``: the move of the linearised fine-tuning ``training`` (lr resolved) caused by
    Δx — :func:`~setsens.filters.ggn_filter`'s prediction without its error check; exact from ``factor`` on an
    exact path, else ``rank`` Lanczos steps (:func:`~setsens.filters.budget_filter`).  Cost: one filter and one
    forward-over-reverse pass over the moved points."""
    apply = budget_filter(problem, training, rank, factor)
    return -apply(DataJacobian(problem, perturbation.indices) @ perturbation.delta)


def budget_input_gradient(problem: Problem, objective: Objective, training: Training,
                          perturbation: Perturbation | None = None, rank: int = 40,
                          factor: GramFactor | None = None) -> Tensor:
    """``∂φ(w̄ + d_T(Δx))/∂x_k = −J_kᵀ φ_T(𝒢) ∇φ`` for every training point k (shape of the inputs,
    (n, …)), at the move ``perturbation`` (none: Δx = 0); the filter as :func:`budget_shift`'s.  Cost: one
    filter, and one more when Δx ≠ 0, and one forward-over-reverse pass over the data, a batch at a time."""
    w = problem.params
    if perturbation is not None:
        w = w + budget_shift(problem, perturbation, training, rank, factor)
    u = budget_filter(problem, training, rank, factor)(torch.func.grad(objective)(w))
    return -data_jacobian_adjoint(problem, u)


def _project(delta: Tensor, radius: Tensor) -> Tensor:
    norms = delta.reshape(len(delta), -1).norm(dim=1).clamp(min=1e-300)
    return delta * (radius / norms).clamp(max=1.0).reshape(-1, *[1] * (delta.ndim - 1))


def _stage(problem: Problem, objective: Objective, options: AttackOptions, points, radius_all: Tensor,
           budget: float, factor: GramFactor | None = None) -> tuple[Perturbation, float, int]:
    """One stage of projected gradient descent on ``φ(w + v(Δx))`` at the problem's w, v the option's
    response: ``(Δx, φ predicted, solves)``.  The first step goes to the linearised optimum
    ``Δx_k = −ε_k g_k/‖g_k‖``, the next ones (ε_k/4, normalised gradient) follow φ's curvature; the
    best iterate is kept."""
    if options.response == "budget":
        follows = dict(training=options.training, rank=options.rank, factor=factor)
        shift = lambda pert: budget_shift(problem, pert, **follows)  # noqa: E731
        gradient = lambda pert: budget_input_gradient(problem, objective, perturbation=pert, **follows)  # noqa: E731
    else:
        if options.solver == "factor" and factor is None:
            factor = GramFactor(problem)
        solve = dict(factor=factor, maxiter=options.maxiter, rtol=options.rtol)
        shift = lambda pert: set_shift(problem, pert, **solve)  # noqa: E731
        gradient = lambda pert: input_gradient(problem, objective, pert, **solve)  # noqa: E731
    g = gradient(None)
    radius_all = radius_all * budget
    if points is None:
        points = (g.reshape(problem.n, -1).norm(dim=1) * radius_all).argsort(descending=True)[:options.points]
    points = problem.check_indices(points)
    radius, g = radius_all[points].reshape(-1, *[1] * (g.ndim - 1)), g[points]
    best, solves, step, delta = None, 1, 1.0, torch.zeros_like(g)
    for k in range(options.steps):
        unit = g / g.reshape(len(g), -1).norm(dim=1).clamp(min=1e-300).reshape(radius.shape)
        delta = _project(delta - step * radius * unit, radius.reshape(-1))
        pert = Perturbation(points, delta)
        value, solves = float(objective(problem.params + shift(pert))), solves + 1
        if best is None or value < best[1]:
            best = (pert, value)
        if k + 1 < options.steps:
            g, solves, step = gradient(pert)[points], solves + 2, 0.25
    return best[0], best[1], solves


def poison(problem: Problem, objective: Objective, options: AttackOptions = AttackOptions(), points=None,
           retrain: Callable[[Perturbation], Tensor] | None = None, factor: GramFactor | None = None) -> Poisoning:
    """Move K training points within the budget so that φ drops the most, through the coderivative.

    ``points`` default to the K whose first-order effect at full budget is largest
    (``‖∂φ/∂x_k‖·‖x_k‖``).  With one stage the whole budget is spent on the first-order set at w̄
    (valid while ``‖v‖`` stays inside the estimate's radius).  With several, each stage spends its
    share, then ``retrain(Δx so far)`` (the victim's training from w̄ on the moved data) gives the
    weights the next stage linearises at; the stages' moves add up (within the budget by the
    triangle inequality).  Cost per stage: a factor (``solver="factor"``; the first stage reuses
    ``factor``, a :class:`GramFactor` of ``problem``, when given) and, per step, one forward and one
    adjoint solve; plus one retraining.
    """
    if options.stages > 1 and retrain is None:
        raise ValueError("more than one stage needs retrain(perturbation) -> weights")
    if options.response == "budget":
        options = replace(options, training=resolve_lr(problem, options.training or Training()))
    if factor is not None and (options.solver != "factor" or factor.problem is not problem):
        raise ValueError("factor is for solver='factor' and must be a GramFactor of problem")
    x, y = problem.points(torch.arange(problem.n))
    radius_all = x.reshape(problem.n, -1).norm(dim=1)
    start = float(objective(problem.params))
    at, total, record = problem, torch.zeros_like(x), Poisoning(None, start, start)
    for stage in range(options.stages):
        share = options.budget / options.stages
        pert, record.predicted, solves = _stage(at, objective, options, points, radius_all, share,
                                                factor if stage == 0 else None)
        points, record.solves = pert.indices, record.solves + solves
        total[points] += pert.delta
        record.perturbation = Perturbation(points, total[points])
        if retrain is not None:
            record.weights = retrain(record.perturbation)
            record.retrained.append(float(objective(record.weights)))
            at = _moved(problem, x + total, y, record.weights)
    return record


def _moved(problem: Problem, x: Tensor, y: Tensor, w: Tensor) -> Problem:
    """The problem on moved inputs ``x`` at weights ``w`` (tensor data only)."""
    if problem.loader is not None:
        raise ValueError("a staged attack needs tensor training data, not a DataLoader")
    return Problem(problem.model, problem.loss, (x, y), params=w, batch_size=problem.batch_size,
                   dtype=problem.dtype, device=problem.device, reduction=problem.reduction,
                   weight_decay=problem.weight_decay)


def baselines(problem: Problem, points, budget: float, generator: torch.Generator) -> dict[str, Perturbation]:
    """Moves of the same points at the full budget that know nothing of the target: ``random``
    (Gaussian directions) and ``loss-gradient`` (each point's own loss ascent)."""
    points = problem.check_indices(points)
    return {"random": random_perturbation(problem, points, budget, generator),
            "loss-gradient": gradient_perturbation(problem, points, budget)}
