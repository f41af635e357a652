"""Should the estimate be believed?  A verdict computed without retraining.

Each :class:`Check` grades one figure the estimate already carries (pass / warn / fail) and says
what to do about a bad one.  The thresholds are stated beside each check; they were chosen on the
zoo of ``benchmarks/zoo.py``, where the warnings predict the estimates that retraining rejects
(``docs/runs/zoo/``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .solution_set import SolutionSet
from .tangent import SECANT

__all__ = ["Check", "Verdict", "assess", "assess_tangent", "first_order_residual", "kink", "LossOnPoints",
           "VALIDITY_THRESHOLD", "JUMP_THRESHOLD", "SECANT_THRESHOLD", "FLOOR_THRESHOLD", "GROWTH_THRESHOLD",
           "PRECISION_THRESHOLD", "tangent_precision", "tangent_verdict"]

STATUSES = ("pass", "warn", "fail")

#: the largest second-order/first-order ratio of the outputs at which the training tangent is trusted (pass);
#: warn up to twice it, fail beyond.  Calibrated on the zoo (docs/runs/zoo/tangent.md).
VALIDITY_THRESHOLD = 0.3
#: the largest jump ratio (:func:`setsens.tangent.jump_ratio`, median over the probes) that passes; warn up to
#: three times it, fail beyond.  Calibrated on the zoo's 75 runs (docs/runs/zoo-tangent/tangent.md): every run
#: below Pearson 0.9 has a jump ratio ≥ 3.1 (fails), runs at 0.58–0.67 reach Pearson 0.98–0.99 (pass).
JUMP_THRESHOLD = 0.75
#: the largest secant residual (:func:`setsens.tangent.secant_residual`, median over the probes) that passes the
#: secant tangent; warn up to twice it, fail beyond.  Calibrated on the zoo's CNN and transformer
#: (docs/runs/zoo-secant/tangent.md): runs at Pearson 0.97–0.99 had residuals up to 0.66 (one 1.04); at 3 %, where
#: the transformer's runs fall below 0.9, 0.92–1.05.
SECANT_THRESHOLD = 0.75
#: the smallest predicted change of the outputs over the secant's noise floor (its change at a 300× smaller step)
#: that passes the secant tangent; warn down to half of it.  The reference's own stability rule (≥ 10× its floor);
#: on the zoo every run below Pearson 0.9 at a small step had 1.4–6.9 (runs at 6–9 reached 0.97–0.995).
FLOOR_THRESHOLD = 10.0
#: the largest growth of the secant's predicted change from its floor to the step, over the step's own growth,
#: that passes (``bifurcation``); warn up to 3× it.  Measured: 1.0–1.7 where the secant holds on a small ReLU MLP,
#: 67–1e5 at an lr near its edge of stability (Pearson 0.41–0.82); 0.005–0.8 on the zoo's ReLU networks.
GROWTH_THRESHOLD = 10.0
#: the smallest predicted change, in units of the rounding of the weights (ε‖w‖), that passes ``shift_precision``:
#: its own rounding is then at most 1 %.  Calibrated on the same runs: changes of 150–780 ε‖w‖ had Pearson 1.000.
PRECISION_THRESHOLD = 1e2


@dataclass(frozen=True)
class Check:
    """One graded figure: ``status`` is ``pass``, ``warn`` or ``fail``; ``advice`` is empty on pass."""

    name: str
    status: str
    value: float
    advice: str = ""


@dataclass(frozen=True)
class LossOnPoints:
    """Mean loss on the moved points: before the move (``clean``), after it at w̄ (``original``) and
    at the estimate's centre (``estimate``)."""

    clean: float
    original: float
    estimate: float

    @property
    def increase_removed(self) -> float:
        """The share of the loss increase the estimate takes back (1: all of it; ≤ 0: none)."""
        increase = self.original - self.clean
        return (self.original - self.estimate) / increase if increase > 0 else float("nan")


@dataclass(frozen=True)
class Verdict:
    """The worst status of the checks, and the checks."""

    status: str
    checks: tuple[Check, ...]

    def to_dict(self) -> dict:
        return {"status": self.status, "checks": [asdict(c) for c in self.checks]}

    def lines(self) -> list[str]:
        """One line per check, for a terminal or a report."""
        return [f"{c.status.upper():4}  {c.name} = {c.value:.3g}" + (f" — {c.advice}" if c.advice else "")
                for c in self.checks]


def _grade(name: str, value: float, warn_above: float, fail_above: float, advice: str) -> Check:
    status = "pass" if value <= warn_above else "warn" if value <= fail_above else "fail"
    return Check(name, status, float(value), "" if status == "pass" else advice)


def first_order_residual(estimate: SolutionSet) -> float:
    """``‖∇L(xᵖ, w̄ + v₀) − ∇L(x̄, w̄)‖ / ‖∇L(xᵖ, w̄) − ∇L(x̄, w̄)‖``: the share of the gradient change the
    move causes that the centre leaves uncancelled.  Linear theory makes it O(‖Δx‖); near 1 the move is
    outside the first-order regime.  Cost: three gradient passes."""
    problem, pert, w_bar = estimate.problem, estimate.perturbation, estimate.w_bar
    clean = problem.gradient(w_bar)
    moved = problem.gradient(w_bar, pert) - clean
    return float((problem.gradient(estimate.centre, pert) - clean).norm() / max(float(moved.norm()), 1e-300))


def kink(estimate: SolutionSet) -> float:
    """``|s/‖g‖² − 1|`` with ``s`` the risk's central-difference slope along ``g = ∇L(x̄, w̄)`` over a step of
    1e-4·‖v₀‖ (longer if the rounding of the risk needs it, at most ‖v₀‖): 0 where the risk is smooth at w̄,
    of order 1 where w̄ sits on a kink (ReLU or max-pooling units at exactly zero, where fine-tuning to
    stationarity tends to stop), where the gradient, the curvature and every first-order answer are those
    of one side only.  NaN when the slope is below the rounding of the risk.  Cost: one gradient and three
    risk passes."""
    problem, w, g = estimate.problem, estimate.w_bar, estimate.problem.gradient(estimate.w_bar)
    gg, risk = float(g @ g), problem.risk(w)
    if gg == 0:
        return 0.0
    eps = torch.finfo(w.dtype).eps
    step = max(1e-4 * float(estimate.shift.norm()), 1e3 * eps * abs(risk) / (2 * gg ** 0.5))
    if step > float(estimate.shift.norm()):
        return float("nan")
    h = step / gg ** 0.5
    return abs((problem.risk(w + h * g) - problem.risk(w - h * g)) / (2 * h * gg) - 1)


def tangent_precision(tangent) -> float:
    """‖w′‖ / (ε‖w_T‖): the predicted change of the end weights in units of their rounding (ε of their dtype)."""
    eps = torch.finfo(tangent.shift.dtype).eps
    return float(tangent.shift.norm()) / max(eps * float(tangent.base.norm()), 1e-300)


def assess_tangent(tangent, ratio: float, residual: float, above_floor: float | None = None,
                   floor_factor: float = 300.0) -> Verdict:
    """Grade a training tangent or secant tangent (:mod:`setsens.tangent`) without retraining.

    * ``replay_converging``: fail when the replayed clean fine-tuning diverged (:func:`setsens.finetune.diverged`):
      the training itself is unstable at its lr, and so is every answer about it.
    * ``second_order``: the ratio of the second- to the first-order term of the outputs at this step
      (:func:`setsens.analysis.validity`): pass ≤ :data:`VALIDITY_THRESHOLD`, warn up to twice it, fail beyond
      (calibrated on the zoo: Pearson 0.95–0.99 at ratios 0.25–0.29, 0.89 at 0.46).
    * the tangent: ``smooth_at_step``, the jump ratio (:func:`setsens.tangent.jump_ratio`): how far a training
      step's gradient over the perturbation departs from its derivative; pass ≤ :data:`JUMP_THRESHOLD`, warn up to
      3× it — large where units change sides within the perturbation, so that the training map jumps (calibrated
      on the zoo: 0.2–0.4 on the smooth networks at Pearson ≥ 0.95, 1.5–7.8 on the ReLU CNN at 0.55–0.93).
    * the secant tangent: ``secant_at_step``, the secant residual (:func:`setsens.tangent.secant_residual`): pass
      ≤ :data:`SECANT_THRESHOLD`, warn up to twice it; and ``above_floor``, its predicted change over its noise
      floor (:func:`setsens.analysis.validity`): pass ≥ :data:`FLOOR_THRESHOLD`, warn down to half of it, fail
      below — the fine-tuning's change is then mostly what any move, however small, does to it; and
      ``bifurcation``, the same ratio over ``floor_factor`` (the step's ratio): about 1 where the change grows
      with the step, ≫ 1 where it grows much faster between the two steps — the run turns onto another course in
      between (a unit changing sides sends it elsewhere: an lr near its edge of stability), where the secant sees
      the jump but not its direction; pass ≤ :data:`GROWTH_THRESHOLD`, warn up to 3× it, fail beyond.  Not
      graded: where the fine-tuning is chaotic without one bifurcation, the dynamics can amplify the secant's
      per-step error.
    * ``shift_precision``: :func:`tangent_precision`: warn below :data:`PRECISION_THRESHOLD` — the predicted
      change is near the rounding of the weights, and so is the reference's (float32 runs part by rounding).
    """
    return tangent_verdict(tangent.diverged, ratio, residual, tangent_precision(tangent),
                           secant=tangent.method == SECANT, above_floor=above_floor,
                           floor_factor=floor_factor)


def tangent_verdict(diverged: bool, ratio: float, residual: float, precision: float, *, secant: bool = False,
                    above_floor: float | None = None, floor_factor: float = 300.0) -> Verdict:
    """The verdict of :func:`assess_tangent` from its figures (a stored run is regraded with it)."""
    checks = [Check("replay_converging", "fail" if diverged else "pass", float(not diverged),
                    "the replayed fine-tuning diverges: lower Training.lr" if diverged else ""),
              _grade("second_order", ratio, VALIDITY_THRESHOLD, 2 * VALIDITY_THRESHOLD,
                     "the perturbation is outside the range where the first-order answer holds: use a step at most "
                     "validity.step_max")]
    if secant:
        checks.append(_grade("secant_at_step", residual, SECANT_THRESHOLD, 2 * SECANT_THRESHOLD,
                             "one training step's change over the perturbation is far from its secant (curvature, "
                             "units changing sides by the move's second-order part): use a step at most "
                             "validity.step_max"))
        status = "pass" if above_floor >= FLOOR_THRESHOLD else "warn" if above_floor >= FLOOR_THRESHOLD / 2 else "fail"
        checks.append(Check("above_floor", status, float(above_floor), "" if status == "pass" else
                            "the predicted change is not well above the change the fine-tuning makes for any move, "
                            "however small (units that change sides): use a step at least validity.step_max"))
        checks.append(_grade("bifurcation", above_floor / floor_factor, GROWTH_THRESHOLD, 3 * GROWTH_THRESHOLD,
                             "the predicted change grows much faster than the step between a smaller step and this "
                             "one: the fine-tuning turns onto another course in between (an lr near its edge of "
                             "stability?), and no first-order answer follows it; lower Training.lr"))
    else:
        checks.append(_grade("smooth_at_step", residual, JUMP_THRESHOLD, 3 * JUMP_THRESHOLD,
                             "a training step is not differentiable at the scale of the perturbation (units change "
                             "sides within it: ReLU, max-pooling): the fine-tuning jumps where no derivative sees "
                             "it; use method 'training-secant', which follows the units that change sides"))
    ok = precision >= PRECISION_THRESHOLD
    checks.append(Check("shift_precision", "pass" if ok else "warn", precision, "" if ok else
                        "the predicted change is close to the rounding of the weights: compute in float64 (Problem "
                        "dtype) or use a larger perturbation (relative_step)"))
    status = max((c.status for c in checks), key=STATUSES.index)
    return Verdict(status, tuple(checks))


def assess(estimate: SolutionSet, loss: LossOnPoints, first_order: float | None = None,
           kink_size: float | None = None) -> Verdict:
    """Grade ``estimate`` (and the loss on its moved points) by the checks below.

    * ``stationarity`` ‖∇L(w̄)‖/‖JΔx‖: warn > 0.1, fail > 1 — the estimate would answer the gradient
      already at w̄ rather than the perturbation.
    * the method's own residual (``output_residual`` for Gauss–Newton, the eq.-19
      ``feasibility_residual`` otherwise): warn > 0.1, fail > 0.5.
    * ``radius_determined`` (set-valued methods): warn when the radius rule found no valid member
      beyond the centre (pass when the null space is empty: the set is then its centre).
    * ``solver_stopped_by_rule``: warn when the Krylov solve stopped at ``maxiter`` rather than by its rule.
    * ``moved_point_loss`` (losses that ignore a common output shift, i.e. cross-entropy): warn
      below 1e-4, fail below 1e-7 — their curvature is of the size of their loss and vanishes.
    * ``shift_precision`` ‖v₀‖/(ε‖w̄‖): warn below 1e3 — the shift is near the rounding of w̄.
    * ``first_order`` (when given, :func:`first_order_residual`): warn > 0.1, fail > 0.5 — the move is
      too large for a first-order answer (chosen on the zoo's MLP after the advice: 0.05 where
      retraining agreed to Pearson 0.99, 0.2 where it did not).
    * ``kink`` (when given, :func:`kink`): warn > 0.1, fail > 0.5 — the gradient does not describe the
      risk at w̄ (chosen on the zoo: 1e-5 on the smooth MLP, 0.8 on the ReLU CNN polished to a kink, where
      converged retraining stalled and neither the estimate nor the influence function matched it).
      Left out where it cannot be measured: the risk's change over a step of at most ‖v₀‖ is below its
      rounding (NaN; float32 with a small shift), or w̄ is stationary to 1e-6 of the move (an exact fit,
      whose gradient is rounding).
    """
    s, checks = estimate, []
    checks.append(_grade("stationarity", s.stationarity, 0.1, 1.0,
                         "w̄ is not stationary at the scale of the perturbation: use method 'training-tangent', "
                         "which predicts fine-tuning from such a w̄ and finds the steps where it holds, or fine-tune "
                         "w̄ to a stationary point first (L-BFGS, float64)"))
    own = ("output_residual", s.output_residual) if s.method == "gauss-newton" else (
        "feasibility_residual", s.feasibility_residual)
    checks.append(_grade(*own, 0.1, 0.5, "the linear system is not solved: raise SolveOptions.maxiter, compute in "
                                        "float64 (Problem dtype), or try another method"))
    if s.method != "influence":
        determined = bool(s.radius_record.get("determined"))
        point = "note" in s.radius_record  # no null space: the set is its centre, nothing to determine
        checks.append(Check("radius_determined", "pass" if determined or point else "warn", float(determined),
                            "" if determined or point else "no member beyond the centre was validated: read the "
                            "set as its centre"))
    stopped = s.selected.get("stopped_by")
    if stopped is not None:
        hit = stopped == "maxiter"
        checks.append(Check("solver_stopped_by_rule", "warn" if hit else "pass", float(not hit),
                            "the solve ran out of iterations: raise SolveOptions.maxiter" if hit else ""))
    if s.problem.loss_ignores_output_shift:
        value = loss.clean
        status = "pass" if value >= 1e-4 else "warn" if value >= 1e-7 else "fail"
        checks.append(Check("moved_point_loss", status, float(value), "" if status == "pass" else
                            "the moved points are fitted so well that their curvature vanishes: eq. 19 barely "
                            "sees them (prefer gauss-newton to restore them; retraining hardly moves)"))
    eps = torch.finfo(s.shift.dtype).eps
    precision = float(s.shift.norm()) / max(eps * float(s.w_bar.norm()), 1e-300)
    checks.append(Check("shift_precision", "pass" if precision >= 1e3 else "warn", precision,
                        "" if precision >= 1e3 else
                        "the shift is close to the rounding of w̄: compute in float64 (Problem dtype)"))
    if first_order is not None:
        checks.append(_grade("first_order", first_order, 0.1, 0.5,
                             "the centre leaves much of the move's gradient change uncancelled: the move is outside "
                             "the first-order regime, use a smaller perturbation (relative_step)"))
    if kink_size is not None and kink_size == kink_size and s.stationarity >= 1e-6:
        checks.append(_grade("kink", kink_size, 0.1, 0.5,
                             "w̄ sits on a kink of the risk (piecewise-linear units at zero, typical after fine-tuning "
                             "a ReLU network to stationarity): first-order answers and converged retraining see one "
                             "side of it; read the estimate with caution, or use a smooth activation"))
    status = max((c.status for c in checks), key=STATUSES.index)
    return Verdict(status, tuple(checks))
