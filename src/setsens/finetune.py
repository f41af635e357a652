"""The fine-tuning a user runs, as data: :class:`Training`, its batch schedule, and one optimiser step as a
pure function of ``(w, state, ε)``.

A budget-limited estimate predicts "fine-tune from w̄ for ``steps`` steps on the perturbed data, compared with
the same fine-tuning on the clean data" (:mod:`setsens.tangent`; docs/tangent.md).  The training is therefore
part of the question: :class:`Training` names it (optimiser, lr, steps, momentum, Adam's betas, weight decay,
full batch or minibatches in a fixed seeded order).  Two implementations run it:

* :func:`fine_tune` — with ``torch.optim`` (what the user runs): the reference's runs
  (:func:`setsens.retrain.training_response`);
* :func:`optimizer_step` — the same update as a pure tensor function, which :mod:`setsens.tangent`
  differentiates along Δx with ``torch.func.jvp``.  The tests hold the two to each other.

The data enter a step as ``x + ε D``: ``D`` is Δx placed on the moved rows of the step's batch, so a step is a
smooth function of ``ε`` (the size of the perturbation) as well as of ``w``.  A minibatch's risk is scaled by
``n/|B|`` so that it is an unbiased estimate of the full risk ``L`` and one ``lr`` means the same for both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterator

import torch
from torch import Tensor

from .problem import Perturbation, Problem
from .progress import ProgressFn, report

__all__ = ["Training", "OPTIMIZERS", "schedule", "step_batches", "step_gradient", "initial_state", "optimizer_step",
           "resolve_lr", "fine_tune", "FineTuned", "diverged"]

OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class Training:
    """The fine-tuning from w̄ that a budget estimate differentiates and its reference runs.

    Attributes:
        optimizer: ``"sgd"`` (with ``momentum``, Nesterov if ``nesterov``), ``"adam"`` or ``"adamw"``, with
            ``torch.optim``'s update rules.
        lr: the step; None: ``1/λ_max(H)`` at w̄ for SGD (30 Hessian-vector products), 1e-3 for Adam.
        steps: optimiser steps T.
        momentum, nesterov: SGD's heavy-ball momentum.
        betas, eps: Adam's.
        weight_decay: the optimiser's (coupled for SGD and Adam, decoupled for AdamW, as ``torch.optim``);
            apart from a weight decay the problem's risk already carries.
        batch_size: None: full batch (every step sees all the data, in the problem's batches); an int:
            minibatches of that size, a fresh permutation per epoch drawn from ``seed``.
    """

    optimizer: str = "sgd"
    lr: float | None = None
    steps: int = 200
    momentum: float = 0.9
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    batch_size: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"steps must be an integer ≥ 1, got {self.steps!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not self.eps > 0 or not self.weight_decay >= 0:
            raise ValueError("eps must be > 0 and weight_decay ≥ 0")
        if self.batch_size is not None and not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ValueError(f"batch_size must be None (full batch) or an integer ≥ 1, got {self.batch_size!r}")

    def describe(self) -> str:
        """One line: what is run, e.g. ``200 steps of SGD (Nesterov momentum 0.9), lr 0.1, full batch``."""
        if self.optimizer == "sgd":
            how = "SGD" + (f" (Nesterov momentum {self.momentum:g})" if self.nesterov and self.momentum
                           else f" (momentum {self.momentum:g})" if self.momentum else "")
        else:
            how = {"adam": "Adam", "adamw": "AdamW"}[self.optimizer] + f" (betas {self.betas[0]:g}, {self.betas[1]:g})"
        lr = "lr 1/λ_max(H)" if self.lr is None else f"lr {self.lr:.3g}"
        wd = f", weight decay {self.weight_decay:g}" if self.weight_decay else ""
        batch = "full batch" if self.batch_size is None else f"minibatches of {self.batch_size} (seed {self.seed})"
        return f"{self.steps} steps of {how}, {lr}{wd}, {batch}"


def resolve_lr(problem: Problem, training: Training) -> Training:
    """``training`` with its default lr filled in (SGD: ``1/λ_max(H)`` at w̄ by 30 power iterations)."""
    if training.lr is not None:
        return training
    if training.optimizer != "sgd":
        return replace(training, lr=1e-3)
    from .krylov import power_iteration
    from .operators import Hessian

    start = torch.randn(problem.p, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return replace(training, lr=1.0 / float(power_iteration(Hessian(problem), start.to(problem.params), 30).values[0]))


def schedule(problem: Problem, training: Training) -> Iterator[Tensor | None]:
    """The rows each step sees: None (all, full batch) or a tensor of global indices; deterministic."""
    if training.batch_size is None:
        for _ in range(training.steps):
            yield None
        return
    size, per_epoch = training.batch_size, math.ceil(problem.n / training.batch_size)
    for t in range(training.steps):
        epoch, k = divmod(t, per_epoch)
        order = torch.randperm(problem.n, generator=torch.Generator().manual_seed(training.seed + epoch))
        yield order[k * size:(k + 1) * size]


class _FullBatch:
    """Every batch of the data, read anew at each pass (memory bounded by the batch); re-iterable."""

    def __init__(self, problem: Problem, perturbation: Perturbation | None):
        self.problem, self.perturbation = problem, perturbation

    def __iter__(self):
        return ((x, y, d, 1.0) for x, y, d in self.problem.displaced_batches(self.perturbation))


def step_batches(problem: Problem, rows: Tensor | None, perturbation: Perturbation | None):
    """``(x, y, D, scale)`` for each batch of a step, re-iterable: clean inputs, targets, Δx on the batch's moved
    rows (None when none moved) and the factor that makes the step's risk an estimate of ``L``.  Full batch: the
    problem's batches, read at each pass; a minibatch: one batch of ``rows``."""
    if rows is None:
        return _FullBatch(problem, perturbation)
    x, y = problem.points(rows)
    d = None
    if perturbation is not None:
        where = {int(i): j for j, i in enumerate(perturbation.indices)}
        moved = [(r, where[int(i)]) for r, i in enumerate(rows) if int(i) in where]
        if moved:
            d = torch.zeros_like(x)
            for r, j in moved:
                d[r] = perturbation.delta[j].to(x)
    return [(x, y, d, problem.n / x.shape[0])]


def step_gradient(problem: Problem, w: Tensor, eps: Tensor, batches) -> Tensor:
    """``∇_w`` of the step's risk at inputs ``x + ε D``: a pure function of ``(w, ε)`` (``torch.func``-safe)."""
    grad = torch.func.grad(problem.batch_risk)
    g = torch.zeros_like(w)
    for x, y, d, scale in batches:
        g = g + scale * grad(w, x if d is None else x + eps * d, y)
    return problem.reduce(g)


def initial_state(training: Training, w: Tensor) -> tuple[Tensor, ...]:
    """The optimiser's state at the start: SGD's momentum buffer, Adam's two moments (zeros)."""
    return (torch.zeros_like(w),) if training.optimizer == "sgd" else (torch.zeros_like(w), torch.zeros_like(w))


def _sqrt(v: Tensor) -> Tensor:
    """``√v`` with a zero derivative where ``v = 0`` (a weight whose gradient has always been 0)."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


def optimizer_step(training: Training, t: int, w: Tensor, state: tuple[Tensor, ...], g: Tensor
                   ) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Step ``t`` (1-based) of ``torch.optim``'s update as a pure function: ``(w, state, ∇) → (w, state)``."""
    lr, wd = training.lr, training.weight_decay
    if training.optimizer == "sgd":
        if wd:
            g = g + wd * w
        buf = training.momentum * state[0] + g if t > 1 else g  # torch: the first buffer is the gradient
        d = (g + training.momentum * buf if training.nesterov else buf) if training.momentum else g
        return w - lr * d, (buf,)
    b1, b2 = training.betas
    if training.optimizer == "adamw":
        w = w * (1 - lr * wd)
    elif wd:
        g = g + wd * w
    m = b1 * state[0] + (1 - b1) * g
    v = b2 * state[1] + (1 - b2) * g * g
    denom = _sqrt(v) / math.sqrt(1 - b2**t) + training.eps
    return w - (lr / (1 - b1**t)) * m / denom, (m, v)


def torch_optimizer(training: Training, w: Tensor) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimiser :class:`Training` names, on the leaf tensor ``w``."""
    if training.optimizer == "sgd":
        return torch.optim.SGD([w], lr=training.lr, momentum=training.momentum, weight_decay=training.weight_decay,
                               nesterov=training.nesterov and training.momentum > 0)
    cls = torch.optim.Adam if training.optimizer == "adam" else torch.optim.AdamW
    return cls([w], lr=training.lr, betas=training.betas, eps=training.eps, weight_decay=training.weight_decay)


@dataclass
class FineTuned:
    """A run of :func:`fine_tune`: its end ``w``, the risk at its start and end (on the data it trained on),
    ``diverged`` (:func:`diverged`) and the weights after step ``snapshot`` when one was asked for."""

    w: Tensor
    risk_start: float
    risk_end: float
    diverged: bool
    snapshot: Tensor | None = None


def fine_tune(problem: Problem, perturbation: Perturbation | None, training: Training,
              progress: ProgressFn | None = None, snapshot: int | None = None) -> FineTuned:
    """Run ``training`` from w̄ with ``torch.optim`` on the (perturbed) data, keeping the weights after step
    ``snapshot`` if given.  Cost: ``steps`` gradients (of a minibatch, or of the full risk) and two risk passes.
    ``progress``: a :class:`~setsens.progress.Progress` ``("fine-tune", t, steps)`` after each step."""
    training = resolve_lr(problem, training)
    w = problem.params.clone().requires_grad_(True)
    opt = torch_optimizer(training, w)
    one = torch.ones((), dtype=problem.dtype, device=problem.device)
    start, kept = problem.risk(problem.params, perturbation), None
    for t, rows in enumerate(schedule(problem, training), 1):
        g = step_gradient(problem, w.detach(), one, step_batches(problem, rows, perturbation))
        if not torch.isfinite(g).all():
            return FineTuned(w.detach(), start, float("nan"), True, kept)
        w.grad = g
        opt.step()
        if t == snapshot:
            kept = w.detach().clone()
        report(progress, "fine-tune", t, training.steps)
    end = problem.risk(w.detach(), perturbation)
    return FineTuned(w.detach(), start, end, diverged(training, start, end), kept)


def diverged(training: Training, start: float, end: float) -> bool:
    """Did a run diverge?  Its end risk is not finite, or above its start — for minibatches above twice its
    start (a minibatch run's risk is noisy; a diverging one grows without bound)."""
    return not (math.isfinite(end) and end <= start * (1 if training.batch_size is None else 2))
