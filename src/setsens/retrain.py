"""Warm-started retraining: the ground truth every estimate is judged by.

``retrain(problem, w0, perturbation)`` minimises the (perturbed) risk from ``w0`` with full-batch
L-BFGS (strong Wolfe line search) until ``‖∇L‖ ≤ gtol``.  Its result is a point of the new
solution set S(xᵖ) near ``w0``.

Distance to the new solution set.  ``distance_to_solution_set(w)`` is ``‖retrain(w) − w‖``: how
far honest retraining has to move from ``w``.  Near a set of minimisers the loss is locally
quadratic, ``½ (w − w*)ᵀ H (w − w*)``, and every gradient and every L-BFGS step lies in
``range(H)``; the iteration therefore never moves along the set and converges to the orthogonal
projection of ``w`` onto it, so the distance moved equals ``d(w, S(xᵖ))`` up to the curvature of the
set.  Comparing it for w̄ and for an estimate w̄ + v gives the ``distance_ratio`` of the reports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .problem import Perturbation, Problem, regression_targets

__all__ = ["RetrainResult", "retrain", "levenberg_marquardt", "distance_to_solution_set"]


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
) -> RetrainResult:
    """Full-batch L-BFGS on the (perturbed) risk from ``w0`` until ``‖∇L‖₂ ≤ gtol``.

    Cost: about 1.1 gradient evaluations per iteration (one pass over the data each).
    """
    w0 = problem.params if w0 is None else w0
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
    return RetrainResult.finish(problem, w.detach().clone(), w0, perturbation, iterations, evals[0], t0, gtol)


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
    fixed, so from a warm start it converges (quadratically) to the nearest interpolating solution.
    Forms the (n·K) × p residual Jacobian: small problems only (cost O((nK)² p) per iteration).
    """
    if not problem.loss_is_squared_error:
        raise ValueError("levenberg_marquardt needs the squared_error loss; use retrain() (L-BFGS)")
    w0 = problem.params if w0 is None else w0
    w = w0.detach().clone()
    t0 = time.perf_counter()

    def residuals_and_jacobian(w):
        rs, js = [], []
        for x, y in problem.batches(perturbation):
            f = lambda w: _residuals(problem, w, x, y)  # noqa: E731
            rs.append(f(w))
            js.append(torch.func.jacfwd(f)(w) if f(w).numel() > w.numel() else torch.func.jacrev(f)(w))
        return torch.cat(rs), torch.cat(js)

    r, J = residuals_and_jacobian(w)
    lam, it, evals = damping, 0, 1
    eye = torch.eye(r.numel(), dtype=w.dtype, device=w.device)
    while it < max_iter and float((J.T @ r).norm()) > gtol:
        A = J @ J.T
        scale = float(A.diagonal().mean())
        while True:
            L, info = torch.linalg.cholesky_ex(A + lam * scale * eye)
            if int(info) == 0:
                step = -J.T @ torch.cholesky_solve(r[:, None], L)[:, 0]
                r_new, J_new = residuals_and_jacobian(w + step)
                evals += 1
                if float(r_new.norm()) < float(r.norm()):
                    w, r, J = w + step, r_new, J_new
                    lam = max(lam / 5, 1e-15)
                    break
            lam *= 4
            if lam > 1e10:
                break
        it += 1
        if lam > 1e10:
            break
    return RetrainResult.finish(problem, w, w0, perturbation, it, evals, t0, gtol)


def _residual_jacobian(problem: Problem, w: Tensor, perturbation: Perturbation | None) -> tuple[Tensor, Tensor]:
    """All squared-error residuals at ``w`` and their (n·K) × p Jacobian (dense: small problems)."""
    rs, js = [], []
    for x, y in problem.batches(perturbation):
        def f(w_, x=x, y=y):
            return _residuals(problem, w_, x, y)
        rs.append(f(w))
        js.append(torch.func.jacrev(f)(w))
    return torch.cat(rs), torch.cat(js)


def nearest_solution(problem: Problem, w: Tensor, perturbation: Perturbation | None = None, *,
                     rtol: float = 1e-12, max_iter: int = 50) -> RetrainResult:
    """The nearest interpolating solution to ``w``: ``argmin ‖w′ − w‖`` s.t. ``f(xᵖ_i, w′) = y_i`` ∀i.

    For a squared-error fit at zero residual with a full-row-rank output Jacobian, the solution set
    near ``w`` is this manifold, so ``‖w′ − w‖ = d(w, S(xᵖ))`` (locally).  Gauss–Newton on the
    constrained problem: linearise the residuals r at w_k and take the point of the linearised
    manifold nearest to ``w``, ``w_{k+1} = w_k + t − R⁺(R t + r)`` with ``t = w − w_k`` (R the residual
    Jacobian).  At the limit ``r = 0`` and ``w′ − w ⟂ ker R``: a true orthogonal projection, so the
    distance does not depend on a stopping tolerance (unlike L-BFGS or Levenberg–Marquardt, whose
    end points depend on their path).  Forms R: small problems only, O((n·K)² p) per iteration.
    """
    if not problem.loss_is_squared_error:
        raise ValueError("nearest_solution needs a squared-error loss (an interpolating solution set)")
    t0 = time.perf_counter()
    w = w.detach()
    wk = w.clone()
    it = 0
    r, R = _residual_jacobian(problem, wk, perturbation)
    rnorm0 = max(float(r.norm()), 1e-300)
    for it in range(1, max_iter + 1):
        t = w - wk
        rhs = R @ t + r
        gram = R @ R.T
        jitter = 1e-14 * float(gram.diagonal().mean())
        step = t - R.T @ torch.linalg.solve(gram + jitter * torch.eye(len(r), dtype=r.dtype, device=r.device), rhs)
        for _ in range(20):  # backtrack while the residual grows (far from the manifold)
            r_new, R_new = _residual_jacobian(problem, wk + step, perturbation)
            if float(r_new.norm()) <= max(float(r.norm()), rtol * rnorm0) * 1.5:
                break
            step = step / 2
        wk, r, R = wk + step, r_new, R_new
        if float(step.norm()) <= 1e-13 * max(float((w - wk).norm()), 1e-30) and float(r.norm()) <= rtol * rnorm0:
            break
    res = RetrainResult.finish(problem, wk, w, perturbation, it, it, t0, float("inf"))
    res.converged = float(r.norm()) <= max(rtol * rnorm0, 1e-13)
    return res


def distance_to_solution_set(problem: Problem, w: Tensor, perturbation: Perturbation, **kwargs) -> RetrainResult:
    """Retrain from ``w`` on the perturbed data; ``.distance`` estimates d(w, S(xᵖ)).

    Uses Levenberg–Marquardt for squared-error risks (exact and fast on small problems) and
    L-BFGS otherwise.
    """
    if problem.loss_is_squared_error and problem.p * problem.n < 5e7:
        return levenberg_marquardt(problem, w, perturbation, **kwargs)
    return retrain(problem, w, perturbation, **kwargs)
