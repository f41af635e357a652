"""The classical influence function (Koh & Liang 2017, eq. 3): ``Δw = −H⁻¹ J Δx``.

It assumes a non-singular Hessian, i.e. an isolated minimiser.  Variants for the singular case:

* ``exact``  — ``torch.linalg.solve`` (dense; fails loudly on a singular H);
* ``damped`` — ``−(H + λI)⁻¹ J Δx`` by CG/MINRES on ``H + λI`` (matrix-free; the usual practice);
* ``pinv``   — ``−H⁺ J Δx`` with ``torch.linalg.pinv`` and a fixed ``rcond`` (dense);
* ``lissa``  — the stochastic Neumann series of Agarwal et al. (2017):
  ``h_{t+1} = b + (1 − λ) h_t − H h_t / s`` with scale ``s`` and damping ``λ`` (matrix-free).

When H is non-singular the set estimate of :mod:`setsens.solution_set` reduces to ``exact``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .operators import DataJacobian, Damped, Hessian, dense_hessian
from .problem import Perturbation, Problem
from .krylov import minres, power_iteration

__all__ = ["influence_shift"]

VARIANTS = ("exact", "damped", "pinv", "lissa")


def influence_shift(
    problem: Problem,
    perturbation: Perturbation,
    variant: str = "damped",
    *,
    damping: float = 1e-3,
    rcond: float = 1e-10,
    scale: str = "exact",
    maxiter: int = 200,
    lissa_scale: float | None = None,
    lissa_steps: int = 500,
) -> Tensor:
    """The influence-function estimate of the weight shift ``Δw`` (a single point, not a set).

    Cost: exact/pinv O(p³) dense; damped ≤ ``maxiter`` H v; LiSSA ``lissa_steps`` H v.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    problem.check_perturbation(perturbation)
    b = DataJacobian(problem, perturbation.indices, scale=scale) @ perturbation.delta
    if variant == "exact":
        return -torch.linalg.solve(dense_hessian(problem), b)
    if variant == "pinv":
        return -torch.linalg.pinv(dense_hessian(problem), rtol=rcond, hermitian=True) @ b
    H = Hessian(problem)
    if variant == "damped":
        return minres(Damped(H, damping), -b, maxiter=maxiter, rtol=1e-10).x.to(b)
    # LiSSA: h ← b + (1 − λ) h − H h / s converges to s (H + sλ)⁻¹ b when ‖H/s‖ < 1.
    if lissa_scale is None:
        start = torch.randn(problem.p, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        lissa_scale = 1.5 * float(power_iteration(H, start.to(H.w), 20).values[0])
    h = b.clone()
    for _ in range(lissa_steps):
        h = b + (1 - damping) * h - H(h) / lissa_scale
    return -h / lissa_scale
