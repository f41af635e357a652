"""Minimum-norm least-squares solves of ``H v = −b`` for symmetric, singular, indefinite H.

Two paths give the same mathematical object, ``v = −H⁺ b``:

* :class:`Spectrum` — eigendecomposition of the p×p Hessian (small p; the reference).
* :func:`minres_min_norm` — two MINRES solves on the matrix-free
  :class:`~setsens.operators.Hessian` (one H v per iteration); never forms a p×p matrix.

Why two solves.  Plain MINRES is minimum-norm only on *consistent* systems: on an inconsistent
singular system (eq. 19 in floating point, usually) its iterates keep b's null-space component
and can grow without bound along it (measured: ‖v‖ = 1e14 against a minimum norm of 20).  Both
solves here are consistent and start from 0, so every iterate lies in range(H): the first,
``H z = H b``, gives ``z = H⁺H b``, the part of b in range(H); the second, ``H v = −z``, gives
``v = −H⁺ b``.

Regularisation.  H has thousands of eigenvalues that are zero up to rounding.  A pseudo-inverse
with a tiny cut-off divides by them and produces huge, meaningless shifts.  Both paths expose a
one-parameter family ``v(τ)`` of regularised solutions: spectral truncation (eigen-directions with
``|λ| ≤ τ·λ_max`` are the numerical null space), or the iteration count of the second solve.
Which member to use is chosen by :mod:`setsens.solution_set` (the validated rule); this module
only computes the family.  (‖v_k‖ is *not* monotone in k for indefinite H.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import scipy.sparse.linalg as spla
import torch
from torch import Tensor

__all__ = ["Spectrum", "KrylovPath", "krylov_solve", "minres_min_norm", "top_eigenvalue"]


@dataclass
class Spectrum:
    """``A = U diag(s) Vᵀ``: eigendecomposition of a symmetric H (U = V, s = λ) or SVD of a
    rectangular G (dense path, small p).  ``right`` holds all p right vectors, so the null space
    is explicit."""

    values: Tensor
    right: Tensor
    left: Tensor

    @classmethod
    def of(cls, H: Tensor) -> "Spectrum":
        """Eigendecomposition of the symmetric part of ``H``."""
        lam, U = torch.linalg.eigh(0.5 * (H + H.T))
        return cls(lam, U, U)

    @classmethod
    def of_rectangular(cls, G: Tensor) -> "Spectrum":
        """Full SVD of ``G`` (m × p); the p − m trailing right vectors get singular value 0."""
        U, s, Vh = torch.linalg.svd(G, full_matrices=True)
        values = torch.zeros(Vh.shape[0], dtype=s.dtype, device=s.device)
        values[: s.numel()] = s
        left = torch.zeros(G.shape[0], Vh.shape[0], dtype=G.dtype, device=G.device)
        left[:, : s.numel()] = U[:, : s.numel()]
        return cls(values, Vh.T, left)

    @property
    def eigenvalues(self) -> Tensor:
        return self.values

    @property
    def eigenvectors(self) -> Tensor:
        return self.right

    @property
    def lambda_max(self) -> float:
        return float(self.values.abs().max())

    def kept(self, tau: float) -> Tensor:
        """Mask of directions outside the numerical null space, ``|s| > τ·s_max``."""
        return self.values.abs() > tau * self.lambda_max

    def null_basis(self, tau: float) -> Tensor:
        """Orthonormal basis (p × r) of the numerical null space at cut-off ``τ``."""
        return self.right[:, ~self.kept(tau)]

    def solve(self, b: Tensor, tau: float) -> Tensor:
        """Minimum-norm least-squares ``v = −A_τ⁺ b`` with the truncated pseudo-inverse."""
        keep = self.kept(tau)
        return -self.right[:, keep] @ ((self.left[:, keep].T @ b) / self.values[keep])

    def apply(self, v: Tensor) -> Tensor:
        """``A v``."""
        return self.left @ (self.values * (self.right.T @ v))


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


def minres_min_norm(hessian, b: Tensor, maxiter: int = 200, rtol: float = 1e-10,
                    callback: Callable[[int, Tensor], bool] | None = None) -> KrylovPath:
    """``v ≈ −H⁺ b``, minimum norm also when b leaves range(H) (see the module doc).

    MINRES from 0 on ``H z = H b`` (z: the part of b in range(H)), then on ``H v = −z``;
    ``callback`` sees the second solve's iterates.  Cost: at most ``2·maxiter + 1`` H v;
    memory: a few p-vectors.
    """
    calls = hessian.calls
    first = krylov_solve(hessian, -hessian(b), maxiter=maxiter, rtol=rtol)  # H z = H b
    path = krylov_solve(hessian, first.v, maxiter=maxiter, rtol=rtol, callback=callback)
    path.hvp_count = hessian.calls - calls
    path.method = "minres-min-norm"
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
