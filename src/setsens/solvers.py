"""Minimum-norm least-squares solves of ``H v = −b`` for symmetric, singular, indefinite H.

Two paths give the same mathematical object:

* :func:`dense_solve` — eigendecomposition of the p×p Hessian (small p; the reference).
* :func:`krylov_solve` — SciPy's MINRES (one H v per iteration) or LSMR (two per iteration)
  on the matrix-free :class:`~setsens.operators.Hessian`; never forms a p×p matrix.

Regularisation.  H has thousands of eigenvalues that are zero up to rounding.  A pseudo-inverse
with a tiny cut-off divides by them and produces huge, meaningless shifts.  Both paths expose a
one-parameter family ``v(τ)`` of regularised solutions:

* dense: spectral truncation, eigen-directions with ``|λ| ≤ τ·λ_max`` are the numerical null space;
* Krylov: the iteration count (the Krylov space grows along the well-determined directions first,
  and ``‖v_k‖`` grows monotonically).

Which member to use is chosen by :mod:`setsens.solution_set` (the validated rule); this module
only computes the family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import scipy.sparse.linalg as spla
import torch
from torch import Tensor

__all__ = ["Spectrum", "KrylovPath", "dense_solve", "krylov_solve", "top_eigenvalue"]


@dataclass
class Spectrum:
    """Eigendecomposition ``H = U diag(λ) Uᵀ`` (dense path, small p)."""

    eigenvalues: Tensor
    eigenvectors: Tensor

    @classmethod
    def of(cls, H: Tensor) -> "Spectrum":
        H = 0.5 * (H + H.T)
        lam, U = torch.linalg.eigh(H)
        return cls(lam, U)

    @property
    def lambda_max(self) -> float:
        return float(self.eigenvalues.abs().max())

    def kept(self, tau: float) -> Tensor:
        """Mask of eigen-directions outside the numerical null space, ``|λ| > τ·λ_max``."""
        return self.eigenvalues.abs() > tau * self.lambda_max

    def null_basis(self, tau: float) -> Tensor:
        """Orthonormal basis (p × r) of the numerical null space at cut-off ``τ``."""
        return self.eigenvectors[:, ~self.kept(tau)]

    def solve(self, b: Tensor, tau: float) -> Tensor:
        """Minimum-norm least-squares ``v = −H_τ⁺ b`` with the truncated pseudo-inverse."""
        keep = self.kept(tau)
        U, lam = self.eigenvectors[:, keep], self.eigenvalues[keep]
        return -U @ ((U.T @ b) / lam)


def dense_solve(H: Tensor, b: Tensor, tau: float) -> Tensor:
    """``v = −H_τ⁺ b``: truncated pseudo-inverse (the dense reference). O(p³)."""
    return Spectrum.of(H).solve(b, tau)


@dataclass
class KrylovPath:
    """Iterates ``v_k`` of a Krylov solve of ``H v = −b`` and their residuals ``‖H v_k + b‖/‖b‖``."""

    v: Tensor
    iterations: int
    hvp_count: int
    method: str
    iterates: list[Tensor] = field(default_factory=list, repr=False)
    residuals: list[float] = field(default_factory=list)
    stopped_by: str = "maxiter"


class _Stop(Exception):
    pass


def krylov_solve(
    hessian,
    b: Tensor,
    method: str = "minres",
    maxiter: int = 200,
    rtol: float = 1e-10,
    keep_iterates: bool = False,
    callback: Callable[[int, Tensor], bool] | None = None,
    damp: float = 0.0,
) -> KrylovPath:
    """Solve ``H v = −b`` with SciPy's MINRES or LSMR on the matrix-free Hessian.

    ``callback(k, v_k)`` is called after every iteration; returning True stops the solve there.
    MINRES costs one H v per iteration, LSMR two (it also gives the true minimum-norm
    least-squares solution when b is not in range(H); ``damp`` adds Tikhonov damping).
    Memory: a few vectors of length p.
    """
    if method not in ("minres", "lsmr"):
        raise ValueError(f"method must be 'minres' or 'lsmr', got {method!r}")
    op = hessian.to_scipy()
    rhs = (-b).detach().cpu().double().numpy()
    calls0 = hessian.calls
    path = KrylovPath(v=torch.zeros_like(b), iterations=0, hvp_count=0, method=method)
    last = [np.zeros_like(rhs)]

    def record(xk: np.ndarray):
        path.iterations += 1
        last[0] = xk.copy()
        vk = torch.from_numpy(last[0]).to(b)
        if keep_iterates:
            path.iterates.append(vk)
        if callback is not None and callback(path.iterations, vk):
            path.stopped_by = "callback"
            raise _Stop

    try:
        if method == "minres":
            x, info = spla.minres(op, rhs, rtol=rtol, maxiter=maxiter, callback=record)
            path.stopped_by = "rtol" if info == 0 else "maxiter"
        else:
            # LSMR has no per-iteration callback: only its final iterate is recorded.
            x, istop, itn = spla.lsmr(op, rhs, damp=damp, atol=rtol, btol=rtol, maxiter=maxiter)[:3]
            path.iterations = itn
            path.stopped_by = "rtol" if istop in (1, 2, 4, 5) else "maxiter"
            record_final = torch.from_numpy(x).to(b)
            if keep_iterates:
                path.iterates.append(record_final)
            last[0] = x
    except _Stop:
        x = last[0]
    path.v = torch.from_numpy(np.asarray(x)).to(b)
    path.hvp_count = hessian.calls - calls0
    return path


def top_eigenvalue(hessian, iterations: int = 30, seed: int = 0) -> float:
    """``max |λ(H)|`` by power iteration (``iterations`` H v products)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(hessian.shape[0], generator=g, dtype=torch.float64).to(hessian.w)
    v /= v.norm()
    lam = 0.0
    for _ in range(iterations):
        hv = hessian(v)
        lam = float(hv.norm())
        if lam == 0.0:
            return 0.0
        v = hv / lam
    return lam
