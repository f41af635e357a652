"""Distances between sets (the paper's Definition 1).

* ``d(w, C) = inf_{c∈C} ‖w − c‖``
* excess ``e(C, D) = sup_{c∈C} d(c, D)`` (not symmetric)
* Pompeiu–Hausdorff ``h(C, D) = max(e(C, D), e(D, C))``

for finite point sets (rows of a tensor) and for :class:`AffineBall` sets
``{point + n : n ∈ N} ∩ B(centre, r)`` (an affine set — e.g. an estimated solution set — cut by
the neighbourhood U).  N is given by an orthonormal basis (dense, small p) or by a projector
``z ↦ P_N z`` (matrix-free, any p).

>>> import torch
>>> C = torch.tensor([[0., 0.], [1., 0.]]); D = torch.tensor([[0., 1.]])
>>> round(excess(C, D), 6), round(excess(D, C), 6), round(hausdorff(C, D), 6)
(1.414214, 1.0, 1.414214)
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["point_to_set", "excess", "hausdorff", "AffineBall"]


class AffineBall:
    """``{point + n : n ∈ N} ∩ B(centre, radius)``.

    Args:
        point: a point of the affine set.
        null: an orthonormal basis of N (p × r tensor, r may be 0), or a callable projector
            ``z ↦ P_N z`` for a matrix-free N (then ``dim`` is unknown and taken as large).
        centre, radius: the ball U (``radius`` may be ``inf``: the whole affine set).
    """

    def __init__(self, point: Tensor, null: Tensor | Callable[[Tensor], Tensor], centre: Tensor,
                 radius: float = float("inf")):
        if isinstance(null, Tensor):
            if null.ndim != 2 or null.shape[0] != point.numel():
                raise ValueError("basis must be p × r with p = len(point)")
            self.basis, self.dim = null, int(null.shape[1])
            self.project_null = lambda z: null @ (null.T @ z)
        else:
            self.basis, self.dim, self.project_null = None, None, null
        self.centre, self.radius = centre, radius
        # Move ``point`` to the foot of the perpendicular from ``centre``: the ball's centre
        # projects there, so the cut is a ball of radius ρ around it inside the affine set.
        self.point = point + self.project_null(centre - point)
        gap = float((self.point - centre).norm())
        if gap > radius * (1 + 1e-9):
            raise ValueError(f"the affine set does not meet the ball (gap {gap:.3g} > radius {radius:.3g})")
        self.inner_radius = max(radius**2 - gap**2, 0.0) ** 0.5 if radius != float("inf") else float("inf")

    def project_affine(self, w: Tensor) -> Tensor:
        """Orthogonal projection onto the (uncut) affine set."""
        return self.point + self.project_null(w - self.point)

    def project(self, w: Tensor) -> Tensor:
        """Nearest point of the cut set to ``w`` (projection onto a ball inside the affine set)."""
        q = self.project_affine(w)
        off = q - self.point
        n = float(off.norm())
        if n > self.inner_radius:
            q = self.point + off * (self.inner_radius / n)
        return q

    def distance(self, w: Tensor) -> float:
        """``d(w, C)``."""
        return float((w - self.project(w)).norm())

    def farthest_from(self, w: Tensor) -> float:
        """``sup_{c∈C} ‖c − w‖`` — the excess of C over the single point {w} (exact)."""
        if self.dim == 0:
            return float((self.point - w).norm())
        if self.inner_radius == float("inf"):
            return float("inf")
        q = self.project_affine(w)
        normal = float((w - q).norm())
        along = float((q - self.point).norm()) + self.inner_radius
        return (normal**2 + along**2) ** 0.5


def _as_rows(C):
    return C if isinstance(C, AffineBall) else torch.atleast_2d(C)


def point_to_set(w: Tensor, C) -> float:
    """``d(w, C)`` for a finite set (rows) or an :class:`AffineBall`."""
    C = _as_rows(C)
    if isinstance(C, AffineBall):
        return C.distance(w)
    return float((C - w).norm(dim=1).min())


def excess(C, D) -> float:
    """``e(C, D) = sup_{c∈C} d(c, D)``.

    Exact when C is finite; when C is an :class:`AffineBall` and D a point; when C is a segment
    (dim N = 1) and D finite (the maximum sits at an end or where the nearest point of D changes);
    and when C is a ball of dimension larger than the number of points of a finite D (matrix-free
    sets included: a small concave maximisation, see :func:`_excess_ball_over_points`).  Otherwise
    (D an AffineBall, or 2 ≤ dim N ≤ |D|) a lower bound from points on C's boundary.
    """
    C, D = _as_rows(C), _as_rows(D)
    if not isinstance(C, AffineBall):
        return max(point_to_set(c, D) for c in C)
    if C.dim == 0:
        return point_to_set(C.point, D)
    if not isinstance(D, AffineBall):
        if D.shape[0] == 1:
            return C.farthest_from(D[0])
        if C.dim == 1 and C.inner_radius < float("inf"):
            return _excess_segment_over_points(C, D)
        if (C.dim is None or C.dim > D.shape[0]) and C.inner_radius < float("inf"):
            return _excess_ball_over_points(C, D)
    return max(point_to_set(c, D) for c in _boundary_samples(C, D))


def _excess_segment_over_points(C: AffineBall, D: Tensor) -> float:
    u, rho = C.basis[:, 0], C.inner_radius
    a = (D - C.point) @ u  # position of each point's foot along the segment
    q = ((D - C.point) ** 2).sum(dim=1)
    ts = [-rho, rho]
    for i in range(D.shape[0]):
        for j in range(i + 1, D.shape[0]):  # ‖c(t) − d_i‖ = ‖c(t) − d_j‖ is linear in t
            den = 2 * float(a[j] - a[i])
            if den != 0.0:
                t = float(q[j] - q[i]) / den
                if -rho <= t <= rho:
                    ts.append(t)
    return max(point_to_set(C.point + t * u, D) for t in ts)


def _excess_ball_over_points(C: AffineBall, D: Tensor) -> float:
    """``sup_{‖n‖≤ρ, n∈N} min_j ‖point + n − d_j‖`` when dim N > |D|.

    With ``g_j = P_N(d_j − point)`` and ``a_j = ‖d_j − point‖²``,
    ``‖point + n − d_j‖² = a_j + ‖n‖² − 2⟨n, g_j⟩``.  A component of n orthogonal to every g_j
    (it exists since dim N > |D|) raises ‖n‖ without changing the inner products, so the optimum
    has ‖n‖ = ρ and the rest is the concave problem ``max_{‖y‖≤ρ} min_j a_j − 2⟨y, g_j⟩`` over the
    span of the g_j, solved by SLSQP in |D| + 1 variables.
    """
    from scipy.optimize import minimize

    rho = C.inner_radius
    diff = D - C.point
    a = (diff**2).sum(dim=1).double().cpu().numpy()
    g = torch.stack([C.project_null(d) for d in diff])
    Q, R = torch.linalg.qr(g.T)  # g_j = Q R[:, j]
    gc = R.T.double().cpu().numpy()  # coordinates of the g_j in the span
    m = gc.shape[1]
    cons = [{"type": "ineq", "fun": lambda z: a - 2 * gc @ z[:m] - z[m]},
            {"type": "ineq", "fun": lambda z: rho**2 - z[:m] @ z[:m]}]
    best = float(a.min())
    for start in [np.zeros(m)] + [-rho * gc[j] / max(np.linalg.norm(gc[j]), 1e-300) for j in range(len(a))]:
        z0 = np.append(start, float((a - 2 * gc @ start).min()))
        res = minimize(lambda z: -z[m], z0, constraints=cons, method="SLSQP",
                       options={"ftol": 1e-14, "maxiter": 500})
        y = res.x[:m] * min(1.0, rho / max(np.linalg.norm(res.x[:m]), 1e-300))
        best = max(best, float((a - 2 * gc @ y).min()))
    return (best + rho**2) ** 0.5


def _boundary_samples(C: AffineBall, D) -> list[Tensor]:
    pts = [C.point]
    rho = C.inner_radius
    if C.basis is None or C.basis.shape[1] == 0 or rho == float("inf"):
        return pts
    for j in range(C.basis.shape[1]):
        pts += [C.point + rho * C.basis[:, j], C.point - rho * C.basis[:, j]]
    targets = [D.point] if isinstance(D, AffineBall) else list(D)
    for t in targets:
        dirn = C.project_null(t - C.point)
        n = float(dirn.norm())
        if n > 0:
            pts.append(C.point - rho * dirn / n)
    return pts


def hausdorff(C, D) -> float:
    """Pompeiu–Hausdorff distance ``max(e(C, D), e(D, C))`` (exact in the cases :func:`excess` is)."""
    return max(excess(C, D), excess(D, C))
