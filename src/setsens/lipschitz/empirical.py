"""The empirical modulus: retrain on perturbed data and divide the set shift by ``‖Δx‖``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

from ..problem import Perturbation, Problem
from ..progress import ProgressFn, report


@dataclass
class EmpiricalRecord:
    """One retraining experiment: direction, size, and the measured set shift.

    ``shift`` = d(w′, S(x̄)) where w′ is warm-started retraining on the perturbed data from w̄,
    and the distance to the *original* solution set is measured the foundation way: retrain from
    w′ on the original data and take the distance moved (retrain.distance_to_solution_set).
    ``moved`` = ‖w′ − w̄‖ (includes motion along the old set, which costs nothing).
    """

    direction: str
    relative_step: float
    dx_norm: float
    shift: float
    moved: float
    ratio: float
    predicted_ratio: float | None
    retrain_grad_norm: float
    back_grad_norm: float
    seconds: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def empirical_modulus(
    problem: Problem,
    directions: dict[str, Perturbation],
    steps: Sequence[float],
    reference_norm: float,
    distance: Callable | None = None,
    predicted: dict[str, float] | None = None,
    progress: ProgressFn | None = None,
) -> list[EmpiricalRecord]:
    """Retrain along each unit direction at each relative step; ratio = shift / ‖Δx‖.

    ``directions`` map a name to a unit-norm Δx; the perturbation applied is
    ``step · reference_norm · Δx`` (reference_norm: ‖x̄_K‖, so steps are fractions of the data
    norm).  ``distance(problem, w, perturbation)`` defaults to
    :func:`setsens.retrain.distance_to_solution_set` (Levenberg–Marquardt for squared loss,
    L-BFGS otherwise).  ``predicted[name]`` (first-order ``‖H⁺JΔx‖/‖Δx‖``) is stored alongside.
    ``progress``: ``Progress("retraining", i, total, {direction, step, ratio})`` after each retraining.
    """
    if distance is None:
        from ..retrain import distance_to_solution_set as distance
    out = []
    for name, unit in directions.items():
        nrm = unit.norm()
        if not (abs(nrm - 1.0) < 1e-6):
            raise ValueError(f"direction {name!r} must have unit norm, has {nrm:.6g}")
        for step in steps:
            if step <= 0:
                raise ValueError(f"steps must be positive, got {step}")
            t0 = time.perf_counter()
            pert = unit.scaled(step * reference_norm)
            fwd = distance(problem, problem.params, pert)
            back = distance(problem, fwd.w, None)
            dx = pert.norm()
            rec = EmpiricalRecord(
                direction=name, relative_step=float(step), dx_norm=dx, shift=back.distance,
                moved=fwd.distance, ratio=back.distance / dx,
                predicted_ratio=None if predicted is None else predicted.get(name),
                retrain_grad_norm=fwd.grad_norm, back_grad_norm=back.grad_norm,
                seconds=time.perf_counter() - t0,
            )
            out.append(rec)
            report(progress, "retraining", len(out), len(directions) * len(steps), direction=name, step=step,
                   ratio=rec.ratio)
    return out
