"""The graphical derivative DS(x̄|w̄)(Δx) and the estimated new solution set (Algorithm 1).

Theorem 1: ``DS(x̄|w̄)(Δx) = {v : H v + J Δx = 0}``.  When it is non-empty it is the affine set
``v₀ + ker H`` with ``v₀ = −H⁺ J Δx`` (minimum norm); when ``J Δx`` leaves range(H) it is empty and
we take the least-squares solutions instead, reporting the *feasibility residual*
``‖H v₀ + J Δx‖ / ‖J Δx‖`` (0: first-order theory holds exactly; 1: v₀ explains nothing).

The estimate of the new solution set is ``S(xᵖ) ∩ U ≈ w̄ + DS(x̄|w̄)(Δx)`` with U = B(w̄, r).

The numerical null space — the rule.  The pseudo-inverse needs a cut-off between "curvature" and
"zero", and a fixed tiny cut-off fails badly (directions with curvature 1e-10·λ_max receive
shifts 1e10 times too large).  ``setsens`` chooses the cut-off from the neighbourhood U in which
the first-order model is valid, and validates it on the perturbed problem itself:

  along the family of regularised solutions ``v(τ)`` (MINRES iterates, whose norm grows with the
  iteration count; or spectral cut-offs τ on the dense path), take the member that minimises the
  **true risk of the perturbed problem**, ``L(xᵖ, w̄ + v)`` (a line search over the family).

That member's norm is the radius r of U: beyond it, moving further along the linear model makes
the perturbed fit *worse*, i.e. the model has left its region of validity.  The check costs one
forward pass on the perturbed data per candidate (a fraction of an H v), needs no
retraining, and is compared with retraining in the tests and reports.  Directions whose
curvature is too small to be resolved inside U form the numerical null space: they are the
directions along which the estimated set extends.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .operators import DataJacobian, Hessian, dense_hessian
from .problem import Perturbation, Problem
from .sets import AffineBall
from .solvers import Spectrum, krylov_solve

__all__ = ["SolutionSetEstimate", "estimate_solution_set", "newton_corrector", "validated_krylov", "DEFAULT_TAUS"]

#: Spectral cut-offs tried by the dense path (relative to λ_max).
DEFAULT_TAUS = (1e-10, 1e-9, 1e-8, 3e-8, 1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 1e-3, 1e-2)


@dataclass
class SolutionSetEstimate:
    """``w̄ + DS(x̄|w̄)(Δx)`` intersected with U = B(w̄, radius).

    Attributes:
        shift: v₀, the minimum-norm (regularised) solution of ``H v = −J Δx``.
        radius: r, the radius of U chosen by the validation rule (``‖v₀‖`` at the selected member).
        feasibility_residual: ``‖H v₀ + J Δx‖ / ‖J Δx‖``.
        perturbed_risk_ratio: ``L(xᵖ, w̄ + v₀) / L(xᵖ, w̄)`` — what the estimate does to the true,
            nonlinear perturbed problem.
        null_basis: orthonormal basis of the numerical null space (dense path), else None.
        path: one record per candidate (iteration or τ, ‖v‖, residuals) for reports.
    """

    problem: Problem
    perturbation: Perturbation
    shift: Tensor
    rhs: Tensor
    radius: float
    feasibility_residual: float
    perturbed_risk_ratio: float
    method: str
    selected: dict
    hvp_count: int
    risk_evaluations: int
    seconds: float
    scale: str = "exact"
    null_basis: Tensor | None = None
    path: list[dict] = field(default_factory=list)

    @property
    def w_bar(self) -> Tensor:
        return self.problem.params

    @property
    def centre(self) -> Tensor:
        """w̄ + v₀, the estimated solution nearest to w̄."""
        return self.w_bar + self.shift

    def distance_from_original(self) -> float:
        """Algorithm 1's output: d(w̄, estimated set) = ‖v₀‖ (v₀ ⟂ ker H by construction)."""
        return float(self.shift.norm())

    def as_affine_ball(self) -> AffineBall:
        """The estimated set as an :class:`AffineBall` (dense path: needs the null basis)."""
        if self.null_basis is None:
            raise ValueError("the matrix-free estimate has no explicit null basis; use project()")
        return AffineBall(self.centre, self.null_basis, self.w_bar, self.radius)

    def membership_residual(self, w: Tensor) -> float:
        """``‖H (w − w̄) + J Δx‖ / ‖J Δx‖``: 0 for members of the first-order set (one H v)."""
        H = Hessian(self.problem)
        return float((H(w - self.w_bar) + self.rhs).norm() / self.rhs.norm())

    def project(self, w: Tensor, maxiter: int = 200) -> Tensor:
        """Nearest point of ``centre + ker H`` to ``w`` (ignoring the cut by U).

        Dense: exact with the null basis.  Matrix-free: ``w − H⁺H(w − centre)`` by MINRES.
        """
        d = w - self.centre
        if self.null_basis is not None:
            return self.centre + self.null_basis @ (self.null_basis.T @ d)
        H = Hessian(self.problem)
        z = krylov_solve(H, -H(d), maxiter=maxiter).v
        return w - z

    def sample(self, k: int, generator: torch.Generator, spread: float = 1.0) -> Tensor:
        """``k`` members (rows) from seeded random starts — the paper's "different random seeds".

        Dense: ``centre + N c`` with ``c`` uniform-direction of length ``spread·ρ`` (ρ the radius
        of the cut inside U).  Matrix-free: MINRES started from ``v₀ + z`` for a random z; Krylov
        iterations never change the null-space part of the start, so the member keeps z's
        null component — exactly how retraining from different starts lands on different points.
        """
        members = []
        p = self.problem.p
        dense = self.null_basis is not None
        if dense:
            ball = self.as_affine_ball()
            length = min(ball.inner_radius, self.radius) * spread
        else:
            H = Hessian(self.problem)
            iterations = self.selected.get("iteration", 50)
        for _ in range(k):
            z = torch.randn(p, generator=generator, dtype=torch.float64).to(self.shift)
            if dense:
                c = self.null_basis.T @ z
                if c.numel() == 0:
                    members.append(self.centre.clone())
                    continue
                members.append(ball.point + self.null_basis @ (c / c.norm() * length))
            else:
                start = self.shift + z / z.norm() * self.radius * spread
                # Solve H e = −(H start + b) for the correction e; the member is start + e.
                e = krylov_solve(H, H(start) + self.rhs, maxiter=iterations).v
                members.append(self.w_bar + start + e)
        return torch.stack(members)

    def summary(self) -> dict:
        return {
            "method": self.method,
            "scale": self.scale,
            "shift_norm": self.distance_from_original(),
            "radius": self.radius,
            "feasibility_residual": self.feasibility_residual,
            "perturbed_risk_ratio": self.perturbed_risk_ratio,
            "selected": self.selected,
            "hvp_count": self.hvp_count,
            "risk_evaluations": self.risk_evaluations,
            "seconds": self.seconds,
            "null_space_dim": None if self.null_basis is None else int(self.null_basis.shape[1]),
        }


def validated_krylov(H, b, evaluate, baseline, *, rule="validated", maxiter=200, check_every=5,
                     patience=4, krylov="minres", progress=None):
    """MINRES on ``H v = −b``; every ``check_every`` iterations score ``evaluate(v_k)`` (the
    perturbed risk) and keep the best iterate; stop after ``patience`` checks without improvement.

    Returns ``(v, selected, path)``.  With ``rule="fixed"`` it returns the last iterate.
    """
    best = {"perturbed_risk": baseline, "iteration": 0, "shift_norm": 0.0}
    best_v = [torch.zeros_like(b)]
    stale = [0]
    path: list[dict] = []

    def callback(k: int, v: Tensor) -> bool:
        if rule == "fixed" or k % check_every:
            return False
        rec = {"iteration": k, "shift_norm": float(v.norm()), "perturbed_risk": evaluate(v)}
        path.append(rec)
        if progress:
            progress(rec)
        if rec["perturbed_risk"] < best["perturbed_risk"]:
            best.update(rec)
            best_v[0] = v.clone()
            stale[0] = 0
        else:
            stale[0] += 1
        return stale[0] >= patience

    sol = krylov_solve(H, b, method=krylov, maxiter=maxiter, callback=callback)
    if rule == "fixed":
        return sol.v, {"iteration": sol.iterations, "stopped_by": sol.stopped_by}, path
    if sol.stopped_by != "callback":  # finished before the validation turned: score the end
        callback(check_every * (sol.iterations // check_every + 1), sol.v)
    selected = dict(best, stopped_by=sol.stopped_by)
    return best_v[0], selected, path


def newton_corrector(problem: Problem, perturbation: Perturbation, w: Tensor, **kwargs) -> tuple[Tensor, dict]:
    """One validated Newton step on the *perturbed* problem from ``w`` (e.g. w̄ + v₀).

    The first-order estimate leaves an error of second order in ‖Δx‖ (the data and weight
    nonlinearity of ∇L).  This step solves ``H(xᵖ, w) d = −∇L(xᵖ, w)`` with the same validated
    MINRES rule and returns ``(w + d, info)``.  It is a single step of retraining's Newton
    iteration — reported separately from the first-order estimate.  Cost: as one estimate.
    """
    H = Hessian(problem, w, perturbation)
    g = problem.gradient(w, perturbation)
    base = problem.risk(w, perturbation)
    d, selected, path = validated_krylov(H, g, lambda d: problem.risk(w + d, perturbation), base, **kwargs)
    return w + d, {"selected": selected, "hvp_count": H.calls, "path": path}


def estimate_solution_set(
    problem: Problem,
    perturbation: Perturbation,
    *,
    method: str = "krylov",
    scale: str = "exact",
    rule: str = "validated",
    tau: float | None = None,
    maxiter: int = 200,
    check_every: int = 5,
    patience: int = 4,
    krylov: str = "minres",
    progress=None,
) -> SolutionSetEstimate:
    """Estimate ``S(xᵖ) ∩ U ≈ w̄ + DS(x̄|w̄)(Δx)``.

    Args:
        method: ``"krylov"`` (matrix-free MINRES; any size) or ``"dense"`` (eigendecomposition;
            p up to a few thousand).
        scale: ``"exact"`` (1/n, the true derivative) or ``"paper"`` (1/|K|, eqs. 14/17).
        rule: ``"validated"`` (choose the member minimising L(xᵖ, w̄+v), see module doc),
            or ``"fixed"`` (dense: cut-off ``tau``; Krylov: exactly ``maxiter`` iterations).
        check_every, patience: Krylov validation — a perturbed risk every ``check_every``
            iterations; stop after ``patience`` checks without improvement.
        progress: optional callable ``progress(record: dict)`` (the CLI shows a bar with it).

    Cost: Krylov — one H v per iteration plus one forward pass per check; dense — the
    p×p Hessian and its eigendecomposition (O(p³)) plus one forward pass per cut-off.
    """
    if method not in ("krylov", "dense"):
        raise ValueError(f"method must be 'krylov' or 'dense', got {method!r}")
    if rule not in ("validated", "fixed"):
        raise ValueError(f"rule must be 'validated' or 'fixed', got {rule!r}")
    problem.check_perturbation(perturbation)
    t0 = time.perf_counter()
    w_bar = problem.params
    jac = DataJacobian(problem, perturbation.indices, scale=scale)
    b = jac @ perturbation.delta
    b_norm = float(b.norm())
    if b_norm == 0.0 or not math.isfinite(b_norm):
        raise ValueError(f"J Δx is {b_norm}: the perturbation does not move ∇L (nothing to estimate)")
    risk0 = problem.risk(w_bar, perturbation)
    evals = [1]
    H = Hessian(problem)

    def perturbed_risk(v: Tensor) -> float:
        evals[0] += 1
        return problem.risk(w_bar + v, perturbation)

    path: list[dict] = []
    null_basis = None
    if method == "dense":
        spec = Spectrum.of(dense_hessian(problem))
        taus = [tau] if rule == "fixed" else list(DEFAULT_TAUS)
        if rule == "fixed" and tau is None:
            raise ValueError("rule='fixed' on the dense path needs tau")
        best = None
        for t in taus:
            v = spec.solve(b, t)
            rec = {"tau": t, "shift_norm": float(v.norm()), "kept": int(spec.kept(t).sum())}
            rec["perturbed_risk"] = perturbed_risk(v) if rule == "validated" else float("nan")
            path.append(rec)
            if progress:
                progress(rec)
            if best is None or rec["perturbed_risk"] < best[0]["perturbed_risk"]:
                best = (rec, v)
        selected, v = best
        null_basis = spec.null_basis(selected["tau"])
        feas = float((spec.eigenvectors @ (spec.eigenvalues * (spec.eigenvectors.T @ v)) + b).norm()) / b_norm
    else:
        v, selected, kpath = validated_krylov(
            H, b, perturbed_risk, risk0, rule=rule, maxiter=maxiter, check_every=check_every,
            patience=patience, krylov=krylov, progress=progress)
        path.extend(kpath)
        feas = float((H(v) + b).norm()) / b_norm
    if float(v.norm()) == 0.0:
        warnings.warn("the validated shift is zero: no member of the linear model improves the "
                      "perturbed problem (the perturbation is outside the first-order regime)")
    opt = perturbed_risk(v) / max(risk0, 1e-300)
    return SolutionSetEstimate(
        problem=problem, perturbation=perturbation, shift=v, rhs=b, radius=float(v.norm()),
        feasibility_residual=feas, perturbed_risk_ratio=opt, method=method, selected=selected,
        hvp_count=H.calls, risk_evaluations=evals[0],
        seconds=time.perf_counter() - t0, scale=scale, null_basis=null_basis, path=path,
    )
