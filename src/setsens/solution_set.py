"""The estimated new solution set after a data perturbation: ``setsens.estimate``.

Theorem 1: ``DS(x̄|w̄)(Δx) = {v : H v + J Δx = 0}``, the affine set ``v₀ + ker H`` with
``v₀ = −H⁺ J Δx`` (minimum norm).  When ``J Δx`` leaves range(H) the set is empty and the
least-squares solutions are taken instead; the *feasibility residual* ``‖H v₀ + J Δx‖ / ‖J Δx‖``
says how far first-order theory holds.  The Gauss–Newton form replaces eq. 19 by ``G v = −r``
(keep every training output; :mod:`setsens.function_space`), with ``ker G`` as its null space.

The estimate (eq. 15) is ``S(xᵖ) ∩ U ≈ w̄ + (v₀ + N) ∩ B(0, r)``:

* **v₀** — the minimum-norm solution (CGLS on G from 0; two consistent MINRES solves on H; both
  keep every iterate in range(Aᵀ), so v₀ ⟂ N).
* **N** — the numerical null space of A (H or G): an explicit basis on the dense path, a
  projector ``z ↦ z − A⁺A z`` applied by a Krylov solve on the matrix-free path.
* **Which member of the family of regularised solutions** (iteration count, or spectral cut-off τ
  on the dense path) is v₀: the least regularised candidate (most iterations, smallest τ) whose
  true perturbed risk ``L(xᵖ, w̄ + v)`` is within ``tie`` (5 %) of the smallest one, the margin
  measured on the smaller of that risk and the reduction it achieves over w̄ — the latter matters when
  the unmoved points dominate the risk (one forward pass per candidate; ``rule="validated"``), or a
  fixed one (``rule="fixed"``).  Regularise only as much
  as the perturbed problem asks for: candidates whose risks differ by rounding noise do not pull
  v₀ towards a truncation that drops real directions.  A Krylov solve stops at its tolerance, at
  ``maxiter``, or after ``patience`` scores in a row worse than that band (the family has left its
  valid range).  The perturbed risk need not fall monotonically along the iterates, so the rule can
  stop before convergence (measured in the README); ``rule="fixed"`` runs to the tolerance.
* **r, the radius of U — its own rule, not ‖v₀‖** (a ball through v₀ would cut the affine set to the
  single point w̄ + v₀).  Members are ``w̄ + v₀ + n``, n ∈ N, ``‖n‖ ≤ ρ``; ρ is the largest length
  (found by doubling, halving and bisection to 5 %) at which members along ``directions`` random
  null directions keep at least ``keep`` (default 90 %) of the centre's reduction of the perturbed
  risk: ``L(xᵖ, c + ρ n̂) ≤ L(xᵖ, c) + (1 − keep)(L(xᵖ, w̄) − L(xᵖ, c))``.  Then
  ``r = √(‖v₀‖² + ρ²)``.  Cost: ``directions`` null projections (Krylov solves) and about
  ``12·directions`` forward passes.  ρ = 0 (reported ``radius_determined=False``) when the centre
  does not improve on w̄.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, fields, replace
from functools import cached_property

import torch
from torch import Tensor

from .function_space import OutputJacobian, min_norm_solve, output_shift
from .krylov import Callback, Deflation, KrylovResult, minres, minres_min_norm, power_iteration
from .operators import HVP_MODES, DataJacobian, Damped, Hessian, dense_hessian, dense_output_jacobian
from .preconditioners import PRECONDITIONERS, gram_preconditioner
from .problem import Perturbation, Problem
from .progress import ProgressFn, report
from .sets import AffineBall, excess, hausdorff
from .solvers import Spectrum

__all__ = ["SolutionSet", "NullSpace", "SolveOptions", "RadiusOptions", "estimate", "DEFAULT_TAUS", "METHODS"]

#: Spectral cut-offs tried by the dense path (relative to the largest eigen/singular value).
DEFAULT_TAUS = (1e-10, 1e-9, 1e-8, 3e-8, 1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 1e-3, 1e-2)
METHODS = ("gauss-newton", "hessian", "influence")


@dataclass
class SolveOptions:
    """How v₀ is computed.

    Attributes:
        maxiter: Krylov iterations at most (CGLS: one JVP + one VJP pass each; MINRES: one H v
            each, two solves unless ``min_norm=False``).
        rtol: relative residual at which a Krylov solve stops (MINRES: SciPy's tests, see
            :func:`setsens.krylov.minres`).
        rule: ``"validated"`` (the member of the family minimising the perturbed risk) or
            ``"fixed"`` (the last iterate; dense: the cut-off ``tau``).
        tau: dense path with ``rule="fixed"``: spectral cut-off relative to the largest value.
        check_every, patience: validated Krylov rule — score every ``check_every`` iterations,
            stop after ``patience`` scores in a row worse than the best by more than ``tie``.
        tie: validated rule — relative margin within which a less regularised candidate is preferred.
        influence_damping: ``method="influence"``: damping relative to λ_max(H).
        min_norm: ``method="hessian"``: two consistent MINRES solves give the minimum-norm v₀; False:
            one solve of ``H v = −J Δx`` (half the products; its iterates keep J Δx's part in ker H).
        hvp_mode: the autodiff composition of H v (:data:`setsens.operators.HVP_MODES`; ``"auto"``:
            the fastest measured on the device).
        x0: start of the Krylov solve (default 0); v₀ then keeps x0's part in the null space.
        deflation: MINRES on H deflated by this space (:class:`setsens.krylov.Deflation`).
        keep_basis: keep the MINRES solve's Lanczos basis in ``SolutionSet.krylov``, so that later
            solves on the same H can be deflated with :meth:`Deflation.from_krylov`.
        checkpoint: a file path: the solve's state is saved there after every iteration and a rerun
            resumes it (with ``rule="fixed"`` to the same v₀; a validated rule rescores from there).
        callback: ``callback(k, residual, v_k)`` after every Krylov iteration; returning True stops.
        preconditioner: matrix-free Gauss–Newton solve — ``"none"`` (CGLS) or CG on ``G Gᵀ u = −r``,
            ``v = Gᵀ u`` (:func:`setsens.krylov.cgne`, still minimum norm) preconditioned by
            ``"diagonal"`` or ``"nystrom"`` (:mod:`setsens.preconditioners`; measured in
            ``benchmarks/preconditioner.py``).
        sketch: the preconditioner's Hutchinson samples (diagonal: JVP passes) or rank (Nyström:
            JVP + VJP passes), paid once before the solve.
    """

    maxiter: int = 200
    rtol: float = 1e-10
    rule: str = "validated"
    tau: float | None = None
    check_every: int = 5
    patience: int = 4
    tie: float = 0.05
    influence_damping: float = 1e-4
    min_norm: bool = True
    hvp_mode: str = "fwd_over_rev"
    x0: Tensor | None = None
    deflation: Deflation | None = None
    keep_basis: bool = False
    checkpoint: str | None = None
    callback: Callback | None = None
    preconditioner: str = "none"
    sketch: int = 20

    def __post_init__(self):
        if self.rule not in ("validated", "fixed"):
            raise ValueError(f"rule must be 'validated' or 'fixed', got {self.rule!r}")
        if self.maxiter < 1 or self.check_every < 1 or self.patience < 1:
            raise ValueError("maxiter, check_every and patience must be ≥ 1")
        if self.hvp_mode not in HVP_MODES:
            raise ValueError(f"hvp_mode must be one of {HVP_MODES}, got {self.hvp_mode!r}")
        if self.preconditioner not in PRECONDITIONERS:
            raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {self.preconditioner!r}")
        if self.sketch < 1:
            raise ValueError("sketch must be ≥ 1")

    def check_for(self, method: str, dense: bool) -> None:
        """Refuse (one line, naming the method) a field set away from its default that ``method`` does not read:
        a setting that would silently do nothing."""
        reads = _READS["dense" if dense else method]
        unread = [f.name for f in fields(self) if f.name not in reads and not _same(getattr(self, f.name), f.default)]
        if unread:
            raise ValueError(f"SolveOptions.{', SolveOptions.'.join(unread)} not read by method {method!r}"
                             f"{' (dense)' if dense else ''}: leave {'them' if len(unread) > 1 else 'it'} at the "
                             "default")


def _same(value, default) -> bool:
    return value is default or (not isinstance(value, Tensor) and value == default)


_KRYLOV = {"maxiter", "rtol", "x0", "callback", "checkpoint", "hvp_mode"}
_VALIDATED = {"rule", "check_every", "patience", "tie"}
#: the SolveOptions fields each method reads (``hvp_mode``: every method's residuals use H v)
_READS = {"gauss-newton": _KRYLOV | _VALIDATED | {"preconditioner", "sketch"},
          "hessian": _KRYLOV | _VALIDATED | {"min_norm", "deflation", "keep_basis"},
          "influence": _KRYLOV | {"influence_damping"},
          "dense": _VALIDATED | {"tau", "hvp_mode"}}


@dataclass
class RadiusOptions:
    """The rule for r (see the module doc): ``keep`` ∈ (0, 1], ``directions`` random null directions,
    each projected with at most ``projection_maxiter`` Krylov iterations; ``directions=0`` skips the
    search (ρ = 0, r = ‖v₀‖: only v₀ is wanted)."""

    keep: float = 0.9
    directions: int = 4
    projection_maxiter: int = 300
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.keep <= 1 or self.directions < 0:
            raise ValueError("keep must lie in (0, 1] and directions be ≥ 0")


class NullSpace:
    """The orthogonal projector onto the numerical null space N of H or G.

    Dense: an orthonormal basis (``basis``, p × dim).  Matrix-free: ``z − A⁺A z`` with ``A⁺A z`` from
    a Krylov solve of the consistent system ``A y = A z`` from 0 (``range_part``); ``dim`` is then
    unknown (None).  ``calls`` counts projections.
    """

    def __init__(self, basis: Tensor | None = None, range_part=None):
        if (basis is None) == (range_part is None):
            raise ValueError("give exactly one of basis and range_part")
        self.basis, self._range_part, self.calls = basis, range_part, 0

    @property
    def dim(self) -> int | None:
        return None if self.basis is None else int(self.basis.shape[1])

    def __call__(self, z: Tensor) -> Tensor:
        self.calls += 1
        if self.basis is not None:
            return self.basis @ (self.basis.T @ z)
        return z - self._range_part(z)


@dataclass
class SolutionSet:
    """``w̄ + (v₀ + N) ∩ B(0, r)``: the estimated new solution set inside U = B(w̄, r).

    Attributes:
        method: ``"gauss-newton"`` (G v = −r), ``"hessian"`` (eq. 19) or ``"influence"`` (a point).
        shift: v₀.  radius: r.  null_space: N (:class:`NullSpace`).
        residual: the method's own relative residual (``‖G v₀ + r‖/‖r‖`` or ``‖H v₀ + JΔx‖/‖JΔx‖``).
        feasibility_residual: eq. 19's ``‖H v₀ + J Δx‖ / ‖J Δx‖`` (every method).
        output_residual: ``‖G v₀ + r‖ / ‖r‖``, the output mismatch left on all training points.
        perturbed_risk_ratio: ``L(xᵖ, w̄ + v₀) / L(xᵖ, w̄)``.
        stationarity: ``‖∇L(x̄, w̄)‖ / ‖J Δx‖``: near or above 1, the estimate answers the gradient
            already at w̄ rather than the perturbation.
        selected, path: the validated choice and the scored candidates; radius_record: ρ's search.
        cost: products and seconds, counted the same way for every method: ``hvp``, ``jvp_vjp_passes``,
            ``risk_evaluations``, ``null_projections``, ``seconds`` (all of it), ``solve_seconds`` (the
            Krylov solve, callbacks excluded) and ``hvp_seconds`` (one H v, the unit of the solve's cost).
        krylov: the Krylov solve's record (iterations, residuals, products, basis; None on the dense path).
    """

    problem: Problem
    perturbation: Perturbation
    method: str
    shift: Tensor
    radius: float
    null_space: NullSpace
    residual: float
    feasibility_residual: float
    output_residual: float
    perturbed_risk_ratio: float
    stationarity: float
    selected: dict
    radius_record: dict
    cost: dict
    scale: str = "exact"
    path: list[dict] = field(default_factory=list)
    krylov: KrylovResult | None = field(default=None, repr=False)
    _operator: object = field(default=None, repr=False)
    _rhs: Tensor | None = field(default=None, repr=False)

    @property
    def w_bar(self) -> Tensor:
        return self.problem.params

    @property
    def centre(self) -> Tensor:
        """w̄ + v₀, the estimated solution nearest to w̄."""
        return self.w_bar + self.shift

    @property
    def null_radius(self) -> float:
        """ρ: how far members reach from the centre along N (``r² = ‖v₀‖² + ρ²``)."""
        return self.radius_record["rho"]

    def distance_from_original(self) -> float:
        """Algorithm 1's output: d(w̄, estimated set) = ‖v₀‖ (v₀ is the set's point nearest w̄)."""
        return float(self.shift.norm())

    @cached_property
    def _ball(self) -> AffineBall:
        # built once: its construction projects onto N, a Krylov solve on the matrix-free path
        null = self.null_space.basis if self.null_space.basis is not None else self.null_space
        return AffineBall(self.centre, null, self.w_bar, self.radius * (1 + 1e-12))

    def as_affine_ball(self) -> AffineBall:
        """The set as an :class:`AffineBall` (basis on the dense path, projector otherwise)."""
        return self._ball

    def membership_residual(self, w: Tensor) -> float:
        """The method's own relative residual at ``v = w − w̄``: 0 on the first-order set."""
        return float((self._operator(w - self.w_bar) + self._rhs).norm() / self._rhs.norm())

    def project(self, w: Tensor) -> Tensor:
        """Nearest point of the estimated set to ``w``."""
        return self.as_affine_ball().project(w)

    def distance(self, w: Tensor) -> float:
        """``d(w, estimated set)``."""
        return float((w - self.project(w)).norm())

    def hausdorff(self, points: Tensor) -> float:
        """Pompeiu–Hausdorff distance to a finite set (rows), e.g. retrained solutions."""
        return hausdorff(self.as_affine_ball(), torch.atleast_2d(points))

    def excess_over(self, points: Tensor) -> float:
        """``e(estimated set, points)``: how far the set reaches beyond the finite set."""
        return excess(self.as_affine_ball(), torch.atleast_2d(points))

    def sample(self, k: int, generator: torch.Generator) -> Tensor:
        """``k`` members (rows): ``centre + n`` with n a random null direction of length ρ·u^(1/dim),
        u uniform — uniform in the cut when dim N is known, near its boundary when N is large.
        Each member costs one null projection.  Inside U = B(w̄, r) by construction."""
        p, dim = self.problem.p, self.null_space.dim
        if dim == 0 or self.null_radius == 0.0:
            return self.centre.expand(k, -1).clone()
        # keep a margin for the rounding of w̄ + v: ‖fl(w̄ + v) − w̄‖ ≤ ‖v‖ + eps·‖w̄ + v‖ per operation
        slack = 4 * torch.finfo(self.shift.dtype).eps * (float(self.w_bar.norm()) + self.radius)
        members = []
        for _ in range(k):
            z = torch.randn(p, generator=generator, dtype=torch.float64).to(self.shift)
            n = self.null_space(z)
            u = float(torch.rand((), generator=generator, dtype=torch.float64)) ** (1.0 / (dim or p))
            members.append(self.centre + _inside(self.shift, n, self.radius - slack, u * self.null_radius))
        return torch.stack(members)

    def summary(self) -> dict:
        """The numbers of a report (JSON-ready)."""
        return {
            "method": self.method, "scale": self.scale, "shift_norm": self.distance_from_original(),
            "radius": self.radius, "null_radius": self.null_radius,
            "radius_determined": self.radius_record["determined"], "null_space_dim": self.null_space.dim,
            "residual": self.residual, "feasibility_residual": self.feasibility_residual,
            "output_residual": self.output_residual, "perturbed_risk_ratio": self.perturbed_risk_ratio,
            "stationarity": self.stationarity, "selected": self.selected, "cost": self.cost,
        }


def _inside(v0: Tensor, n: Tensor, r: float, length: float) -> Tensor:
    """``t·n̂`` with t ≤ ``length`` the largest step keeping ``‖v0 + t n̂‖ ≤ r`` (n is ⟂ v0 only up to
    the accuracy of a matrix-free projection)."""
    nn_ = float(n.norm())
    if nn_ == 0.0:
        return torch.zeros_like(n)
    u = n / nn_
    b, c = float(v0 @ u), float(v0 @ v0) - r * r
    t_max = -b + math.sqrt(max(b * b - c, 0.0))
    return u * min(length, t_max * (1 - 1e-12))


def estimate(problem: Problem, perturbation: Perturbation, method: str = "gauss-newton", *,
             dense: bool = False, scale: str = "exact", solve: SolveOptions | None = None,
             radius: RadiusOptions | None = None, progress: ProgressFn | None = None) -> SolutionSet:
    """Estimate ``S(xᵖ) ∩ U ≈ w̄ + DS(x̄|w̄)(Δx)`` (see the module doc for the rules).

    Args:
        method: ``"gauss-newton"`` (keep every training output; any loss), ``"hessian"`` (eq. 19)
            or ``"influence"`` (damped influence function, a single point: the baseline).
        dense: eigen/singular-value decomposition instead of Krylov solves (p up to a few thousand).
        scale: ``"exact"`` (1/n, the true derivative) or ``"paper"`` (1/|K|, eqs. 14/17).
        progress: a :class:`~setsens.progress.Progress` ``("iteration", k, maxiter, {residual})`` after each
            Krylov iteration, and ``("candidate", i, total, record)`` for each scored candidate.

    Cost (matrix-free): Gauss–Newton — one JVP and one VJP pass over the data per iteration;
    Hessian — one H v per iteration of two MINRES solves; plus the radius rule and one H v and one
    JVP pass for the residuals.  Dense: O(p³).  Every count is in ``result.cost``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if scale not in ("exact", "paper"):
        raise ValueError(f"scale must be 'exact' or 'paper', got {scale!r}")
    solve = solve or SolveOptions()
    radius = radius or RadiusOptions()
    if dense and solve.rule == "fixed" and solve.tau is None:
        raise ValueError("rule='fixed' on the dense path needs tau")
    if method == "gauss-newton" and problem.weight_decay:
        raise ValueError("the Gauss–Newton form keeps the training outputs and has no weight-decay term: "
                         "use method='hessian' on a problem with weight decay")
    if solve.preconditioner != "none" and (dense or method != "gauss-newton"):
        raise ValueError("a preconditioner applies to the matrix-free Gauss–Newton solve only")
    solve.check_for(method, dense)
    if dense and len(problem.rows) != problem.n:
        raise ValueError("the dense path needs all the data in one process (use dense=False on a sharded problem)")
    problem.check_perturbation(perturbation)
    t0 = time.perf_counter()
    w_bar = problem.params
    b = DataJacobian(problem, perturbation.indices, scale=scale) @ perturbation.delta
    b_norm = float(b.norm())
    if b_norm == 0.0 or not math.isfinite(b_norm):
        raise ValueError(f"J Δx is {b_norm}: the perturbation does not move ∇L (nothing to estimate)")
    centered = problem.loss_ignores_output_shift
    factor = 1.0 / (len(perturbation.indices) * problem.weight) if scale == "paper" else 1.0
    r = output_shift(problem, perturbation, centered=centered) * factor
    H, G = Hessian(problem, mode=solve.hvp_mode), OutputJacobian(problem, centered=centered)
    risk0 = problem.risk(w_bar, perturbation)
    evals = [1]

    def perturbed_risk(v: Tensor) -> float:
        evals[0] += 1
        return problem.risk(w_bar + v, perturbation)

    if progress is not None and not dense:
        solve = replace(solve, callback=_reporting(solve.callback, progress, solve.maxiter))
    if method == "influence":
        v, null, selected, path, krylov = _influence(H, b, solve)
    elif dense:
        v, null, selected, path, krylov = _dense(problem, method, b, r, centered, perturbed_risk, risk0, solve,
                                                 progress)
    else:
        v, null, selected, path, krylov = _krylov(method, H, G, b, r, perturbed_risk, risk0, solve, progress, radius)
    if float(v.norm()) == 0.0:
        warnings.warn("the validated shift is zero: no member of the linear model improves the "
                      "perturbed problem (the perturbation is outside the first-order regime)")
    risk_c = perturbed_risk(v)
    record = _validated_null_radius(problem.p, v, null, perturbed_risk, risk0, risk_c, radius)
    t_hvp = time.perf_counter()
    Hv = H(v)
    hvp_seconds = time.perf_counter() - t_hvp
    feas = float((Hv.double() + b.double()).norm() / b.double().norm())
    out_res = float((G @ v + r).norm() / max(float(r.norm()), 1e-300))
    operator, rhs = (G.matvec, r) if method == "gauss-newton" else (H, b)
    stationarity = problem.stationarity(reference=b_norm)["relative_grad_norm"]  # warns past 0.1
    return SolutionSet(
        problem=problem, perturbation=perturbation, method=method, shift=v,
        radius=math.hypot(float(v.norm()), record["rho"]), null_space=null,
        residual=out_res if method == "gauss-newton" else feas, feasibility_residual=feas,
        output_residual=out_res, perturbed_risk_ratio=risk_c / max(risk0, 1e-300), stationarity=stationarity,
        selected=selected, radius_record=record, scale=scale, path=path, krylov=krylov, _operator=operator,
        _rhs=rhs, cost={"hvp": H.calls, "jvp_vjp_passes": G.calls, "risk_evaluations": evals[0],
                        "null_projections": null.calls, "seconds": time.perf_counter() - t0,
                        "solve_seconds": None if krylov is None else krylov.seconds, "hvp_seconds": hvp_seconds},
    )


def _reporting(callback, progress: ProgressFn, maxiter: int):
    """The solver hook ``callback`` (None: none), reporting each iteration first as
    ``Progress("iteration", k, maxiter, {"residual": …})``."""
    def hook(k: int, residual: float, x: Tensor) -> bool:
        report(progress, "iteration", k, maxiter, residual=residual)
        return bool(callback(k, residual, x)) if callback else False

    return hook


def _influence(H, b, solve):
    start = torch.randn(b.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(H.w)
    lam = float(power_iteration(H, start, 30).values[0])
    damping = solve.influence_damping * lam
    result = minres(Damped(H, damping), -b, maxiter=solve.maxiter, rtol=solve.rtol, x0=solve.x0,
                    callback=solve.callback, checkpoint=solve.checkpoint)
    null = NullSpace(basis=torch.zeros(b.numel(), 0, dtype=b.dtype, device=b.device))
    return result.x.to(b), null, {"damping": damping, "lambda_max": lam, "iterations": result.iterations}, [], result


def _band(best: float, risk0: float, tie: float) -> float:
    """The validated rule's tie band: ``tie`` of the lowest risk or of its reduction over w̄, the smaller."""
    return best + tie * min(abs(best), max(risk0 - best, 0.0))


def _dense(problem, method, b, r, centered, perturbed_risk, risk0, solve, progress):
    if method == "hessian":
        spec, rhs = Spectrum.of(dense_hessian(problem)), b
    else:
        spec = Spectrum.of_rectangular(dense_output_jacobian(problem, centered=centered))
        rhs = r.reshape(-1)
    exact = max(rhs.numel(), spec.right.shape[0]) * torch.finfo(spec.values.dtype).eps  # NumPy's pinv cut-off
    taus = [solve.tau] if solve.rule == "fixed" else [exact] + [t for t in DEFAULT_TAUS if t > exact]
    path, solutions = [], []
    for t in taus:
        v = spec.solve(rhs, t)
        rec = {"tau": t, "shift_norm": float(v.norm()), "kept": int(spec.kept(t).sum()),
               "perturbed_risk": perturbed_risk(v) if solve.rule == "validated" else float("nan")}
        path.append(rec)
        solutions.append(v)
        report(progress, "candidate", len(path), len(taus), **rec)
    best = min(rec["perturbed_risk"] for rec in path)
    pick = 0 if solve.rule == "fixed" else next(
        i for i, rec in enumerate(path) if rec["perturbed_risk"] <= _band(best, risk0, solve.tie))
    selected = path[pick]
    return solutions[pick], NullSpace(basis=spec.null_basis(selected["tau"])), selected, path, None


def _krylov(method, H, G, b, r, perturbed_risk, risk0, solve, progress, radius):
    best = {"perturbed_risk": risk0, "iteration": 0, "shift_norm": 0.0}
    best_v = [torch.zeros_like(b)]
    stale, path, last, lowest = [0], [], [None], [risk0]

    def score(k: int, v: Tensor) -> bool:
        last[0] = (k, v)
        if solve.rule == "fixed" or k % solve.check_every:
            return False
        rec = {"iteration": k, "shift_norm": float(v.norm()), "perturbed_risk": perturbed_risk(v)}
        path.append(rec)
        report(progress, "candidate", len(path), None, **rec)
        lowest[0] = min(lowest[0], rec["perturbed_risk"])
        if rec["perturbed_risk"] <= _band(lowest[0], risk0, solve.tie):  # the least regularised tie
            best.clear()
            best.update(rec)
            best_v[0], stale[0] = v.clone(), 0
        else:  # worse than the best by more than the tie: the family has left its valid range
            stale[0] += 1
        return stale[0] >= solve.patience

    def on_iterate(k: int, residual: float, v: Tensor) -> bool:
        stop = bool(solve.callback(k, residual, v)) if solve.callback else False
        return score(k, v.to(b)) or stop

    options = dict(maxiter=solve.maxiter, rtol=solve.rtol, x0=solve.x0, callback=on_iterate,
                   checkpoint=solve.checkpoint)
    if method == "gauss-newton":
        M = gram_preconditioner(solve.preconditioner, G, solve.sketch)
        result = min_norm_solve(G, -r, M, **options)  # v₀ = −G⁺ r

        def range_part(z):  # the preconditioner, paid once, serves every projection
            return min_norm_solve(G, G @ z, M, maxiter=radius.projection_maxiter, rtol=1e-10).x.to(z)
    else:
        solver = minres_min_norm if solve.min_norm else minres
        result = solver(H, -b, deflation=solve.deflation, keep_basis=solve.keep_basis, **options)

        def range_part(z):
            return minres(H, H(z), maxiter=radius.projection_maxiter, rtol=1e-10).x.to(z)

    if solve.rule == "fixed":
        v, selected = result.x, {"iteration": result.iterations, "stopped_by": result.stopped_by}
    else:
        if result.stopped_by != "callback" and last[0] is not None and last[0][0] % solve.check_every:
            score(solve.check_every * (last[0][0] // solve.check_every + 1), last[0][1])  # score the end
        v, selected = best_v[0], dict(best, stopped_by=result.stopped_by, iterations_run=result.iterations)
    return v.to(b), NullSpace(range_part=range_part), selected, path, result


def _validated_null_radius(p, v0, null: NullSpace, perturbed_risk, risk0, risk_c, opts: RadiusOptions) -> dict:
    """ρ by the rule of the module doc; the record says how it was found."""
    record = {"rule": f"members keep ≥ {opts.keep:g} of the centre's reduction of the perturbed risk",
              "keep": opts.keep, "directions": opts.directions, "risk_w_bar": risk0, "risk_centre": risk_c,
              "rho": 0.0, "determined": False, "evaluations": 0}
    if null.dim == 0:
        record["note"] = "the null space is empty: the set is its centre"
    if null.dim == 0 or opts.directions == 0 or not risk_c < risk0:
        return record
    threshold = risk_c + (1 - opts.keep) * (risk0 - risk_c)
    g = torch.Generator().manual_seed(opts.seed)
    dirs = []
    for _ in range(opts.directions):
        z = torch.randn(p, generator=g, dtype=torch.float64).to(v0)
        n = null(z)
        if float(n.norm()) > 1e-6 * float(z.norm()):  # below: the projector's rounding, no null direction
            dirs.append(n / n.norm())
    if not dirs:
        record["note"] = "the null space is empty (random directions project to rounding): the set is its centre"
        return record

    def ok(rho: float) -> bool:
        record["evaluations"] += len(dirs)
        return max(perturbed_risk(v0 + rho * d) for d in dirs) <= threshold

    scale = max(float(v0.norm()), 1e-12)  # only where the search starts; the rule decides
    lo, hi = 0.0, scale
    for _ in range(40):
        if not ok(hi):
            break
        lo, hi = hi, 2 * hi
    else:
        record.update(rho=lo, determined=False, note="members stayed valid up to the search limit")
        return record
    if lo == 0.0:
        for _ in range(40):
            hi_next = hi / 2
            if ok(hi_next):
                lo = hi_next
                break
            hi = hi_next
    while lo > 0 and hi / lo > 1.05:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    record.update(rho=lo, determined=lo > 0, threshold=threshold)
    return record
