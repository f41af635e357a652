"""The tangent of the training run: what fine-tuning from w̄ does differently when training inputs move.

Fine-tuning for T steps is a map ``ε ↦ w_T(ε)`` of the data ``x̄ + εΔx`` (:mod:`setsens.finetune`: each step
is a pure function of ``(w, state, ε)``).  Its derivative along Δx,

    w′ = d w_T / dε at ε = 0,

is the exact first-order prediction of the *budget response* ``w_T(xᵖ) − w_T(x̄)`` — the perturbed run minus
the clean run, same optimiser, lr, T and batch order (:func:`setsens.retrain.training_response`).  It is
computed by forward-mode differentiation (``torch.func.jvp``) through the same T steps, carrying
``(w, state, w′, state′)``: the primal part replays the clean run, so no p×p matrix, no tape and no stationary
point are needed.  Cost ≈ 3 gradients per step (one forward-over-reverse pass), memory of one batch's
gradient.  A nested ``jvp`` carries ``w″`` as well (≈ 2.5× the tangent's cost): the second-order term
``½ s² o″`` of the outputs against the first ``s o′`` says for which steps ``s`` the first-order answer can hold
(:func:`validity_ratio`).

On a ReLU network the training map jumps wherever a unit changes sides, and the jumps add up to a term first
order in the move that the derivative misses (:func:`jump_ratio` measures it).  The *secant* tangent
(``secant=True``, method ``"training-secant"``) runs the same forward-mode pass with each ReLU's derivative
replaced by its secant over the tangent's own change of the unit's input (:class:`setsens.secant.Secant`): it
sees the units that change sides, holds for the move it was computed at only (it is not linear in Δx), and
:func:`secant_residual` grades it.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial

import torch
from torch import Tensor
from torch.func import jvp

from .atomic import atomic_torch_save
from .finetune import Training, initial_state, optimizer_step, resolve_lr, schedule, step_batches, step_gradient
from .finetune import diverged as run_diverged
from .problem import Perturbation, Problem
from .progress import ProgressFn, report
from .secant import Secant

__all__ = ["TrainingTangent", "training_tangent", "output_derivatives", "validity_ratio", "jump_ratio",
           "secant_residual", "TANGENT", "SECANT"]

#: the method names of the tangent and of the secant tangent
TANGENT, SECANT = "training-tangent", "training-secant"


@dataclass
class TrainingTangent:
    """The tangent of a fine-tuning run along Δx (see the module doc).

    ``base`` is the replayed clean run's end ``w_T(x̄ + ε₀Δx)`` (ε₀ = ``at``, 0 by default), ``shift`` = w′ the
    predicted change of the end weights per unit ε (so ``base + shift`` predicts the perturbed run's end),
    ``second`` = w″ (order 2 only).  ``risk_start``/``risk_end``: the replay's risk on its data; ``diverged``:
    the replay went non-finite or diverged by :func:`setsens.finetune.diverged`'s rule.  ``method``:
    :data:`SECANT` for a secant tangent (its ``shift`` holds for this perturbation only; ``uncovered`` names
    the piecewise-linear functions it left as they are).
    """

    problem: Problem
    perturbation: Perturbation
    training: Training
    w_bar: Tensor
    base: Tensor
    shift: Tensor
    second: Tensor | None
    at: float
    risk_start: float
    risk_end: float
    seconds: float
    method: str = TANGENT
    cost: dict = field(default_factory=dict)
    uncovered: tuple[str, ...] = ()
    probes: list = field(default_factory=list, repr=False)  # (t, rows, w_t, w′_t) at a few steps, for jump_ratio

    @property
    def centre(self) -> Tensor:
        """The predicted end of the perturbed run, ``w_T(x̄) + w′``."""
        return self.base + self.shift

    @property
    def diverged(self) -> bool:
        finite = all(torch.isfinite(t).all() for t in (self.base, self.shift))
        return not finite or run_diverged(self.training, self.risk_start, self.risk_end)

    def scaled(self, factor: float) -> "TrainingTangent":
        """The tangent along ``factor · Δx`` (derivatives at ε₀ = 0 are linear in Δx: w′ scales by ``factor``,
        w″ by its square); no recomputation.  A secant tangent is not linear in Δx and is refused."""
        if self.method == SECANT:
            raise ValueError("a secant tangent holds for the perturbation it was computed at only: compute another "
                             "(training_tangent(..., secant=True)) for another step")
        if self.at:
            raise ValueError("only a tangent taken at the training data (at=0) scales with Δx")
        return replace(self, perturbation=self.perturbation.scaled(factor), shift=self.shift * factor,
                       second=None if self.second is None else self.second * factor**2,
                       probes=[(t, rows, w, dw * factor) for t, rows, w, dw in self.probes])

    def summary(self) -> dict:
        record = {"method": self.method, "predicts": "the budget response: fine-tuning on the perturbed data minus "
                  "the same fine-tuning on the clean data (" + self.training.describe() + ")",
                  "shift_norm": float(self.shift.norm()),
                  "replay_weight_drift": float((self.base - self.w_bar).norm()),
                  "second_norm": None if self.second is None else float(self.second.norm()),
                  "replay_risk": {"start": self.risk_start, "end": self.risk_end}, "diverged": self.diverged,
                  "lr": self.training.lr, "steps": self.training.steps, "cost": self.cost}
        return record | ({"secant_uncovered": list(self.uncovered)} if self.method == SECANT else {})


def _step(problem, training, t, batches, w, state, eps):
    return optimizer_step(training, t, w, state, step_gradient(problem, w, eps, batches))


def _first(step, w, state, eps, dw, dstate):
    """``(w, state) → next`` and its derivative along ``(dw, dstate, dε = 1)``."""
    return jvp(step, (w, state, eps), (dw, dstate, torch.ones_like(eps)))


def training_tangent(problem: Problem, perturbation: Perturbation, training: Training = Training(), *,
                     order: int = 1, at: float = 0.0, probes: int = 10, secant: bool = False,
                     progress: ProgressFn | None = None, checkpoint: str | None = None) -> TrainingTangent:
    """The derivative (``order=2``: and the second derivative) of the fine-tuning run's end along Δx.

    Args:
        secant: the secant tangent (see the module doc): each ReLU's derivative is its secant over the tangent's
            own change of its input; it holds for this ``perturbation`` only (``order`` 1 only).
        training: the fine-tuning (its lr is resolved first when None: 30 Hessian-vector products).
        at: ε₀, where along ``x̄ + εΔx`` to differentiate (0: at the training data).
        probes: keep ``(w_t, w′_t)`` at this many evenly spaced steps for :func:`jump_ratio` (2 weight vectors
            each).
        progress: a :class:`~setsens.progress.Progress` ``("tangent", t, steps)`` after each step.
        checkpoint: a file: the run's state is saved there (atomically) every 10 steps and a rerun with the
            same arguments resumes from it.

    Cost per step: about 3 gradients (``order=2``: about 7.5), memory of one batch's gradient (forward mode
    keeps no tape across steps).
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    if secant and order != 1:
        raise ValueError("a secant tangent has no second derivative: order=1")
    problem.check_perturbation(perturbation)
    training = resolve_lr(problem, training)
    t0 = time.perf_counter()
    w = problem.params.clone()
    zeros = lambda: tuple(torch.zeros_like(s) for s in initial_state(training, w))  # noqa: E731
    carry = {"w": w, "state": initial_state(training, w), "dw": torch.zeros_like(w), "dstate": zeros(),
             "d2w": torch.zeros_like(w), "d2state": zeros(), "t": 0}
    key = {"order": order, "at": at, "probes": probes, "secant": secant, "training": repr(training),
           "indices": perturbation.indices.tolist(), "delta_norm": perturbation.norm(), "p": problem.p}
    kept = []
    if checkpoint is not None:
        if os.path.exists(checkpoint):
            saved = torch.load(checkpoint, weights_only=False)
            if saved.get("key") == key:
                carry, kept = saved["carry"], saved["probes"]
    eps = torch.tensor(float(at), dtype=problem.dtype, device=problem.device)
    start_risk = problem.risk(problem.params, perturbation.scaled(at) if at else None)
    probe_at = {round(k * training.steps / probes) + 1 for k in range(probes)} if probes else set()
    mode = Secant() if secant else nullcontext()
    for t, rows in enumerate(schedule(problem, training), 1):
        if t <= carry["t"]:
            continue
        step = partial(_step, problem, training, t, step_batches(problem, rows, perturbation))
        c = carry
        if t in probe_at:
            kept.append((t, rows, c["w"].clone(), c["dw"].clone()))
        if order == 1:
            with mode:
                (c["w"], c["state"]), (c["dw"], c["dstate"]) = _first(step, c["w"], c["state"], eps, c["dw"],
                                                                      c["dstate"])
        else:
            first = partial(_first, step)
            ((w1, s1), _), ((dw1, ds1), (d2w1, d2s1)) = jvp(
                first, (c["w"], c["state"], eps, c["dw"], c["dstate"]),
                (c["dw"], c["dstate"], torch.ones_like(eps), c["d2w"], c["d2state"]))
            c.update(w=w1, state=s1, dw=dw1, dstate=ds1, d2w=d2w1, d2state=d2s1)
        c["t"] = t
        if checkpoint is not None and (t % 10 == 0 or t == training.steps):
            atomic_torch_save({"key": key, "carry": carry, "probes": kept}, checkpoint)
        report(progress, "tangent", t, training.steps)
    end_risk = problem.risk(carry["w"], perturbation.scaled(at) if at else None)
    per_step = 3 if order == 1 else 7.5
    return TrainingTangent(problem, perturbation, training, problem.params.clone(), carry["w"], carry["dw"],
                           carry["d2w"] if order == 2 else None, float(at), start_risk, end_risk,
                           time.perf_counter() - t0,
                           method=SECANT if secant else TANGENT,
                           cost={"steps": training.steps, "gradients_per_step_about": per_step}, probes=kept,
                           uncovered=tuple(sorted(mode.uncovered)) if secant else ())


def output_derivatives(problem: Problem, w: Tensor, dw: Tensor, x: Tensor, d2w: Tensor | None = None,
                       batch_size: int = 256) -> tuple[Tensor, Tensor | None]:
    """``o′ = J_f(w) dw`` and (given ``d2w``) ``o″ = J_f(w) d2w + f″(w)[dw, dw]`` of the outputs on ``x``, as the
    loss sees them (:meth:`Problem.as_loss_sees`), batched.  Cost: one JVP (two nested for ``o″``) per batch."""
    first, second = [], []
    for s in range(0, x.shape[0], batch_size):
        xb = x[s:s + batch_size].to(problem.device, problem.dtype if x.is_floating_point() else x.dtype)
        f = lambda v: problem.as_loss_sees(problem.outputs(v, xb))  # noqa: E731
        if d2w is None:
            first.append(jvp(f, (w,), (dw,))[1].detach())
        else:
            (_, o1), (_, o2) = jvp(lambda v, dv: jvp(f, (v,), (dv,)), (w, dw), (dw, d2w))
            first.append(o1.detach())
            second.append(o2.detach())
    return torch.cat(first), (torch.cat(second) if d2w is not None else None)


def validity_ratio(first: Tensor, second: Tensor) -> float:
    """κ = ‖o″‖ / (2‖o′‖): at a perturbation ``s`` times the differentiated one, the second-order term of the
    outputs is ``s·κ`` times the first-order term (so the first-order answer can hold only where ``s·κ ≪ 1``)."""
    return float(second.double().norm() / (2 * first.double().norm().clamp_min(1e-300)))


def _over_probes(tangent: TrainingTangent, factor: float, residual) -> dict:
    """``residual(grad, w_t, f·w′_t, ε₀, f)`` at each probe of the tangent, in float64 (in float32 the difference
    of a small move is rounding); ``grad(w, ε)`` is the step's gradient.  Median and largest."""
    problem, pert = tangent.problem.with_dtype(torch.float64), tangent.perturbation
    if not tangent.probes:
        raise ValueError("the tangent kept no probes: training_tangent(..., probes=k) with k ≥ 1")
    eps = torch.tensor(tangent.at, dtype=problem.dtype, device=problem.device)
    ratios = []
    for _, rows, w, dw in tangent.probes:
        grad = partial(step_gradient, problem, batches=step_batches(problem, rows, pert))
        ratios.append(residual(grad, w.to(problem.dtype), factor * dw.to(problem.dtype), eps, factor))
    ratios = torch.tensor(ratios)
    return {"median": float(ratios.median()), "max": float(ratios.max()), "probes": len(ratios)}


def _jump(grad, w, dw, eps, f):
    derivative = jvp(grad, (w, eps), (dw, torch.ones_like(eps) * f))[1]
    plus, minus = grad(w + dw, eps + f), grad(w - dw, eps - f)
    return float(((plus - minus) / 2 - derivative).norm() / derivative.norm().clamp_min(1e-300))


def _secant_miss(grad, w, dw, eps, f):
    with Secant():
        secant = jvp(grad, (w, eps), (dw, torch.ones_like(eps) * f))[1]
    change = grad(w + dw, eps + f) - grad(w, eps)
    return float((change - secant).norm() / change.norm().clamp_min(1e-300))


def jump_ratio(tangent: TrainingTangent, factor: float = 1.0) -> dict:
    """Is one training step differentiable at the scale of the perturbation?  At the kept steps of the replay
    (``tangent.probes``), the gradient's central difference over ``±factor·(w′_t, Δx)`` against its derivative
    ``H w′_t + J Δx`` (one JVP): ``‖difference quotient − derivative‖ / ‖derivative‖``.  O(factor²) where the
    step is smooth; of order one where units change sides within the perturbation (ReLU, max-pooling), where
    the training map jumps and no derivative sees the jumps.  No retraining.  Returns the median and the
    largest ratio over the probes.  Computed in float64.  Cost: about 5 gradients per probe."""
    return _over_probes(tangent, factor, _jump)


def secant_residual(tangent: TrainingTangent, factor: float = 1.0) -> dict:
    """What the secant misses of one training step at the scale of the perturbation: at the kept steps, the
    change of the step's gradient over the move ``factor·(w′_t, Δx)`` against its secant derivative along it
    (one JVP under :class:`~setsens.secant.Secant`), ``‖change − secant‖ / ‖change‖``.  0 for a network whose
    only nonlinearity after the moved weights is one ReLU layer; O(factor) otherwise (curvature, and units that
    change sides by the move's second-order part).  On a secant tangent's own probes (``factor`` 1) it grades
    that tangent; on a plain tangent's, scaled, it grades the secant at another step without computing it.
    No retraining; float64.  Cost: about 5 gradients per probe."""
    return _over_probes(tangent, factor, _secant_miss)
