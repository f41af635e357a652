"""Distances between sets (the paper's Definition 1).

* ``d(w, C) = inf_{c∈C} ‖w − c‖``
* excess ``e(C, D) = sup_{c∈C} d(c, D)`` (not symmetric)
* Pompeiu–Hausdorff ``h(C, D) = max(e(C, D), e(D, C))``

for finite point sets (rows of a tensor) and for :class:`AffineBall` sets
``{c + N z} ∩ B(centre, r)`` (an affine set — e.g. an estimated solution set — cut by the
neighbourhood U).

>>> import torch
>>> C = torch.tensor([[0., 0.], [1., 0.]]); D = torch.tensor([[0., 1.]])
>>> round(excess(C, D), 6), round(excess(D, C), 6), round(hausdorff(C, D), 6)
(1.414214, 1.0, 1.414214)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["point_to_set", "excess", "hausdorff", "AffineBall"]


@dataclass
class AffineBall:
    """``{point + basis @ z : z ∈ R^r} ∩ B(centre, radius)``; ``basis`` has orthonormal columns.

    ``basis`` may have zero columns (a single point) and ``radius`` may be ``inf`` (the whole
    affine set).
    """

    point: Tensor
    basis: Tensor
    centre: Tensor
    radius: float = float("inf")

    def __post_init__(self):
        if self.basis.ndim != 2 or self.basis.shape[0] != self.point.numel():
            raise ValueError("basis must be p × r with p = len(point)")
        # Move ``point`` to the foot of the perpendicular from ``centre``: the ball's centre
        # projects there, so the cut is a ball of radius ρ around it inside the affine set.
        self.point = self.project_affine(self.centre)
        gap = float((self.point - self.centre).norm())
        if gap > self.radius:
            raise ValueError(f"the affine set does not meet the ball (gap {gap:.3g} > radius {self.radius:.3g})")
        self.inner_radius = (self.radius**2 - gap**2) ** 0.5 if self.radius != float("inf") else float("inf")

    def project_affine(self, w: Tensor) -> Tensor:
        """Orthogonal projection onto the (uncut) affine set."""
        return self.point + self.basis @ (self.basis.T @ (w - self.point))

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
        """``sup_{c∈C} ‖c − w‖`` — the excess of C over the single point {w}."""
        if self.basis.shape[1] == 0:
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

    Finite C: exact.  C an :class:`AffineBall` with D a point: exact (the farthest point of the
    ball).  C an AffineBall with D finite or affine: a lower bound from the vertices of C along
    its basis directions and towards each point of D (exact when C is a point or a segment).
    """
    C, D = _as_rows(C), _as_rows(D)
    if not isinstance(C, AffineBall):
        return max(point_to_set(c, D) for c in C)
    if not isinstance(D, AffineBall) and D.shape[0] == 1:
        return C.farthest_from(D[0])
    return max(point_to_set(c, D) for c in _boundary_samples(C, D))


def _boundary_samples(C: AffineBall, D) -> list[Tensor]:
    pts = [C.point]
    rho = C.inner_radius
    if C.basis.shape[1] == 0 or rho == float("inf"):
        return pts
    for j in range(C.basis.shape[1]):
        pts += [C.point + rho * C.basis[:, j], C.point - rho * C.basis[:, j]]
    targets = [D.point] if isinstance(D, AffineBall) else list(D)
    for t in targets:
        dirn = C.basis @ (C.basis.T @ (t - C.point))
        n = float(dirn.norm())
        if n > 0:
            pts.append(C.point - rho * dirn / n)
    return pts


def hausdorff(C, D) -> float:
    """Pompeiu–Hausdorff distance ``max(e(C, D), e(D, C))``."""
    return max(excess(C, D), excess(D, C))
