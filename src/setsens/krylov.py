"""Krylov methods on matrix-free operators: one result type, one callback, one checkpoint.

Every method takes an operator ``A`` with ``A @ x`` (a tensor, :class:`~setsens.operators.Hessian`,
:class:`~setsens.function_space.OutputJacobian`, …; :func:`cgls` also needs ``A.T @ y``) and returns a
:class:`KrylovResult`.  Conventions shared by all of them:

* a solver solves ``A x = b`` (least squares when b leaves range(A)); eq. 19's ``H v = −J Δx`` is
  ``minres(H, −J Δx)``.  Vectors are kept in ``dtype`` (float64) whatever the operator's precision;
* ``callback(k, residual, x_k)`` runs after iteration k with the relative residual and the
  iterate; returning True stops the method there (``stopped_by="callback"``).  Time spent in it is
  not counted in ``seconds``;
* ``checkpoint``: a file path.  The whole state is written there (atomically) after every iteration,
  keyed by what it depends on (method, size and norm of b, the start, the deflation space); a call
  with the same path and key resumes where the last one stopped and follows the same iterates.

:func:`minres` (symmetric, singular or indefinite A; one product per iteration; optional
:class:`Deflation`) and :func:`minres_min_norm` (``A⁺ b`` by two consistent MINRES solves),
:func:`cgls` (any A; one A and one Aᵀ product per iteration), :func:`cgne` (the same products, CG on
``AAᵀ y = b`` with a preconditioner in A's range), :func:`lanczos` (Ritz pairs) and
:func:`power_iteration` (``max |λ|``).  Each keeps its state in tensors, so a run resumes, deflates and runs
on a GPU; on the CPU :func:`minres` sums its inner products in a fixed order, so that its iterates are
reproducible to the bit (the tests hold :func:`minres` and :func:`cgls` to SciPy's MINRES and LSQR).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["KrylovResult", "Deflation", "minres", "minres_min_norm", "cgls", "cgne", "lanczos", "power_iteration"]

#: ``callback(k, relative residual, x_k) -> stop?``
Callback = Callable[[int, float, Tensor], "bool | None"]


@dataclass
class KrylovResult:
    """What every Krylov method returns.

    Attributes:
        x: the solution (solvers) or the leading eigenvector (eigensolvers).
        iterations: iterations done, those before a resume included.
        residuals: relative residual after each iteration — ``‖b − A x_k‖/‖b‖`` (the method's own
            recurrence, of the deflated system under deflation); eigensolvers ``‖A y − θ y‖/|θ|``
            of the leading pair (:func:`lanczos`: of each Ritz pair, ascending θ).
        products: operator products this call spent (``A @`` and ``A.T @`` one each).
        converged: stopped by its tolerance (or at the working precision), not by ``maxiter`` or
            the callback.
        stopped_by: ``"rtol"``, ``"rounding"`` (no progress possible at working precision),
            ``"maxiter"`` or ``"callback"``.
        seconds: time in the method, callbacks excluded, time before a resume included.
        resumed_from: the iteration a checkpoint resumed from (0: a fresh start).
        values: eigensolvers: the Ritz values (ascending) or the estimate of ``max |λ|``.
        basis: ``(V, AV)``: Lanczos vectors (``minres(keep_basis=True)``) or Ritz vectors
            (:func:`lanczos`) and their products, for :meth:`Deflation.from_krylov`.
        deflation: the space the solve was deflated by.
    """

    x: Tensor
    iterations: int
    residuals: list[float]
    products: int
    converged: bool
    stopped_by: str
    seconds: float = 0.0
    resumed_from: int = 0
    values: Tensor | None = None
    basis: tuple[Tensor, Tensor] | None = field(default=None, repr=False)
    deflation: "Deflation | None" = field(default=None, repr=False)

    @property
    def residual(self) -> float:
        """The last relative residual (nan before the first iteration)."""
        return self.residuals[-1] if self.residuals else float("nan")


class _Run:
    """Bookkeeping every method shares: counted products, the clock, the callback, the checkpoint."""

    def __init__(self, A, dtype, callback: Callback | None, checkpoint: str | None, key: dict):
        self.A, self.dtype, self.callback = A, dtype, callback
        self.checkpoint, self.key = checkpoint, key
        self.products, self.t0 = 0, time.perf_counter()

    def matvec(self, x: Tensor) -> Tensor:
        self.products += 1
        return (self.A @ self._cast(x)).to(self.dtype)

    def rmatvec(self, y: Tensor) -> Tensor:
        self.products += 1
        return (self.A.T @ self._cast(y)).to(self.dtype)

    def _cast(self, x: Tensor) -> Tensor:
        """A dense matrix takes its own dtype; an operator casts for itself."""
        return x.to(self.A) if isinstance(self.A, Tensor) else x

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def notify(self, k: int, residual: float, x) -> bool:
        """Run the callback (``x`` may be a function giving the iterate); True: stop."""
        if self.callback is None:
            return False
        t = time.perf_counter()
        stop = bool(self.callback(k, residual, x() if callable(x) else x))
        self.t0 += time.perf_counter() - t
        return stop

    def load(self, device) -> dict | None:
        """The saved state if it was written for the same key (else None: start afresh)."""
        if self.checkpoint is None or not os.path.exists(self.checkpoint):
            return None
        state = torch.load(self.checkpoint, map_location=device, weights_only=False)
        if not _same(state.get("key"), self.key):
            return None
        self.t0 -= state["seconds"]
        return state

    def save(self, state: dict) -> None:
        if self.checkpoint is not None:
            from .atomic import atomic_torch_save

            atomic_torch_save(state | {"key": self.key, "seconds": self.seconds}, self.checkpoint)


def _same(a, b) -> bool:
    """Keys agree: equal, floats to 1e-9 relative (b is recomputed on resume)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _norm(t: Tensor | None) -> float | None:
    return None if t is None else float(t.norm())


def _dot(a: Tensor, b: Tensor) -> float:
    """``⟨a, b⟩``, on the CPU by ``np.dot``: one fixed order of summation, so that MINRES's iterates are
    reproducible to the bit (another order moves a few hundred iterations on a singular H by 1e-4)."""
    return float(np.dot(a.detach().numpy(), b.detach().numpy())) if a.device.type == "cpu" else float(a @ b)


def _hypot(a: float, b: float) -> float:
    return float(np.linalg.norm([a, b]))  # √(a² + b²) by NumPy, rounded the same way on every run


# -- deflation ----------------------------------------------------------------------------------------
@dataclass
class Deflation:
    """An approximately A-invariant subspace ``V`` (orthonormal, p × k) with ``AV`` stored.

    :func:`minres` then runs on ``P A P`` with ``P = I − V Vᵀ`` (:meth:`project`) and adds the
    V-component by a small Galerkin system (:meth:`correct`), pseudo-inverted with relative cut-off
    ``rcond``.  Removing the largest eigenvalues this way lets the iterations work on the rest.
    """

    V: Tensor
    AV: Tensor
    rcond: float = 1e-6

    def __post_init__(self):
        # re-orthonormalise (V may come from a float32 run) and carry AV along
        Q, R = torch.linalg.qr(self.V)
        keep = R.diagonal().abs() > 1e-8 * R.diagonal().abs().max()
        self.V = Q[:, keep]
        self.AV = torch.linalg.solve_triangular(R[:, keep][keep].T, self.AV[:, keep].T, upper=False).T
        G = self.V.T @ self.AV
        self.G = 0.5 * (G + G.T)

    @property
    def k(self) -> int:
        return self.V.shape[1]

    def project(self, x: Tensor) -> Tensor:
        """``P x = x − V Vᵀ x``."""
        return x - self.V @ (self.V.T @ x)

    def correct(self, u: Tensor, b: Tensor) -> Tensor:
        """``x = P u + V c`` with ``(VᵀAV) c = Vᵀ b − (AV)ᵀ P u``: the solution of ``A x = b`` from the
        deflated one."""
        u = self.project(u)
        rhs = self.V.T @ b - self.AV.T @ u
        lam, S = torch.linalg.eigh(self.G)
        keep = lam.abs() > self.rcond * lam.abs().max()
        return u + self.V @ (S[:, keep] @ ((S[:, keep].T @ rhs) / lam[keep]))

    @classmethod
    def from_krylov(cls, result: KrylovResult, k: int, max_residual: float = 1e-2, rcond: float = 1e-6):
        """The ``k`` Ritz pairs of largest |θ| with ``‖Ay − θy‖/|θ| ≤ max_residual`` from a result's
        ``basis`` (and the space it was itself deflated by).  No further products."""
        if result.basis is None:
            raise ValueError("the result holds no basis (minres(keep_basis=True) or lanczos)")
        V, AV = result.basis
        if result.deflation is not None:
            V, AV = torch.cat([result.deflation.V, V], 1), torch.cat([result.deflation.AV, AV], 1)
        Q, R = torch.linalg.qr(V)
        AQ = torch.linalg.solve_triangular(R.T, AV.T, upper=False).T
        theta, Y, AY = _ritz(Q, AQ)
        res = (AY - Y * theta).norm(dim=0) / theta.abs().clamp_min(1e-300)
        order = torch.argsort(theta.abs(), descending=True)
        order = order[res[order] <= max_residual][:k]
        if order.numel() == 0:
            raise ValueError("no converged Ritz pair to deflate with (run more iterations)")
        return cls(Y[:, order].clone(), AY[:, order].clone(), rcond)


def _ritz(Q: Tensor, AQ: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rayleigh–Ritz on an orthonormal basis: ``(θ ascending, Y, AY)``."""
    T = Q.T @ AQ
    theta, S = torch.linalg.eigh(0.5 * (T + T.T))
    return theta, Q @ S, AQ @ S


# -- MINRES -------------------------------------------------------------------------------------------
_MINRES_VECTORS = ("x", "w", "w2", "r1", "r2", "y")
_MINRES_SCALARS = ("beta1", "beta", "oldb", "dbar", "epsln", "phibar", "cs", "sn", "tnorm2", "gmax", "gmin",
                   "itn", "stopped_by")


def minres(A, b: Tensor, *, maxiter: int = 200, rtol: float = 1e-10, x0: Tensor | None = None,
           deflation: Deflation | None = None, callback: Callback | None = None, checkpoint: str | None = None,
           keep_basis: bool = False, dtype=torch.float64) -> KrylovResult:
    """Least squares ``A x = b`` for symmetric (singular, indefinite) A by MINRES (Paige & Saunders 1975).

    One product per iteration.  From ``x0 = 0`` the iterates lie in the Krylov space of A, which
    grows along well-determined directions first: the iteration count is a regulariser.  Stops by
    Paige & Saunders' tests: ``‖r‖ ≤ rtol·‖A‖‖x‖`` or ``‖A r‖ ≤ rtol·‖A‖‖r‖`` (least squares),
    ``"rounding"`` when ill-conditioning stops progress, or ``maxiter``.  ``deflation``: solve on
    ``P A P`` and add the deflated component exactly.  ``keep_basis``: record the Lanczos vectors
    and their products (memory: 2 p-vectors per iteration) for :meth:`Deflation.from_krylov`.
    """
    b = b.detach().to(dtype)
    key = {"method": "minres", "n": b.numel(), "b": _norm(b), "x0": _norm(x0),
           "deflation": 0 if deflation is None else deflation.k}
    run = _Run(A, dtype, callback, checkpoint, key)
    target = b if deflation is None else deflation.project(b)

    def op(v: Tensor) -> Tensor:
        out = run.matvec(v)
        return out if deflation is None else deflation.project(out)

    def solution(x: Tensor) -> Tensor:
        return x if deflation is None else deflation.correct(x, b)

    eps = torch.finfo(dtype).eps
    bnorm = max(float(target.norm()), 1e-300)
    basis: list[tuple[Tensor, Tensor]] = []
    st = run.load(b.device)
    if st is not None:
        x, w, w2, r1, r2, y = (st[k].to(dtype) for k in _MINRES_VECTORS)
        beta1, beta, oldb, dbar, epsln, phibar, cs, sn, tnorm2, gmax, gmin, itn, stopped_by = (
            st[k] for k in _MINRES_SCALARS)
        residuals, resumed = list(st["residuals"]), itn
    else:
        x = torch.zeros_like(target) if x0 is None else x0.detach().to(b.device, dtype)
        x = x if deflation is None else deflation.project(x)
        r1 = target.clone() if x0 is None else target - op(x)
        y, r2 = r1, r1
        beta1 = beta = phibar = math.sqrt(_dot(r1, r1))
        oldb = dbar = epsln = tnorm2 = gmax = sn = 0.0
        gmin, cs, itn, residuals, resumed = math.inf, -1.0, 0, [], 0
        w, w2 = torch.zeros_like(target), torch.zeros_like(target)
        stopped_by = "rtol" if beta1 == 0.0 else None
    while stopped_by is None and itn < maxiter:
        itn += 1
        v = (1.0 / beta) * y  # Paige & Saunders' recurrence, in a fixed order
        y = op(v)
        if keep_basis:
            basis.append((v, y.clone()))
        if itn >= 2:
            y = y - (beta / oldb) * r1
        alfa = _dot(v, y)
        y = y - (alfa / beta) * r2
        r1, r2 = r2, y
        y = r2
        oldb, beta = beta, math.sqrt(_dot(r2, y))
        tnorm2 += alfa**2 + oldb**2 + beta**2
        if itn == 1 and beta / beta1 <= 10 * eps:
            stopped_by = "rtol"  # A b ∥ b: solved in one step
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        root = _hypot(gbar, dbar)
        gamma = max(_hypot(gbar, beta), eps)
        cs, sn = gbar / gamma, beta / gamma
        phi, phibar = cs * phibar, sn * phibar
        w1, w2 = w2, w
        w = (v - oldeps * w1 - delta * w2) * (1.0 / gamma)
        x = x + phi * w
        gmax, gmin = max(gmax, gamma), min(gmin, gamma)
        anorm, ynorm = math.sqrt(tnorm2), math.sqrt(_dot(x, x))
        test1 = phibar / (anorm * ynorm) if anorm and ynorm else math.inf  # ‖r‖ / (‖A‖ ‖x‖)
        test2 = root / anorm if anorm else math.inf  # ‖A r‖ / (‖A‖ ‖r‖)
        if stopped_by is None:
            if test1 <= rtol or test2 <= rtol:
                stopped_by = "rtol"
            elif anorm * ynorm * eps >= beta1 or gmax / gmin >= 0.1 / eps:
                stopped_by = "rounding"
            elif itn < maxiter and (1 + test1 <= 1 or 1 + test2 <= 1):
                stopped_by = "rtol"
        residuals.append(phibar / bnorm)
        if run.notify(itn, residuals[-1], lambda: solution(x)) and stopped_by is None:
            stopped_by = "callback"
        run.save(dict(zip(_MINRES_VECTORS, (x, w, w2, r1, r2, y)))
                 | dict(zip(_MINRES_SCALARS, (beta1, beta, oldb, dbar, epsln, phibar, cs, sn, tnorm2, gmax, gmin,
                                              itn, stopped_by))) | {"residuals": residuals})
    stopped_by = stopped_by or "maxiter"
    V_AV = (torch.stack([v for v, _ in basis], 1), torch.stack([h for _, h in basis], 1)) if basis else None
    return KrylovResult(solution(x), itn, residuals, run.products, stopped_by in ("rtol", "rounding"), stopped_by,
                        run.seconds, resumed, basis=V_AV, deflation=deflation)


def minres_min_norm(A, b: Tensor, *, maxiter: int = 200, rtol: float = 1e-10, **options) -> KrylovResult:
    """``x ≈ A⁺ b``, minimum norm also when b leaves range(A), for symmetric A.

    Plain MINRES is minimum-norm only on *consistent* systems: on an inconsistent singular one it
    keeps b's null-space part and its iterates can grow without bound along it.  Here both solves
    are consistent and start from 0: ``A z = A b`` gives ``z = A⁺A b`` (b's part in range(A)), then
    ``A x = z`` gives ``x = A⁺ b``.  ``options`` (callback, checkpoint, deflation, …) apply to the
    second solve, whose iterates the result records.  Cost: at most ``2·maxiter + 1`` products.
    """
    first = minres(A, A @ b, maxiter=maxiter, rtol=rtol)
    result = minres(A, first.x, maxiter=maxiter, rtol=rtol, **options)
    result.products += first.products + 1
    return result


# -- CGLS ---------------------------------------------------------------------------------------------
def cgls(A, b: Tensor, *, maxiter: int = 50, rtol: float = 1e-6, x0: Tensor | None = None,
         callback: Callback | None = None, checkpoint: str | None = None,
         dot: Callable[[Tensor, Tensor], float] | None = None, dtype=torch.float64) -> KrylovResult:
    """``min ‖A x − b‖`` by CGLS (CG on ``AᵀA x = Aᵀ b``, Björck's form): one ``A @`` and one ``A.T @`` per step.

    From ``x0 = 0`` the iterates stay in range(Aᵀ), so at convergence ``x = A⁺ b`` (minimum-norm
    least squares); before it the iteration count regularises.  From ``x0`` the result keeps x0's
    component in ker(A).  ``‖A x − b‖`` decreases monotonically; stops at ``‖A x − b‖ ≤ rtol‖b‖`` or
    at ``‖Aᵀ r‖ ≤ rtol‖Aᵀ r₀‖`` (an inconsistent system solved: iterating on would only amplify
    rounding).  ``dot``: the inner product of A's range (default: the sum of
    elementwise products); a sharded problem passes its all-reduced one.
    """
    dot = dot or (lambda a, c: float((a * c).sum()))
    b = b.detach().to(dtype)
    bnorm = max(dot(b, b) ** 0.5, 1e-300)
    run = _Run(A, dtype, callback, checkpoint, {"method": "cgls", "shape": tuple(b.shape), "b": bnorm,
                                                 "x0": _norm(x0)})
    st = run.load(b.device)
    if st is not None:
        x, r, s, d = (st[k].to(dtype) for k in ("x", "r", "s", "d"))
        gamma, itn, residuals, stopped_by = st["gamma"], st["itn"], list(st["residuals"]), st["stopped_by"]
        gamma0, resumed = st.get("gamma0", 0.0), itn
    else:
        x = None if x0 is None else x0.detach().to(b.device, dtype)
        r = b.clone() if x is None else b - run.matvec(x)
        s = run.rmatvec(r)
        x = torch.zeros_like(s) if x is None else x
        d = s.clone()
        gamma, itn, residuals, resumed = float(s @ s), 0, [], 0
        gamma0 = gamma  # ‖Aᵀr₀‖²: the normal equations' residual is measured against it
        stopped_by = "rtol" if gamma == 0.0 else None
    while stopped_by is None and itn < maxiter:
        q = run.matvec(d)
        qq = dot(q, q)
        if qq == 0.0:
            stopped_by = "rounding"
            break
        alpha = gamma / qq
        x = x + alpha * d
        r = r - alpha * q
        s = run.rmatvec(r)
        gamma_new = float(s @ s)
        d = s + (gamma_new / gamma) * d
        gamma = gamma_new
        itn += 1
        residuals.append(dot(r, r) ** 0.5 / bnorm)
        if residuals[-1] <= rtol or gamma <= rtol**2 * gamma0:  # consistent, or least squares solved
            stopped_by = "rtol"
        if run.notify(itn, residuals[-1], x) and stopped_by is None:
            stopped_by = "callback"
        run.save({"x": x, "r": r, "s": s, "d": d, "gamma": gamma, "gamma0": gamma0, "itn": itn,
                  "residuals": residuals, "stopped_by": stopped_by})
    stopped_by = stopped_by or "maxiter"
    return KrylovResult(x, itn, residuals, run.products, stopped_by in ("rtol", "rounding"), stopped_by,
                        run.seconds, resumed)


# -- CGNE (Craig) --------------------------------------------------------------------------------------
def cgne(A, b: Tensor, *, precondition: Callable[[Tensor], Tensor] | None = None, maxiter: int = 50,
         rtol: float = 1e-6, x0: Tensor | None = None, callback: Callback | None = None,
         checkpoint: str | None = None, dot: Callable[[Tensor, Tensor], float] | None = None,
         dtype=torch.float64) -> KrylovResult:
    """``min ‖x‖ s.t. A x = b`` by preconditioned CG on ``A Aᵀ y = b``, ``x = Aᵀ y`` (Craig's method).

    One ``A @`` and one ``A.T @`` per step, as :func:`cgls`.  The iterates are ``x0 + Aᵀ y_k``, so
    from ``x0 = 0`` they stay in range(Aᵀ) *whatever the preconditioner*: at convergence
    ``x = A⁺ b`` for a consistent system (b ∈ range(A)).  CGLS keeps that property only without a
    preconditioner; this method takes one in A's range, ``precondition(r) ≈ (AAᵀ)⁻¹ r`` (symmetric
    positive semidefinite, positive on range(A)), which changes the path, not the limit.  Each step
    minimises the error ``‖x_k − A⁺ b‖`` over its Krylov space (CGLS: the residual).  On an
    inconsistent system the iterates diverge slowly from the least-squares solution: use
    :func:`cgls` there.  ``residuals``: ``‖b − A x_k‖/‖b‖`` (by the recurrence).  ``dot``: the
    inner product of A's range, as in :func:`cgls`.
    """
    dot = dot or (lambda a, c: float((a * c).sum()))
    M = precondition or (lambda r: r)
    b = b.detach().to(dtype)
    bnorm = max(dot(b, b) ** 0.5, 1e-300)
    run = _Run(A, dtype, callback, checkpoint, {"method": "cgne", "shape": tuple(b.shape), "b": bnorm,
                                                 "x0": _norm(x0), "preconditioned": precondition is not None})
    st = run.load(b.device)
    if st is not None:
        x, r, q = (st[k].to(dtype) for k in ("x", "r", "q"))
        rz, itn, residuals, stopped_by = st["rz"], st["itn"], list(st["residuals"]), st["stopped_by"]
        resumed = itn
    else:
        x = None if x0 is None else x0.detach().to(b.device, dtype)
        r = b.clone() if x is None else b - run.matvec(x)
        z = M(r).to(dtype)
        q = run.rmatvec(z)  # Aᵀ d for the search direction d in A's range (d itself is not needed)
        x = torch.zeros_like(q) if x is None else x
        rz, itn, residuals, resumed = dot(r, z), 0, [], 0
        stopped_by = "rtol" if rz <= 0.0 else None
    while stopped_by is None and itn < maxiter:
        qq = float(q @ q)  # ⟨d, AAᵀ d⟩
        if qq == 0.0:
            stopped_by = "rounding"
            break
        alpha = rz / qq
        x = x + alpha * q
        r = r - alpha * run.matvec(q)
        z = M(r).to(dtype)
        rz_new = dot(r, z)
        q = run.rmatvec(z) + (rz_new / rz) * q  # d ← z + β d
        rz = rz_new
        itn += 1
        residuals.append(dot(r, r) ** 0.5 / bnorm)
        if residuals[-1] <= rtol or rz <= 0.0:
            stopped_by = "rtol"
        if run.notify(itn, residuals[-1], x) and stopped_by is None:
            stopped_by = "callback"
        run.save({"x": x, "r": r, "q": q, "rz": rz, "itn": itn, "residuals": residuals,
                  "stopped_by": stopped_by})
    stopped_by = stopped_by or "maxiter"
    return KrylovResult(x, itn, residuals, run.products, stopped_by in ("rtol", "rounding"), stopped_by,
                        run.seconds, resumed)


# -- eigenvalues --------------------------------------------------------------------------------------
def lanczos(A, start: Tensor, steps: int, *, dtype=torch.float64) -> KrylovResult:
    """Ritz pairs of symmetric A from ``steps`` Lanczos steps with full reorthogonalisation.

    ``values``: the Ritz values θ (ascending); ``basis``: the Ritz vectors Y (p × steps, orthonormal)
    and their exact products AY (stored, so a :class:`Deflation` needs no further products); ``x``: the
    Ritz vector of largest |θ|.  One product per step; stops early if the Krylov space is exhausted.
    """
    run = _Run(A, dtype, None, None, {})
    q = start.detach().to(dtype)
    q = q / q.norm()
    Q, AQ = [], []
    for _ in range(steps):
        Q.append(q)
        h = run.matvec(q)
        AQ.append(h)
        r, Qm = h.clone(), torch.stack(Q, 1)
        for _ in range(2):  # full reorthogonalisation, twice is enough
            r -= Qm @ (Qm.T @ r)
        nb = float(r.norm())
        if nb < 1e-12 * float(h.norm() + 1e-300):
            break
        q = r / nb
    theta, Y, AY = _ritz(torch.stack(Q, 1), torch.stack(AQ, 1))
    res = ((AY - Y * theta).norm(dim=0) / theta.abs().clamp_min(1e-300)).tolist()
    top = int(theta.abs().argmax())
    return KrylovResult(Y[:, top], len(Q), res, run.products, False, "maxiter", run.seconds, values=theta,
                        basis=(Y, AY))


def power_iteration(A, start: Tensor, iterations: int = 30, *, dtype=torch.float64) -> KrylovResult:
    """``max |λ(A)|`` of symmetric A by power iteration: ``values`` holds ``‖A v_k‖`` for the last unit
    iterate v_k, ``x`` the iterate.  One product per iteration; converges at the rate |λ₂/λ₁|."""
    run = _Run(A, dtype, None, None, {})
    v = start.detach().to(dtype)
    v, lam, residuals = v / v.norm(), 0.0, []
    for _ in range(iterations):
        hv = run.matvec(v)
        lam = float(hv.norm())
        if lam == 0.0:
            break
        theta = float(v @ hv)
        residuals.append(float((hv - theta * v).norm()) / max(abs(theta), 1e-300))
        v = hv / lam
    return KrylovResult(v, len(residuals), residuals, run.products, False, "maxiter", run.seconds,
                        values=torch.tensor([lam], dtype=dtype))
