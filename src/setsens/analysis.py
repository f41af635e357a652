"""One call for a user's own model: the estimated set, what it does to predictions, and a verdict.

``analyze(problem, perturbation)`` runs :func:`setsens.estimate`, grades it without retraining
(:mod:`setsens.verdict`), and measures the predicted change of the outputs on held-out points (and on
the moved points): which predictions flip at the centre of the set, how margins move, and which
predictions the set leaves undetermined (members disagree).  With ``validate=True`` it retrains
(:func:`setsens.retrain.budget_response`: same budget on perturbed and clean data, from w̄; or, on a
problem with weight decay, whose local minimiser is isolated, the converged response: L-BFGS to
stationarity on both, checked to be tolerance-independent) and scores the estimate and the damped
influence function on the same held-out outputs.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .filters import ggn_filter
from .finetune import Training
from .problem import NotStationaryWarning, Perturbation, Problem
from .progress import ProgressFn, report
from .retrain import budget_response, proximal_response, training_response
from .solution_set import METHODS, RadiusOptions, SolutionSet, SolveOptions, estimate
from .tangent import (SECANT, TANGENT, TrainingTangent, jump_ratio, output_derivatives, secant_residual,
                      training_tangent, validity_ratio)
from .verdict import (FLOOR_THRESHOLD, JUMP_THRESHOLD, PRECISION_THRESHOLD, SECANT_THRESHOLD, VALIDITY_THRESHOLD,
                      LossOnPoints, Verdict, assess, assess_tangent, first_order_residual, kink, tangent_precision)

__all__ = ["Analysis", "analyze", "analyze_training", "validate_tangent", "choose_method", "choose_step", "outputs_on",
           "validity", "secant_floor", "relative_step", "REFERENCES", "TANGENT", "SECANT", "VALIDITY_STEPS"]

#: ``validate_estimate``'s references: same-budget retraining, converged retraining, or by the problem.
REFERENCES = ("auto", "budget", "converged")


@dataclass
class Analysis:
    """What :func:`analyze` found.  ``summary()`` is the JSON of ``setsens analyze --json``."""

    method: str
    method_reason: str
    estimate: SolutionSet | TrainingTangent
    verdict: Verdict
    loss_on_points: LossOnPoints
    members: Tensor
    predictions: dict
    validation: dict | None = None
    notes: list[str] = field(default_factory=list)
    changes: dict[str, Tensor] = field(default_factory=dict, repr=False)  # validated output changes, for figures
    validity: dict | None = None

    def summary(self) -> dict:
        lp, est = self.loss_on_points, self.estimate
        out = {
            "verdict": self.verdict.to_dict(), "method": self.method, "method_reason": self.method_reason,
            "loss_on_points": {"clean": lp.clean, "original": lp.original, "estimate": lp.estimate,
                               "increase_removed": lp.increase_removed},
            "perturbation": {"indices": est.perturbation.indices.tolist(), "norm": est.perturbation.norm(),
                             "step_percent": relative_step(est.problem, est.perturbation)},
            "predictions": self.predictions, "validation": self.validation, "notes": self.notes,
        }
        if isinstance(est, TrainingTangent):
            out["estimate"] = est.summary()
            out["validity"] = self.validity
        else:
            out["set"] = dict(est.summary(), members=int(self.members.shape[0]),
                              member_distances_from_w_bar=[float((m - est.w_bar).norm()) for m in self.members])
        return out


def choose_method(problem: Problem) -> tuple[str, str]:
    """``method="auto"``: Gauss–Newton for a squared error (it equals eq. 19 at a zero-residual fit and
    costs a JVP and a VJP per iteration); eq. 19 otherwise (for cross-entropy, the moved outputs are
    weighted by their curvature, as retraining weighs them; Gauss–Newton would restore them fully)."""
    if problem.weight_decay:
        return "hessian", "weight decay is part of the risk: only eq. 19 has its term"
    if problem.loss_is_squared_error:
        return "gauss-newton", "squared-error loss: Gauss–Newton equals eq. 19 at a zero-residual fit, cheaper"
    return "hessian", "not a squared error: eq. 19 weighs each output by its curvature, as retraining does"


def outputs_on(problem: Problem, w: Tensor, x: Tensor) -> Tensor:
    """``f(x, w)`` in batches of ``problem.batch_size`` (memory bounded by the batch)."""
    size = getattr(problem, "batch_size", None) or getattr(getattr(problem, "loader", None), "batch_size", None) or 256
    dtype = problem.dtype if x.is_floating_point() else x.dtype
    with torch.no_grad():
        return torch.cat([problem.outputs(w, x[s:s + size].to(problem.device, dtype))
                          for s in range(0, x.shape[0], size)])


def _comparable(problem: Problem, out: Tensor) -> Tensor:
    """:meth:`Problem.as_loss_sees` in float64 (for scores and norms)."""
    return problem.as_loss_sees(out).double()


def predicted_change(tangent: TrainingTangent, x: Tensor) -> Tensor:
    """The change of the outputs at ``x`` a tangent predicts, ``f(centre) − f(base)``, as the loss sees them, in
    float64.  Cost: two forward passes over ``x``."""
    problem = tangent.problem
    return _comparable(problem, outputs_on(problem, tangent.centre, x)) \
        - _comparable(problem, outputs_on(problem, tangent.base, x))


def _is_classification(out: Tensor, y: Tensor | None) -> bool:
    return out.ndim == 2 and out.shape[1] > 1 and y is not None and not y.is_floating_point()


def _margins(out: Tensor, y: Tensor) -> Tensor:
    """``f_y − max_{j≠y} f_j`` per point: positive when the point is classified correctly."""
    true = out.gather(1, y[:, None])[:, 0]
    others = out.scatter(1, y[:, None], float("-inf"))
    return true - others.max(dim=1).values


def prediction_change(problem: Problem, x: Tensor, y: Tensor | None, base: Tensor, centre: Tensor,
                      members: Tensor) -> dict:
    """How the outputs on ``x`` move from ``base`` (w̄, or the clean fine-tuning's end) to the estimate's centre,
    and how far the set's members spread them."""
    before = outputs_on(problem, base, x)
    after = outputs_on(problem, centre, x)
    change = (_comparable(problem, after) - _comparable(problem, before)).norm(dim=1)
    record = {"points": int(x.shape[0]), "output_change": {"mean": float(change.mean()), "max": float(change.max())}}
    if not _is_classification(before, y):
        if len(members):
            spread = torch.stack([_comparable(problem, outputs_on(problem, m, x)) for m in members])
            record["member_output_spread_max"] = float((spread.amax(0) - spread.amin(0)).max())
        return record
    y = y.to(before.device)
    pred0, pred1 = before.argmax(1), after.argmax(1)
    flips = (pred0 != pred1).nonzero()[:, 0]
    m0, m1 = _margins(before, y), _margins(after, y)
    dm = (m1 - m0).double()
    preds = [pred1] + [outputs_on(problem, m, x).argmax(1) for m in members]
    undetermined = (torch.stack(preds) != pred0).any(0).nonzero()[:, 0]
    record.update({
        "accuracy": {"before": float((pred0 == y).double().mean()), "estimate": float((pred1 == y).double().mean())},
        "flips": {"count": int(flips.numel()), "indices": flips[:50].tolist()},
        "margin_change": {"mean": float(dm.mean()), "median": float(dm.median()), "min": float(dm.min()),
                          "max": float(dm.max())},
        "undetermined_by_set": {"count": int(undetermined.numel()), "indices": undetermined[:50].tolist(),
                                "explanation": "points whose predicted class changes at the centre or at some "
                                               "sampled member of the set"},
        "margins": {"before": m0.double().tolist(), "estimate": m1.double().tolist()},
    })
    return record


def _score(pred: Tensor, ref: Tensor) -> dict:
    pred, ref = pred.reshape(-1).double(), ref.reshape(-1).double()
    pearson = float(torch.corrcoef(torch.stack([pred, ref]))[0, 1]) if float(pred.std()) > 0 else float("nan")
    return {"pearson": pearson, "relative_error": float((pred - ref).norm() / max(float(ref.norm()), 1e-300))}


def _reference_kind(problem: Problem, reference: str) -> str:
    """``"budget"`` or ``"converged"`` for :data:`REFERENCES`' ``reference`` on this problem."""
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    if reference == "auto":
        return "converged" if problem.weight_decay else "budget"
    if reference == "converged" and not problem.weight_decay:
        raise ValueError("the converged reference needs weight decay (else the minimiser need not be finite): "
                         "use reference='budget'")
    return reference


def validate_estimate(problem: Problem, perturbation: Perturbation, result: SolutionSet, x_eval: Tensor, *,
                      steps: int = 1000, reference: str = "auto", solve: SolveOptions | None = None,
                      progress: ProgressFn | None = None) -> tuple[dict, dict]:
    """Score the estimate against retraining on the outputs at ``x_eval``: Pearson correlation and
    relative error between the predicted and the retrained change; the damped influence function is
    scored the same way.  ``reference``: ``"budget"`` (:func:`setsens.retrain.budget_response`,
    ``steps`` each), ``"converged"`` (:func:`setsens.retrain.proximal_response` with λ = 0: L-BFGS on perturbed
    and clean data to ‖∇L‖ ≤ 1e-3·‖∇L(w̄; xᵖ)‖, and 100× tighter to check; needs weight decay) or ``"auto"``
    (converged when the problem has weight decay).  Returns the output changes (reference,
    estimate, influence) and the scores."""
    reference = _reference_kind(problem, reference)
    at = lambda w: _comparable(problem, outputs_on(problem, w, x_eval))  # noqa: E731
    if reference == "budget":
        ref = budget_response(problem, perturbation, steps=steps, progress=progress)
        perturbed, clean = ref.perturbed, ref.clean
        record = {"kind": "budget_response", "steps": ref.steps, "lr": ref.lr, "lr_halvings": ref.halvings,
                  "stable": ref.stable,
                  "change_when_halved": ref.change_when_halved, "weight_drift": ref.drift}
    else:
        # the tolerance is relative to the gradient the move creates at w̄: what is left of it at the end
        # moves the response by about a thousandth of itself
        gtol = 1e-3 * float(problem.gradient(problem.params, perturbation).norm())
        ref = proximal_response(problem, perturbation, 0.0, gtol=gtol, max_iter=steps)
        perturbed, clean = ref.perturbed.w, ref.clean.w
        record = {"kind": "converged_response", "max_iter": steps, "gtol": gtol, "stable": ref.stable,
                  "converged": ref.perturbed.converged and ref.clean.converged,
                  "change_when_tightened": ref.change_when_tightened,
                  "weight_drift": float((clean - problem.params).norm())}
    base, clean_out = at(problem.params), at(clean)
    ref_change = at(perturbed) - clean_out
    influence = estimate(problem, perturbation, "influence",
                         solve=None if solve is None else SolveOptions(maxiter=solve.maxiter, rtol=solve.rtol))
    changes = {"reference": ref_change, "estimate": at(problem.params + result.shift) - base,
               "influence": at(problem.params + influence.shift) - base}
    influence_score = _score(changes["influence"], ref_change)
    idx = perturbation.indices
    return changes, {
        "reference": record["kind"], "reference_stable": bool(record["stable"]),
        "reference_run": record | {"output_change_norm": float(ref_change.norm()),
                                   "output_drift_norm": float((clean_out - base).norm()),
                                   "loss_on_points": problem.loss_on(idx, perturbed, perturbation),
                                   "loss_on_points_clean_run": problem.loss_on(idx, clean, perturbation)},
        "points": int(x_eval.shape[0]),
        **_score(changes["estimate"], ref_change),
        "influence": influence_score,
        "influence_pearson": influence_score["pearson"],
    }


def _evaluation_points(problem: Problem, perturbation: Perturbation, test: tuple | None):
    """``(x, y, notes)``: the held-out points, or the unmoved training points standing in for them."""
    if test is not None:
        return test[0], test[1], []
    keep = torch.ones(problem.n, dtype=torch.bool)
    keep[perturbation.indices] = False
    x, y = problem.points(keep.nonzero()[:, 0])
    return x, y, ["no held-out data: the unmoved training points stand in for held-out points"]


def _predictions(problem: Problem, perturbation: Perturbation, x_eval: Tensor, y_eval: Tensor | None, held_out: bool,
                 base: Tensor, centre: Tensor, members: Tensor) -> dict:
    """:func:`prediction_change` on the evaluation points and on the moved points (at their new place)."""
    x_moved, y_moved = problem.points(perturbation.indices)
    x_moved = x_moved + perturbation.delta.to(x_moved)
    return {"held_out" if held_out else "unmoved_training_points":
            prediction_change(problem, x_eval, y_eval, base, centre, members),
            "moved_points": prediction_change(problem, x_moved, y_moved, base, centre, members)}


def analyze(problem: Problem, perturbation: Perturbation, method: str = "auto", *, test: tuple | None = None,
            members: int = 8, seed: int = 0, solve: SolveOptions | None = None,
            radius: RadiusOptions | None = None, validate: bool = False, steps: int = 1000,
            reference: str = "auto", progress: ProgressFn | None = None, training: Training | None = None) -> Analysis:
    """Estimate the set after ``perturbation``, grade it, and measure its effect on predictions.

    Args:
        method: ``"auto"`` (:func:`choose_method`), one of :data:`setsens.solution_set.METHODS`, or
            :data:`TANGENT` or :data:`SECANT` (:func:`analyze_training` with ``training``; ``members``, ``solve``,
            ``radius``, ``steps`` and ``reference`` do not apply to them and are refused).
        test: held-out ``(x, y)`` (``y`` may be None); without it, the unmoved training points stand in.
        members: members of the set sampled to see how far it spreads the predictions.
        validate: retrain (``steps`` steps on the perturbed and on the clean data: ``2·steps`` gradient
            passes) and score the estimate and the influence function.
        reference: the retraining to validate against (see :func:`validate_estimate`); checked first.
        progress: called with a :class:`~setsens.progress.Progress` at each stage (``estimate``, ``verdict``
            with ``info["verdict"]``, ``predictions``, ``validate``) and for each unit of the long ones
            (``candidate``, ``tangent``, ``retrain``).

    Cost: one :func:`estimate`, ``members`` null projections and forward passes over the held-out points.
    """
    if method in (TANGENT, SECANT):
        given = [name for name, value, default in (("solve", solve, None), ("radius", radius, None),
                                                   ("steps", steps, 1000), ("reference", reference, "auto"),
                                                   ("members", members, 8))
                 if value != default]
        if given:
            raise ValueError(f"{', '.join(given)} {'do' if len(given) > 1 else 'does'} not apply to method "
                             f"{method!r} (its training is `training`)")
        return analyze_training(problem, perturbation, training or Training(), test=test, validate=validate,
                                secant=method == SECANT, progress=progress)
    if training is not None:
        raise ValueError(f"training applies to methods {TANGENT!r} and {SECANT!r} only, not {method!r}")
    if method != "auto" and method not in METHODS:
        raise ValueError(f"method must be 'auto', {TANGENT!r}, {SECANT!r} or one of {METHODS}, got {method!r}")
    if members < 0:
        raise ValueError(f"members must be ≥ 0, got {members}")
    _reference_kind(problem, reference)  # checked before any work
    reason = "chosen by the caller"
    if method == "auto":
        method, reason = choose_method(problem)
        if solve is not None and solve.preconditioner != "none" and method != "gauss-newton":
            raise ValueError(f"the preconditioner applies to Gauss–Newton only, and method 'auto' chose {method} "
                             f"({reason}): pass method='gauss-newton' or no preconditioner")
    report(progress, "estimate", method=method)
    result = estimate(problem, perturbation, method, solve=solve, radius=radius,
                      progress=progress)
    idx = perturbation.indices
    loss = LossOnPoints(clean=problem.loss_on(idx), original=problem.loss_on(idx, perturbation=perturbation),
                        estimate=problem.loss_on(idx, result.centre, perturbation))
    verdict = assess(result, loss, first_order_residual(result), kink(result))
    report(progress, "verdict", verdict=verdict)
    sampled = result.sample(members, torch.Generator().manual_seed(seed)) if members and method != "influence" \
        else result.shift.new_zeros(0, problem.p)
    x_eval, y_eval, notes = _evaluation_points(problem, perturbation, test)
    report(progress, "predictions")
    predictions = _predictions(problem, perturbation, x_eval, y_eval, test is not None, problem.params, result.centre,
                               sampled)
    validation, changes = None, {}
    if validate:
        report(progress, "validate", steps=steps)
        changes, validation = validate_estimate(problem, perturbation, result, x_eval, steps=steps,
                                                reference=reference, solve=solve,
                                                progress=progress)
        run = validation["reference_run"]
        if run["output_change_norm"] == 0.0:
            notes.append("retraining did not move the held-out outputs at all: there is nothing to validate against")
        elif not run["stable"] and "change_when_halved" in run:
            notes.append(f"the retraining reference still changes with its budget (change_when_halved "
                         f"{run['change_when_halved']:.2f}): raise the retraining steps")
        elif not run["stable"]:
            notes.append(f"the converged reference still changes when its tolerance is tightened "
                         f"({run['change_when_tightened']:.2f}): raise the retraining steps")
    if math.isnan(loss.increase_removed):
        notes.append("the move did not raise the loss on its points")
    return Analysis(method, reason, result, verdict, loss, sampled, predictions, validation, notes, changes)


def relative_step(problem: Problem, perturbation: Perturbation) -> float:
    """The perturbation's size in percent: ``100 · max_k ‖Δx_k‖ / ‖x_k‖`` over the moved points."""
    x, _ = problem.points(perturbation.indices)
    size = perturbation.delta.to(x).reshape(len(x), -1).norm(dim=1) / x.reshape(len(x), -1).norm(dim=1)
    return 100 * float(size.max())


#: the per-step check :func:`validity` grades each tangent by, and the key of its figure at the tangent's own step
CHECK_FIGURES = {"jump": "jump_ratio", "secant": "secant_residual"}

#: the steps (%) :func:`validity` grades, largest first; ``--step auto`` takes the largest inside the range
VALIDITY_STEPS = (10.0, 3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)


def validity(tangent: TrainingTangent, x_eval: Tensor, steps: tuple = VALIDITY_STEPS, *, secant: bool = False,
             floor_factor: float = 300.0, known_floor: tuple[float, float] | None = None) -> dict:
    """The steps at which the tangent's (``secant``: the secant tangent's) answer can hold, without retraining.

    Figures grade a step ``s`` (in %), each against its threshold in :mod:`setsens.verdict`:

    * ``ratio``: the second-order term of the outputs at ``x_eval`` over the first, ``s·κ`` with
      κ = ‖o″‖/(2‖o′‖) per unit step (:func:`setsens.tangent.validity_ratio`; exact Taylor terms of a smooth
      map);
    * ``jump`` (the tangent): :func:`setsens.tangent.jump_ratio` at ``s``: whether one training step is
      differentiable at that scale (O(s²) where it is smooth; of order one where units change sides, as in ReLU
      networks, whose training map is only piecewise smooth with jumps — then no step may be inside);
    * ``secant`` (the secant tangent): :func:`setsens.tangent.secant_residual` at ``s`` on the tangent's probes:
      the share of one step's gradient change the secant misses (O(s));
    * ``above_floor`` (the secant tangent): the first-order change of the outputs at ``s``, ``s·‖o′‖``, over
      ``floor`` (:func:`secant_floor`, one secant tangent): the change the secant tangent predicts at a
      ``floor_factor`` × smaller step than ``floor_step``, the largest step the ratio lets inside — the part of
      the training map that does not shrink with the step (units that change sides however small the move).
      Where a step's change is not well above it, the fine-tuning is mostly that noise and no first-order answer
      predicts it.  Measured at the largest move a step inside can have, it bounds their floors from above, so the
      figure errs low (:func:`analyze_training` measures the floor of the step it analyses).

    A step is inside when all are within their thresholds and the predicted change is above the rounding of the
    weights (``precision`` ≥ :data:`setsens.verdict.PRECISION_THRESHOLD`, :func:`setsens.verdict.tangent_precision`:
    below it the tangent and the reference are rounding, in float32 already at 1e-3 % on the zoo's CNN, whose
    units do not change sides there).  ``curve`` grades the ``steps`` from the largest down until one is inside.
    When none is, it grades one more (the grid can step over a narrow range): every figure but the check is
    proportional to the step, so the interval where they all hold is known, and the extra step is its geometric
    middle (2 digits), below any step whose check failed.  ``step_max`` is the largest step inside (0 when none
    is).  ``ratio`` and ``jump_ratio`` (``secant_residual``) are the figures at the tangent's own step.  Needs a
    (plain) tangent of ``order=2``.  ``known_floor``: ``(floor_step, floor)`` of an earlier record for the same
    direction and training, reused when its step is this one's (the ratio's bound is an absolute step: it does not
    depend on the step the tangent was taken at).  Cost: two nested JVPs per batch of ``x_eval``, about 5 gradients
    per probe of the tangent for each step graded, and (``secant``, unless ``known_floor`` is reused) one secant
    tangent.
    """
    if tangent.second is None or tangent.method != TANGENT:
        raise ValueError("validity needs the plain tangent's second derivative: training_tangent(..., order=2)")
    problem = tangent.problem
    first, second = output_derivatives(problem, tangent.base, tangent.shift, x_eval, tangent.second)
    kappa = validity_ratio(first, second)
    step, precision = relative_step(problem, tangent.perturbation), tangent_precision(tangent)
    check, measure, limit = ("secant", secant_residual, SECANT_THRESHOLD) if secant else \
        ("jump", jump_ratio, JUMP_THRESHOLD)
    own = measure(tangent)
    largest = min(VALIDITY_THRESHOLD * step / kappa if kappa > 0 else math.inf, max(steps))  # the ratio's bound
    floor = None
    if secant and known_floor is not None and math.isclose(known_floor[0], largest, rel_tol=1e-6):
        floor = known_floor[1]
    elif secant:  # at the largest step the ratio lets inside: an upper bound on the floor of every step inside
        floor = secant_floor(problem, tangent.perturbation.scaled(largest / step), tangent.training, x_eval,
                             floor_factor)
    first_norm = float(first.norm())

    def grade(s: float) -> dict:
        point = {"step": s, "ratio": kappa * s / step, check: None, "precision": precision * s / step}
        if secant:
            point["above_floor"] = first_norm * s / step / floor if floor > 0 else math.inf
        if _proportional_figures_hold(point):  # the tangent's own step is probed once
            point[check] = (own if abs(s / step - 1) < 1e-6 else measure(tangent.scaled(s / step)))["median"]
        return point

    curve = []
    for s in sorted(steps, reverse=True):
        curve.append(grade(s))
        if curve[-1]["precision"] < PRECISION_THRESHOLD or curve[-1].get("above_floor", math.inf) < FLOOR_THRESHOLD:
            break  # every smaller step is rounding (or below the floor) too
        if _inside(curve[-1], check, limit):
            break
    if not any(_inside(p, check, limit) for p in curve):
        # the interval where the figures proportional to the step hold; its geometric middle is graded
        low = max(PRECISION_THRESHOLD * step / precision if precision > 0 else math.inf,
                  FLOOR_THRESHOLD * step * floor / first_norm if secant and first_norm > 0 else 0.0)
        high = min([largest] + [p["step"] for p in curve if p[check] is not None])
        middle = float(f"{math.sqrt(low * high):.2g}") if 0 < low < high < math.inf else 0.0
        if low < middle < high:
            curve = sorted(curve + [grade(middle)], key=lambda p: -p["step"])
    inside = [p["step"] for p in curve if _inside(p, check, limit)]
    record = {"ratio": kappa, CHECK_FIGURES[check]: own,
              "threshold": VALIDITY_THRESHOLD, "check": check, "check_threshold": limit, "step_percent": step,
              "step_max": inside[0] if inside else 0.0, "curve": curve, "first_order_output_norm": first_norm,
              "second_order_output_norm": float(second.norm()) / 2}
    if secant:
        record |= {"floor": floor, "floor_step": largest, "floor_factor": floor_factor,
                   "floor_threshold": FLOOR_THRESHOLD}
    return record


def secant_floor(problem: Problem, perturbation: Perturbation, training: Training, x_eval: Tensor,
                 floor_factor: float = 300.0) -> float:
    """The noise floor of a secant tangent at ``perturbation``: ‖the change of the outputs at ``x_eval`` it predicts
    at a ``floor_factor`` × smaller step‖ — the part of the training map that does not shrink with the step.
    Cost: one secant tangent (about 3 gradients per training step)."""
    low = training_tangent(problem, perturbation.scaled(1 / floor_factor), training, secant=True, probes=0)
    return float(predicted_change(low, x_eval).norm())


def _proportional_figures_hold(point: dict) -> bool:
    """Whether a graded step's figures proportional to the step (ratio, precision, above_floor) are within range."""
    return (point["ratio"] <= VALIDITY_THRESHOLD and point["precision"] >= PRECISION_THRESHOLD
            and point.get("above_floor", math.inf) >= FLOOR_THRESHOLD)


def _inside(point: dict, check: str, limit: float) -> bool:
    return point[check] is not None and point[check] <= limit and _proportional_figures_hold(point)


def choose_step(valid: dict) -> tuple[float, bool]:
    """``(step %, inside)``: :func:`validity`'s ``step_max``, or, when no graded step is inside the range, the one
    closest to it (the smallest worst ratio-to-threshold)."""
    if valid["step_max"] > 0:
        return valid["step_max"], True
    check = valid["check"]
    graded = [p for p in valid["curve"] if p[check] is not None] or valid["curve"]
    worst = lambda p: max(p["ratio"] / valid["threshold"], (p[check] or 0) / valid["check_threshold"],  # noqa: E731
                          PRECISION_THRESHOLD / max(p["precision"], 1e-300),
                          FLOOR_THRESHOLD / max(p.get("above_floor", math.inf), 1e-300))
    return min(graded, key=worst)["step"], False


def analyze_training(problem: Problem, perturbation: Perturbation, training: Training = Training(), *,
                     test: tuple | None = None, validate: bool = False, secant: bool = False,
                     tangent: TrainingTangent | None = None, auto_step: bool = False, floor_factor: float = 300.0,
                     filter_rank: int = 0, progress: ProgressFn | None = None) -> Analysis:
    """The training tangent (:mod:`setsens.tangent`; ``secant``: the secant tangent) of ``training`` along
    ``perturbation``: its predicted change of the outputs, the range of steps where it holds (:func:`validity`), a
    verdict, and with ``validate`` its score against the reference it predicts (:func:`validate_tangent`).

    ``tangent``: a precomputed (plain) ``order=2`` tangent for this perturbation (else one is computed); it gives
    the validity range, and is the estimate unless ``secant``.
    ``auto_step``: analyse at :func:`choose_step`'s step instead of ``perturbation``'s own (``--step auto``): the
    tangent is taken once at ``perturbation`` (its direction; its size only sets where the second-order ratio is
    read) and rescaled (a derivative at the data is linear in Δx); ``validity["auto"]`` holds the step and whether it
    is inside the range (``step_max``) or, when none is, the closest to it.
    ``filter_rank``: with ``validate``, also score the linearised-training filter of that Lanczos rank.
    Cost: one second-order tangent (about 7.5 gradients per training step) and the probes of :func:`validity`;
    ``secant`` adds three secant tangents (about 3 gradients per step each: the estimate, its noise floor, and
    the range's floor at the largest step the ratio lets inside);
    ``validate`` adds :func:`validate_tangent`'s.
    """
    problem.check_perturbation(perturbation)
    method = SECANT if secant else TANGENT
    x_eval, y_eval, notes = _evaluation_points(problem, perturbation, test)
    if tangent is None:
        report(progress, "estimate", method=TANGENT)
        tangent = training_tangent(problem, perturbation, training, order=2, progress=progress)
    valid = validity(tangent, x_eval, secant=secant, floor_factor=floor_factor)
    if auto_step:
        chosen, inside = choose_step(valid)
        scale = chosen / valid["step_percent"]
        perturbation, tangent = perturbation.scaled(scale), tangent.scaled(scale)
        known = (valid["floor_step"], valid["floor"]) if secant else None
        valid = validity(tangent, x_eval, secant=secant, floor_factor=floor_factor, known_floor=known)
        valid["auto"] = {"step": chosen, "inside": inside}
    estimate = tangent
    if secant:
        report(progress, "estimate", method=SECANT)
        estimate = training_tangent(problem, perturbation, tangent.training, secant=True, progress=progress)
    idx = perturbation.indices
    loss = LossOnPoints(clean=problem.loss_on(idx, estimate.base),
                        original=problem.loss_on(idx, estimate.base, perturbation),
                        estimate=problem.loss_on(idx, estimate.centre, perturbation))
    above = None
    if secant:
        change = float(predicted_change(estimate, x_eval).norm())
        floor = valid["floor"] if math.isclose(valid["floor_step"], valid["step_percent"], rel_tol=1e-9) else \
            secant_floor(problem, perturbation, tangent.training, x_eval, floor_factor)
        above = change / floor if floor > 0 else math.inf
        valid |= {"above_floor": above, "growth": above / floor_factor, "floor_at_step": floor}
        if estimate.uncovered:
            notes.append(f"the secant covers ReLU, leaky ReLU and max-pooling; these piecewise-linear functions "
                         f"kept their derivative: {', '.join(estimate.uncovered)}")
    own = valid[CHECK_FIGURES[valid["check"]]]["median"]
    verdict = assess_tangent(estimate, valid["ratio"], own, above, floor_factor)
    report(progress, "verdict", verdict=verdict)
    report(progress, "predictions")
    none = estimate.shift.new_zeros(0, problem.p)
    predictions = _predictions(problem, perturbation, x_eval, y_eval, test is not None, estimate.base,
                               estimate.centre, none)
    validation, changes = None, {}
    if validate:
        report(progress, "validate", steps=training.steps)
        changes, validation, more = validate_tangent(estimate, x_eval, floor_factor=floor_factor,
                                                     filter_rank=filter_rank, progress=progress)
        notes += more
    what = "the secant tangent" if secant else "the tangent"
    reason = f"{what} of the fine-tuning run: " + estimate.training.describe()
    return Analysis(method, reason, estimate, verdict, loss, none, predictions, validation, notes, changes, valid)


def validate_tangent(tangent: TrainingTangent, x_eval: Tensor, *, floor_factor: float = 300.0, filter_rank: int = 0,
                     progress: ProgressFn | None = None) -> tuple[dict, dict, list[str]]:
    """Score the tangent against the reference it predicts, :func:`setsens.retrain.training_response` (the same
    training on the perturbed and on the clean data), on the outputs at ``x_eval``; the damped influence function
    (and, with ``filter_rank``, :func:`setsens.filters.ggn_filter`) are scored the same way.

    The reference is ``stable`` when it did not diverge and its change is at least 10× its noise floor (the change
    at a ``floor_factor`` × smaller step); ``self_consistency`` is the Pearson correlation of its change with 3×
    its change at a third of the step — about the best any first-order prediction of it can reach (1 where the
    training map is smooth; below where it jumps, as a ReLU network's does wherever a unit changes sides).
    Returns the output changes, the scores and notes.  Cost: four fine-tuning runs (one gradient per step
    each), one influence solve, and the filter's Lanczos run.
    """
    problem, perturbation, training = tangent.problem, tangent.perturbation, tangent.training
    ref = training_response(problem, perturbation, training, floor_factor=floor_factor, progress=progress)
    at = lambda w: _comparable(problem, outputs_on(problem, w, x_eval))  # noqa: E731
    clean_out, base = at(ref.clean), at(problem.params)
    ref_change = at(ref.perturbed) - clean_out
    with warnings.catch_warnings():  # the baseline assumes a stationary w̄; the tangent does not
        warnings.simplefilter("ignore", NotStationaryWarning)
        influence = estimate(problem, perturbation, "influence")
    changes = {"reference": ref_change, "estimate": predicted_change(tangent, x_eval),
               "influence": at(problem.params + influence.shift) - base}
    if filter_rank and training.optimizer == "sgd":
        changes["filter"] = at(problem.params + ggn_filter(problem, perturbation, training, rank=filter_rank).shift) \
            - base
    size, floor = float(ref_change.norm()), float((at(ref.floor) - clean_out).norm())
    above = size / floor if floor > 0 else float("inf")
    stable = bool(not ref.diverged and size == size and above >= 10)
    idx = perturbation.indices
    run = {"kind": "training_response", "training": training.describe(), "lr": training.lr, "steps": training.steps,
           "diverged": ref.diverged, "stable": stable, "output_change_norm": size, "noise_floor": floor,
           "floor_factor": floor_factor, "change_over_floor": above,
           "self_consistency": _score(3 * (at(ref.third) - clean_out), ref_change)["pearson"],
           "output_drift_norm": float((clean_out - base).norm()),
           "loss_on_points": problem.loss_on(idx, ref.perturbed, perturbation),
           "loss_on_points_clean_run": problem.loss_on(idx, ref.clean, perturbation)}
    scores = {name: _score(change, ref_change) for name, change in changes.items() if name != "reference"}
    validation = {"reference": "training_response", "reference_stable": stable, "reference_run": run,
                  "points": int(x_eval.shape[0]), **scores.pop("estimate"), **scores,
                  "influence_pearson": scores["influence"]["pearson"]}
    notes = []
    if ref.diverged:
        notes.append("the reference's fine-tuning diverged at this step: it is no truth to score against")
    elif above < 10:
        notes.append(f"the reference's change is only {above:.3g}× its noise floor (the change at a "
                     f"{floor_factor:g}× smaller step): the retrained change is mostly noise, use a larger step")
    return changes, validation, notes
