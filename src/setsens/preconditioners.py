"""Preconditioners for the Gauss–Newton system in output space: ``M ≈ (G Gᵀ)⁻¹``.

The Gauss–Newton estimate is the minimum-norm solution of ``G v = −r``.  Preconditioning CGLS on
the right would move its iterates out of range(Gᵀ) and lose the minimum norm; preconditioning CG on
``G Gᵀ u = −r`` (``v = Gᵀ u``, :func:`setsens.krylov.cgne`) keeps it, so the preconditioners here
approximate the inverse of the (n·K) × (n·K) Gram matrix ``G Gᵀ`` (the empirical NTK) and act on
(n, K) output tensors.  Both are built from products with G only and are cheap to apply:

* :func:`gram_diagonal` — Jacobi: ``diag(G Gᵀ) = E[(G z)²]`` over Rademacher z (Hutchinson),
  ``samples`` JVP passes;
* :func:`gram_nystrom` — a randomised rank-``rank`` Nyström approximation ``U Λ Uᵀ`` of ``G Gᵀ``
  (Frangella, Tropp & Udell 2023), ``rank`` JVP + VJP passes; ``M = λ_min U Λ⁻¹ Uᵀ + (I − U Uᵀ)``
  maps the top of the spectrum onto its ``rank``-th value.

Which one pays for itself is measured in ``benchmarks/preconditioner.py``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .problem import center_classes

__all__ = ["PRECONDITIONERS", "gram_diagonal", "gram_nystrom", "gram_preconditioner"]

#: ``SolveOptions.preconditioner`` values: none (CGLS), or CG on G Gᵀ with one of these.
PRECONDITIONERS = ("none", "diagonal", "nystrom")


def _rademacher(p: int, generator: torch.Generator, like: Tensor) -> Tensor:
    return (torch.randint(0, 2, (p,), generator=generator, dtype=torch.float64) * 2 - 1).to(like)


def gram_diagonal(G, samples: int = 20, generator: torch.Generator | None = None,
                  floor: float = 1e-3) -> Callable[[Tensor], Tensor]:
    """Jacobi preconditioner ``r ↦ r / d`` with ``d ≈ diag(G Gᵀ)`` from ``samples`` JVP passes.

    Entries below ``floor`` × their mean are raised to it (a row of the Gram matrix that the
    estimate puts near zero must not blow up).  With centred outputs the result is centred.
    """
    generator = generator or torch.Generator().manual_seed(0)
    w = G.w
    d = sum((G @ _rademacher(w.numel(), generator, w)).double() ** 2 for _ in range(samples)) / samples
    d = d.clamp_min(floor * float(d.mean()))
    return lambda r: _center(G, r.to(d) / d)


def gram_nystrom(G, rank: int = 20, generator: torch.Generator | None = None) -> Callable[[Tensor], Tensor]:
    """Nyström preconditioner of ``G Gᵀ`` from ``rank`` products ``G Gᵀ ω`` (one JVP + one VJP each).

    ``G Gᵀ ≈ U Λ Uᵀ`` (stable Nyström with a shift at rounding level); ``M r = λ_k U Λ⁻¹ Uᵀ r +
    (r − U Uᵀ r)`` with λ_k the smallest positive kept value.  Needs every row in one process.
    """
    if len(G.problem.rows) != G.problem.n:
        raise ValueError("the Nyström preconditioner needs all the data in one process (use 'diagonal')")
    generator = generator or torch.Generator().manual_seed(0)
    x, _ = next(G.problem.batches())
    with torch.no_grad():
        shape = (G.problem.n, G.problem.outputs(G.w, x[:1]).reshape(1, -1).shape[1])
    device = G.w.device
    omega = torch.randn(rank, *shape, generator=generator, dtype=torch.float64)
    omega = torch.stack([_center(G, o) for o in omega]).reshape(rank, -1).T.to(device)
    omega = torch.linalg.qr(omega).Q  # (n·K) × rank, orthonormal
    Y = torch.stack([(G @ (G.T @ omega[:, j].reshape(shape))).double().reshape(-1)
                     for j in range(omega.shape[1])], 1)
    nu = Y.shape[0] ** 0.5 * torch.finfo(torch.float64).eps * float(Y.norm())
    Y = Y + nu * omega
    C = torch.linalg.cholesky(0.5 * (omega.T @ Y + Y.T @ omega))
    B = torch.linalg.solve_triangular(C, Y.T, upper=False).T  # Y C⁻ᵀ
    U, s, _ = torch.linalg.svd(B, full_matrices=False)
    lam = (s ** 2 - nu).clamp_min(0.0)
    keep = lam > 1e-12 * float(lam.max())
    U, lam = U[:, keep], lam[keep]
    scale = float(lam.min()) / lam - 1.0

    def apply(r: Tensor) -> Tensor:
        flat = r.to(U).reshape(-1)
        return _center(G, (flat + U @ (scale * (U.T @ flat))).reshape(shape))

    return apply


def gram_preconditioner(kind: str, G, sketch: int, seed: int = 0) -> Callable[[Tensor], Tensor] | None:
    """The preconditioner named by ``kind`` (:data:`PRECONDITIONERS`), built with ``sketch`` samples/rank."""
    if kind not in PRECONDITIONERS:
        raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {kind!r}")
    generator = torch.Generator().manual_seed(seed)
    if kind == "diagonal":
        return gram_diagonal(G, sketch, generator)
    if kind == "nystrom":
        return gram_nystrom(G, sketch, generator)
    return None


def _center(G, u: Tensor) -> Tensor:
    return center_classes(u) if G.centered else u
