"""Dense minimum-norm least-squares solves of ``A v = −b`` (small p; the references).

:class:`Spectrum` — the eigendecomposition of a symmetric p×p H or the SVD of a rectangular G —
gives ``v = −A_τ⁺ b`` and the numerical null space for a spectral cut-off τ.  H has thousands of
eigenvalues that are zero up to rounding; a pseudo-inverse with a tiny cut-off divides by them and
produces huge, meaningless shifts, so the cut-off is a regulariser: eigen-directions with
``|λ| ≤ τ·λ_max`` are the numerical null space.  Which τ to use is chosen by
:mod:`setsens.solution_set` (the validated rule).  The matrix-free counterparts (MINRES, CGLS, with
the iteration count as regulariser) are in :mod:`setsens.krylov`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Spectrum"]


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
