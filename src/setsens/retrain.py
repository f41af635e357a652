"""Warm-started retraining: the references every estimate is judged by.

* ``retrain`` — full-batch L-BFGS (strong Wolfe line search) on the (perturbed) risk from ``w0``
  until ``‖∇L‖ ≤ gtol``, optionally with a proximal term ``(λ/2)‖w − anchor‖²``.
* ``levenberg_marquardt`` — for squared-error fits at zero residual: converges quadratically onto
  the interpolating solution set, every step across it (in the row space of the residual Jacobian);
  ``distance_to_solution_set`` uses it on small problems.  Near a set of minimisers the loss is
  locally quadratic and every step lies in range(H), so the distance moved estimates ``d(w, S(xᵖ))``
  up to the curvature of the set.
* ``proximal_response`` — for losses without finite minimisers (cross-entropy at a separable fit,
  where "retrain until ‖∇L‖ ≤ gtol" moves further the smaller gtol is): the perturbation-induced
  proximal response ``argmin L(xᵖ, w) + (λ/2)‖w − w̄‖² − argmin L(x̄, w) + (λ/2)‖w − w̄‖²`` (after
  Bae et al. 2022), whose minimisers are finite; it checks its own stability under a 100× tighter
  tolerance and says so.  With λ = 0 on a problem with weight decay it is the *converged response*
  ``argmin L(xᵖ, ·) − argmin L(x̄, ·)`` (both from w̄): the reference for a w̄ polished to stationarity,
  whose first-order prediction is the undamped ``−H⁻¹ J Δx``.
* ``budget_response`` — for a w̄ that is not stationary (a model trained as people train): gradient
  descent with momentum from w̄ with the same budget on the perturbed and on the clean data; the difference is what
  the perturbation caused (the common drift towards a stationary point cancels).  On the quadratic
  model it tends to the minimum-norm shift the estimates target as the budget grows.
* ``training_response`` — the same idea for a named :class:`~setsens.finetune.Training` (any optimiser, lr,
  steps, batch order), run as the user runs it (``torch.optim``) and held fixed whatever the step: a run that
  diverges is reported, never retrained differently.  Its noise floor is measured, not assumed: the change the
  same direction causes at a 300× smaller step (a ReLU network's runs part wherever a unit changes sides, not
  only at rounding).  It is what :mod:`setsens.tangent` predicts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .operators import dense_output_jacobian
from .problem import Perturbation, Problem, regression_targets
from .progress import part

__all__ = ["RetrainResult", "retrain", "levenberg_marquardt", "distance_to_solution_set", "ProximalResponse",
           "proximal_response", "pbrf_response", "BudgetResponse", "budget_response", "TrainingResponse",
           "training_response"]


@dataclass
class RetrainResult:
    w: Tensor
    start: Tensor
    grad_norm: float
    risk: float
    iterations: int
    evaluations: int
    seconds: float
    converged: bool

    @classmethod
    def finish(cls, problem, w, w0, perturbation, iterations, evaluations, t0, gtol) -> "RetrainResult":
        """Measure the final point (‖∇L‖, risk) and package the run."""
        g = float(problem.gradient(w, perturbation).norm())
        return cls(
            w=w, start=w0.detach().clone(), grad_norm=g, risk=problem.risk(w, perturbation),
            iterations=iterations, evaluations=evaluations, seconds=time.perf_counter() - t0,
            converged=g <= gtol,
        )

    @property
    def distance(self) -> float:
        """‖w_retrained − w_start‖: the estimate of d(w_start, S(xᵖ))."""
        return float((self.w - self.start).norm())


def retrain(
    problem: Problem,
    w0: Tensor | None = None,
    perturbation: Perturbation | None = None,
    gtol: float = 1e-9,
    max_iter: int = 5000,
    history: int = 50,
    damping: float = 0.0,
    anchor: Tensor | None = None,
) -> RetrainResult:
    """Full-batch L-BFGS on the (perturbed) risk from ``w0`` until ``‖∇‖₂ ≤ gtol``.

    With ``damping`` λ > 0 the objective is ``L + (λ/2)‖w − anchor‖²`` (anchor default w̄).
    Cost: about 1.1 gradient evaluations per iteration (one pass over the data each).
    """
    w0 = problem.params if w0 is None else w0
    anchor = problem.params if anchor is None else anchor
    w = w0.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w], lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.5), tolerance_grad=0.0,
        tolerance_change=0.0, history_size=history, line_search_fn="strong_wolfe",
    )
    evals = [0]
    t0 = time.perf_counter()

    class _Converged(Exception):
        pass

    def closure():
        opt.zero_grad()
        total = torch.zeros((), dtype=w.dtype, device=w.device)
        for x, y in problem.batches(perturbation):
            batch = problem.batch_risk(w, x, y)
            batch.backward()
            total += batch.detach()
        if damping:
            prox = 0.5 * damping * ((w - anchor) ** 2).sum()
            prox.backward()
            total += prox.detach()
        evals[0] += 1
        if float(w.grad.norm()) <= gtol:
            raise _Converged
        return total

    try:
        opt.step(closure)
    except _Converged:
        pass
    # ``closure`` may have raised before the optimiser moved ``w`` back: ``w`` holds the point
    # whose gradient met the tolerance.
    iterations = int(opt.state[opt._params[0]].get("n_iter", 0))
    result = RetrainResult.finish(problem, w.detach().clone(), w0, perturbation, iterations, evals[0], t0, gtol)
    if damping:  # the objective's gradient, not the risk's
        result.grad_norm = float((problem.gradient(result.w, perturbation) + damping * (result.w - anchor)).norm())
        result.converged = result.grad_norm <= gtol
    return result


@dataclass
class ProximalResponse:
    """``shift = w_p − w_c``: what the perturbation changes in the proximal minimiser.

    ``change_when_tightened``: ``‖shift − shift′‖/‖shift′‖`` with ``shift′`` at a 100× smaller gtol;
    ``stable`` is True when that is at most 5 % and every run reached ``gtol`` — an unstable or
    unconverged reference is flagged, never reported as converged.
    """

    shift: Tensor
    perturbed: RetrainResult
    clean: RetrainResult
    damping: float
    change_when_tightened: float
    stable: bool


def proximal_response(problem: Problem, perturbation: Perturbation, damping: float, *, gtol: float = 1e-8,
                      max_iter: int = 3000) -> ProximalResponse:
    """The perturbation-induced proximal response (see the module doc), with its stability check.

    Its first-order prediction is the damped influence function ``−(H + λI)⁻¹ J Δx``.  Cost: four
    L-BFGS runs from w̄ (perturbed and clean data, at ``gtol`` and ``gtol/100``).
    """
    if damping < 0 or (damping == 0 and not problem.weight_decay):
        raise ValueError("the proximal response needs a damping λ > 0, or λ = 0 on a problem with weight decay "
                         "(a finite minimiser)")

    def response(tol):
        pert = retrain(problem, None, perturbation, gtol=tol, max_iter=max_iter, damping=damping)
        clean = retrain(problem, None, None, gtol=tol, max_iter=max_iter, damping=damping)
        return pert.w - clean.w, pert, clean

    shift, pert, clean = response(gtol)
    tight, tight_pert, tight_clean = response(gtol / 100)
    change = float((shift - tight).norm() / max(float(tight.norm()), 1e-300))
    # every run must reach gtol (runs stopped by max_iter agree with themselves trivially); the tight ones
    # may stop short of gtol/100 at the working precision
    converged = all(r.grad_norm <= gtol for r in (pert, clean, tight_pert, tight_clean))
    return ProximalResponse(shift, pert, clean, damping, change, change <= 0.05 and converged)


def _lbfgs(objective, w0: Tensor, gtol: float, max_iter: int) -> tuple[Tensor, float]:
    """Minimise ``objective(w)`` (a scalar tensor) by L-BFGS with a strong Wolfe line search from ``w0`` until
    ``‖∇‖_∞ ≤ gtol`` (L-BFGS's own test); returns the end point and that norm."""
    w = w0.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, tolerance_grad=gtol, tolerance_change=0.0,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = objective(w)
        value.backward()
        return value

    opt.step(closure)
    w = w.detach()
    return w, float(torch.func.grad(objective)(w).abs().max())


def pbrf_response(problem: Problem, perturbation: Perturbation, damping: float, *, gtol: float = 1e-8,
                  max_iter: int = 3000) -> ProximalResponse:
    """The proximal Bregman response function (Bae et al. 2022) of the move, from w̄: the minimiser of

        Σ_i c D_ℓ(f(w, x̄_i), f(w̄, x̄_i)) + [L(xᵖ, w) − L(x̄, w)] + (λ/2)‖w − w̄‖²

    (D_ℓ the Bregman divergence of the loss in the outputs, the bracket the risk the move adds), minus w̄ (the
    minimiser without the move).  Its first-order prediction is the damped Gauss–Newton solve
    (:func:`setsens.filters.proximal_prediction`).  Checked at a 100× tighter tolerance as
    :func:`proximal_response` (``grad_norm`` is ‖∇‖_∞ here); ``perturbed`` and ``clean`` are the w̄-anchored
    runs (the clean one is w̄ itself).
    Cost: two L-BFGS runs over the data.
    """
    if not damping > 0:
        raise ValueError(f"the proximal Bregman response needs a damping λ > 0, got {damping}")
    w_bar = problem.params
    anchors = []
    with torch.no_grad():
        for x, y in problem.batches():
            out = problem.outputs(w_bar, x)
            anchors.append((out, torch.func.grad(lambda o: problem.loss(o, y).sum())(out)))
    moved = [(x, y, d) for x, y, d in problem.displaced_batches(perturbation) if d is not None]

    def objective(w):
        total = 0.5 * damping * ((w - w_bar) ** 2).sum()
        for (x, y), (out0, g0) in zip(problem.batches(), anchors):
            out = problem.outputs(w, x)
            bregman = problem.loss(out, y) - problem.loss(out0, y) - ((out - out0) * g0).flatten(1).sum(1)
            total = total + problem.weight * bregman.sum()
        for x, y, d in moved:
            total = total + problem.weight * (problem.per_sample_loss(w, x + d, y) - problem.per_sample_loss(w, x, y)
                                              ).sum()
        return total

    t0 = time.perf_counter()
    runs = [_lbfgs(objective, w_bar, tol, max_iter) for tol in (gtol, gtol / 100)]
    (w, g), (w_tight, _) = runs
    shift, tight = w - w_bar, w_tight - w_bar
    change = float((shift - tight).norm() / max(float(tight.norm()), 1e-300))
    seconds = time.perf_counter() - t0
    end = RetrainResult(w, w_bar.clone(), g, float(objective(w)), 0, 0, seconds, g <= gtol)
    start = RetrainResult(w_bar.clone(), w_bar.clone(), 0.0, 0.0, 0, 0, 0.0, True)
    return ProximalResponse(shift, end, start, damping, change, change <= 0.05 and g <= gtol)


@dataclass
class BudgetResponse:
    """Gradient descent (Nesterov momentum) from w̄ for ``steps`` (step ``lr``) on the perturbed data
    (ending at ``perturbed``) and on the clean data (ending at ``clean``); ``shift = perturbed − clean``.
    ``change_when_halved``: ``‖shift − shift½‖/‖shift‖`` against the same difference after ``steps/2``,
    small when the budget no longer matters (``stable``: ≤ 10 %).  ``drift``: ‖clean − w̄‖, how far
    training moves on its own.  ``halvings``: how often ``lr`` was halved because a run diverged."""

    perturbed: Tensor
    clean: Tensor
    steps: int
    lr: float
    drift: float
    change_when_halved: float
    stable: bool
    halvings: int = 0

    @property
    def shift(self) -> Tensor:
        return self.perturbed - self.clean


def budget_response(problem: Problem, perturbation: Perturbation | None, steps: int = 1000,
                    lr: float | None = None, momentum: float = 0.9, progress=None,
                    max_halvings: int = 10, clean_runs: dict | None = None) -> BudgetResponse:
    """The perturbation-induced change under a fixed training budget (see the module doc).

    Full-batch gradient descent with Nesterov momentum (how ResNets are trained; every step stays in
    the span of past gradients, as the minimum-norm estimates do).  ``lr`` defaults to ``1/λ_max(H)``
    (30 H v products to find it).  A run that diverges — a non-finite gradient, or a risk at its end
    above its start — is redone with half the step, both runs with the same one (at most
    ``max_halvings`` times, then a ``RuntimeError``): on ResNet-56, 1/λ_max(H) at w̄ blows up within
    200 steps.  Cost: ``2·steps`` gradient passes over the data and two risk passes, per attempt.
    ``progress``: ``Progress("retrain", k, 2·steps)`` after each step of the two runs (of each attempt).
    ``perturbation`` None: the clean data (a zero response, one run per attempt: the step size the clean run
    converges at).  ``clean_runs``: a dict in which the clean runs are kept (by step size, budget and momentum)
    and reused, so that responses to several perturbations of the same problem share one clean run per step size
    (half the cost).
    """
    from .finetune import Training, fine_tune, resolve_lr

    if steps < 2:
        raise ValueError(f"the retraining budget must be at least 2 steps, got {steps}")
    training = resolve_lr(problem, Training(lr=lr, steps=steps, momentum=momentum, nesterov=True))
    lr = training.lr

    def run(pert, lr):
        """(end, halfway), or None when the run diverged."""
        run = fine_tune(problem, pert, replace(training, lr=lr), part(progress, "retrain", steps if pert is None else 0,
                                                                          2 * steps), snapshot=steps // 2)
        return None if run.diverged else (run.w, run.snapshot)

    clean_runs = {} if clean_runs is None else clean_runs

    def clean_run(lr):
        key = (lr, steps, momentum)
        if key not in clean_runs:
            clean_runs[key] = run(None, lr)
        return clean_runs[key]

    for halvings in range(max_halvings + 1):
        perturbed = clean_run(lr) if perturbation is None else run(perturbation, lr)
        clean = perturbed and clean_run(lr)
        if clean:
            break
        lr /= 2
    else:
        raise RuntimeError(f"gradient descent diverged at every step size down to {2 * lr:.3g}")
    (wp, hp), (wc, hc) = perturbed, clean
    shift = wp - wc
    change = float((shift - (hp - hc)).norm() / max(float(shift.norm()), 1e-300))
    return BudgetResponse(wp, wc, steps, float(lr), float((wc - problem.params).norm()), change, change <= 0.1,
                          halvings)


@dataclass
class TrainingResponse:
    """``perturbed − clean``: fine-tuning by ``training`` from w̄ on the perturbed and on the clean data.

    ``floor``: the end of the perturbed run at ``perturbation.scaled(1/floor_factor)``, whose change against the
    clean run is the reference's noise floor at this step (for a smooth training map it is ``1/floor_factor`` of
    the change).  ``third``: the end at a 3× smaller step: where the map is smooth its change is a third of the
    change, so the two changes' agreement bounds what any smooth prediction can reach (a ReLU network's map
    jumps wherever a unit changes sides).  ``diverged``: some run diverged (:func:`setsens.finetune.diverged`).
    """

    perturbed: Tensor
    clean: Tensor
    floor: Tensor | None
    floor_factor: float
    training: object
    diverged: bool
    third: Tensor | None = None

    @property
    def shift(self) -> Tensor:
        return self.perturbed - self.clean


def training_response(problem: Problem, perturbation: Perturbation, training=None, *, floor_factor: float = 300.0,
                      progress=None) -> TrainingResponse:
    """The budget response of ``training`` (default :class:`~setsens.finetune.Training()`), with its noise floor.

    Cost: four fine-tuning runs (perturbed, clean, and perturbed at a ``floor_factor`` × and a 3× smaller step;
    the last two skipped with ``floor_factor=0``).  ``progress``: ``Progress("retrain", k, runs·steps)`` after
    each step of each run.
    """
    from .finetune import Training, fine_tune, resolve_lr

    training = resolve_lr(problem, training or Training())
    perts = [perturbation, None] + ([perturbation.scaled(1 / f) for f in (floor_factor, 3)] if floor_factor else [])
    T = training.steps
    runs = [fine_tune(problem, pert, training, part(progress, "retrain", i * T, len(perts) * T))
            for i, pert in enumerate(perts)]
    return TrainingResponse(runs[0].w, runs[1].w, runs[2].w if floor_factor else None, floor_factor, training,
                            any(r.diverged for r in runs), runs[3].w if floor_factor else None)


def _residuals(problem: Problem, w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """``√c (f(x) − y)`` flattened, so that ``½‖r‖²`` is the batch's share of a squared-error risk."""
    out = problem.outputs(w, x)
    return ((out - regression_targets(out, y)) * problem.weight**0.5).reshape(-1)


def levenberg_marquardt(
    problem: Problem,
    w0: Tensor | None = None,
    perturbation: Perturbation | None = None,
    gtol: float = 1e-11,
    max_iter: int = 200,
    damping: float = 1e-3,
) -> RetrainResult:
    """Levenberg–Marquardt for squared-error risks: ``Δw = −Jᵣᵀ (Jᵣ Jᵣᵀ + λI)⁻¹ r``.

    Every step lies in ``range(Jᵣᵀ)``, orthogonal to the directions that keep all residuals
    fixed at the current point, so from a warm start it converges (quadratically) to an interpolating
    solution across the manifold from the start — near, not exactly, the nearest one (Jᵣ turns along
    the path).  Its end point is exact, so its distance does not move with the tolerance.
    Forms the (n·K) × p residual Jacobian: small problems only (cost O((nK)² p) per iteration).
    """
    if not problem.loss_is_squared_error:
        raise ValueError("levenberg_marquardt needs the squared_error loss; use retrain() (L-BFGS)")
    w0 = problem.params if w0 is None else w0
    w = w0.detach().clone()
    t0 = time.perf_counter()

    def residuals(w):
        return torch.cat([_residuals(problem, w, x, y) for x, y in problem.batches(perturbation)])

    def jacobian(w):  # per sample (vmap): the residual Jacobian is √c times the output Jacobian
        return dense_output_jacobian(problem, w, perturbation) * problem.weight**0.5

    r, J = residuals(w), jacobian(w)
    lam, it, evals = damping, 0, 1
    eye = torch.eye(r.numel(), dtype=w.dtype, device=w.device)
    while it < max_iter and float((J.T @ r).norm()) > gtol:
        A = J @ J.T
        scale = float(A.diagonal().mean())
        while True:
            L, info = torch.linalg.cholesky_ex(A + lam * scale * eye)
            if int(info) == 0:
                step = -J.T @ torch.cholesky_solve(r[:, None], L)[:, 0]
                r_new = residuals(w + step)
                evals += 1
                if float(r_new.norm()) < float(r.norm()):
                    w, r = w + step, r_new
                    J = jacobian(w)
                    lam = max(lam / 5, 1e-15)
                    break
            lam *= 4
            if lam > 1e10:
                break
        it += 1
        if lam > 1e10:
            break
    return RetrainResult.finish(problem, w, w0, perturbation, it, evals, t0, gtol)


def distance_to_solution_set(problem: Problem, w: Tensor, perturbation: Perturbation, **kwargs) -> RetrainResult:
    """Retrain from ``w`` on the perturbed data; ``.distance`` estimates d(w, S(xᵖ)).

    Uses Levenberg–Marquardt for squared-error risks (exact and fast on small problems) and
    L-BFGS otherwise.
    """
    if problem.loss_is_squared_error and problem.p * problem.n < 5e7:
        return levenberg_marquardt(problem, w, perturbation, **kwargs)
    return retrain(problem, w, perturbation, **kwargs)
