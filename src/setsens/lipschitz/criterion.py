"""The coderivative (Mordukhovich) criterion ``Jᵀ y = 0 ∀ y ∈ ker H`` and the modulus
``κ = sup{‖Jᵀ y‖ : ‖H y‖ ≤ 1} = ‖Jᵀ H⁺‖`` from H and J as matrices, with the numerical null space
``{|λ| ≤ τ·λ_max}`` (truncated or Tikhonov-filtered) and its stability over τ: :class:`ModulusResult`,
:func:`modulus_from_matrices`, and the filters the numerical moduli share."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse.linalg as spla
import torch
from torch import Tensor


#: Default relative null-space tolerance: eigen-directions with ``|λ| ≤ τ·λ_max`` form the
#: numerical kernel of H (the cut-off the foundation's sweep found best for set estimates on the
#: digits DFCNN); every report re-evaluates κ at τ/10 and 10τ and flags it as ill-determined if it
#: moves by more than 10 % (it does on the digits network: docs/lipschitz.md §5).
DEFAULT_TAU = 1e-6
#: Relative change of κ over τ/10 … 10τ beyond which the modulus is reported as ill-determined.
STABILITY_RTOL = 0.10


@dataclass
class ModulusResult:
    """κ = ‖Jᵀ H_τ⁺‖ on one block of weights, with the coderivative criterion and its stability.

    * ``kappa`` — the modulus at the tolerance ``tau`` (``|λ| ≤ τ·λ_max`` is the null space;
      ``filter="tikhonov"`` uses ``λ/(λ²+δ²)``, ``δ = τ·λ_max``, instead of truncation).
    * ``aubin_residual`` — ``‖(I − H H_τ⁺) J‖₂ / ‖J‖₂``: the share of J's action that falls in the
      numerical null space (0 when the Aubin criterion ``Jᵀy = 0 ∀y ∈ ker H`` holds exactly).
    * ``stability`` — κ at τ/10 and 10τ; ``ill_determined`` when it moves by more than 10 %.
    * ``direction`` — the worst-case unit Δx (shape (|K|, *input_shape)), ``response`` the weight
      shift ``v = −H_τ⁺ J Δx`` it causes (``‖v‖ = κ``).
    """

    kappa: float
    tau: float
    filter: str
    aubin_residual: float
    criterion_rtol: float
    lambda_max: float
    null_dim: int | None
    block: str
    scale: str
    indices: Tensor
    direction: Tensor | None = None
    response: Tensor | None = None
    stability: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)
    next_directions: list[Tensor] = field(default_factory=list, repr=False)

    @property
    def criterion_holds(self) -> bool:
        return self.aubin_residual <= self.criterion_rtol

    @property
    def ill_determined(self) -> bool:
        return bool(self.stability.get("ill_determined", False))

    def summary(self) -> dict:
        return {
            "block": self.block, "kappa": self.kappa, "tau": self.tau, "filter": self.filter,
            "aubin_residual": self.aubin_residual, "criterion_rtol": self.criterion_rtol,
            "criterion_holds": self.criterion_holds, "lambda_max": self.lambda_max,
            "null_dim": self.null_dim, "scale": self.scale, "points": int(self.indices.numel()),
            "stability": self.stability, "cost": self.cost,
        }


def _filter(lam: Tensor, lam_max: float, tau: float, kind: str) -> tuple[Tensor, Tensor]:
    """(pseudo-inverse filter φ(λ) ≈ 1/λ, null-space filter 1 − λφ(λ)) for truncation or Tikhonov."""
    if kind == "truncate":
        keep = lam.abs() > tau * lam_max
        phi = torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), torch.zeros_like(lam))
        return phi, (~keep).to(lam)
    if kind == "tikhonov":
        d2 = (tau * lam_max) ** 2
        return lam / (lam**2 + d2), d2 / (lam**2 + d2)
    raise ValueError(f"filter must be 'truncate' or 'tikhonov', got {kind!r}")


def _top_eig(M: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
    s, V = torch.linalg.eigh(0.5 * (M + M.T))
    return s.flip(0)[:k].clamp_min(0), V.flip(1)[:, :k]


def _top_eigenvalue(M: Tensor) -> float:
    """The largest eigenvalue of a symmetric PSD matrix: Lanczos (ARPACK, to machine precision) from
    a fixed start vector, dense below 64 rows."""
    n = M.shape[0]
    if n == 0:
        return 0.0
    if n <= 64:
        return float(torch.linalg.eigvalsh(0.5 * (M + M.T))[-1].clamp_min(0))
    v0 = np.random.default_rng(0).standard_normal(n)
    val = spla.eigsh(M.detach().cpu().numpy(), k=1, which="LA", v0=v0, return_eigenvectors=False)[0]
    return max(float(val), 0.0)


def _top_filtered_eig(G: Tensor, f: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
    """Top ``k`` eigenpairs of ``diag(f) G diag(f)`` from the rows where ``f ≠ 0`` only (truncation
    zeroes most of them: the kept or the null part of a spectrum), eigenvectors embedded back."""
    on = f != 0
    V = torch.zeros(f.numel(), 0, dtype=G.dtype, device=G.device)
    if not bool(on.any()):
        return torch.zeros(1, dtype=G.dtype, device=G.device), V
    s, Vs = _top_eig(f[on, None] * G[on][:, on] * f[None, on], k)
    V = torch.zeros(f.numel(), Vs.shape[1], dtype=G.dtype, device=G.device)
    V[on] = Vs
    return s, V


def modulus_from_matrices(
    H: Tensor, J: Tensor, tau: float = DEFAULT_TAU, filter: str = "truncate"
) -> tuple[float, float]:
    """``(κ, aubin_residual)`` from an explicit Hessian H (p×p) and data Jacobian J (p×m).

    The small dense reference: ``κ = ‖φ(H) J‖₂`` and ``‖(I − Hφ(H)) J‖₂ / ‖J‖₂``.

    >>> H = torch.tensor([[20., 10.], [10., 5.]], dtype=torch.float64)
    >>> J = torch.tensor([[4., 8.], [2., 4.]], dtype=torch.float64)
    >>> [round(v, 12) for v in modulus_from_matrices(H, J)]
    [0.4, 0.0]
    """
    lam, U = torch.linalg.eigh(0.5 * (H + H.T))
    lam_max = float(lam.abs().max())
    phi, null = _filter(lam, lam_max, tau, filter)
    UJ = U.T @ J
    kappa = float(torch.linalg.matrix_norm(phi[:, None] * UJ, ord=2))
    jn = float(torch.linalg.matrix_norm(J, ord=2))
    res = float(torch.linalg.matrix_norm(null[:, None] * UJ, ord=2)) / jn if jn > 0 else 0.0
    return kappa, res
