"""Loss landscapes on a 2-D plane through w̄ (Figure 4 of the reference paper).

``L(α, β) = L(xᵖ, w̄ + α d₁ + β d₂)`` on a grid, for the perturbed problem (or any problem).
Two ways to choose the plane:

* ``"estimate"`` (default in ``setsens landscape``): ``d₁ = w_est − w̄`` (so α = 1 is the estimate
  and α = 0 is w̄), ``d₂`` a filter-normalised random direction made orthogonal to ``d₁`` and
  rescaled to ``‖d₁‖``.  The plane contains both marked solutions exactly.
* ``"filter"``: two filter-normalised random directions (Li et al. 2018): for every filter
  (row of a weight tensor) the random direction is rescaled to the filter's norm in w̄; 1-D
  parameters (BatchNorm scales/shifts, biases) get zero, as in Li et al.'s ``ignore='biasbn'``.
  Solutions are marked by their orthogonal projection onto the plane; the distance off the plane
  is returned, since then they generally do not lie on it.

Cost: one forward pass over the data per grid point.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .problem import Perturbation, Problem
from .progress import ProgressFn, report

__all__ = ["Landscape", "filter_normalized_direction", "plane_directions", "landscape", "plot_landscape"]


def filter_normalized_direction(problem: Problem, generator: torch.Generator, w: Tensor | None = None,
                                ignore_1d: bool = True) -> Tensor:
    """A Gaussian direction rescaled filter by filter to the norms of ``w`` (default w̄)."""
    w = problem.params if w is None else w
    d = torch.randn(problem.p, generator=generator, dtype=torch.float64).to(w)
    out = torch.zeros_like(w)
    for (_, sl), shape in zip(problem.blocks(), problem.shapes):
        wd, dd = w[sl].view(shape), d[sl].view(shape)
        if len(shape) <= 1:
            out[sl] = 0.0 if ignore_1d else (dd * wd.norm() / dd.norm().clamp_min(1e-30)).reshape(-1)
            continue
        wf, df = wd.reshape(shape[0], -1), dd.reshape(shape[0], -1)
        scale = wf.norm(dim=1, keepdim=True) / df.norm(dim=1, keepdim=True).clamp_min(1e-30)
        out[sl] = (df * scale).reshape(-1)
    return out


def plane_directions(problem: Problem, estimate: Tensor | None, generator: torch.Generator,
                     kind: str = "estimate", center: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(d₁, d₂)`` for the plane ``kind`` (``"estimate"`` or ``"filter"``, see the module doc)."""
    center = problem.params if center is None else center
    if kind == "filter":
        return (filter_normalized_direction(problem, generator, center),
                filter_normalized_direction(problem, generator, center))
    if kind != "estimate":
        raise ValueError(f"plane kind must be 'estimate' or 'filter', got {kind!r}")
    if estimate is None:
        raise ValueError("the 'estimate' plane needs an estimated solution")
    d1 = (estimate - center).to(center)
    n1 = d1.norm()
    if float(n1) == 0.0:
        raise ValueError("the estimate equals w̄: the plane is undefined")
    d2 = filter_normalized_direction(problem, generator, center)
    d2 = d2 - (d2 @ d1) / (n1**2) * d1
    d2 = d2 * (n1 / d2.norm())
    return d1, d2


@dataclass
class Landscape:
    """Loss on the grid ``alphas × betas`` (``loss[i, j]`` at ``α = alphas[j], β = betas[i]``)."""

    alphas: np.ndarray
    betas: np.ndarray
    loss: np.ndarray
    kind: str
    marks: dict = field(default_factory=dict)  # name -> (α, β, distance off the plane, loss)

    def to_dict(self) -> dict:
        return {"alphas": self.alphas, "betas": self.betas, "loss": self.loss, "kind": self.kind,
                "marks": {k: dict(zip(("alpha", "beta", "off_plane", "loss"), v)) for k, v in self.marks.items()}}


def landscape(problem: Problem, d1: Tensor, d2: Tensor, alphas, betas, *, center: Tensor | None = None,
              perturbation: Perturbation | None = None, marks: dict[str, Tensor] | None = None,
              kind: str = "custom", progress: ProgressFn | None = None) -> Landscape:
    """``L(x (+Δx), center + α d₁ + β d₂)`` on the grid; ``marks`` (name → weights) are projected.

    ``progress``: ``Progress("landscape", i, grid points)`` after each grid point.
    """
    center = problem.params if center is None else center
    alphas, betas = np.asarray(alphas, dtype=float), np.asarray(betas, dtype=float)
    loss = np.empty((len(betas), len(alphas)))
    for i, b in enumerate(betas):
        for j, a in enumerate(alphas):
            loss[i, j] = problem.risk(center + float(a) * d1 + float(b) * d2, perturbation)
            report(progress, "landscape", i * len(alphas) + j + 1, loss.size)
    out = {}
    D = torch.stack([d1, d2], 1).double()
    for name, w in (marks or {}).items():
        r = (w - center).double()
        c = torch.linalg.lstsq(D, r[:, None]).solution[:, 0]
        off = float((r - D @ c).norm())
        out[name] = (float(c[0]), float(c[1]), off, problem.risk(w, perturbation))
    return Landscape(alphas, betas, loss, kind, out)


def plot_landscape(ls: Landscape, title: str = "", log: bool = True):
    """A contour figure and a 3-D surface figure (matplotlib), solutions marked; returns both."""
    import matplotlib.pyplot as plt

    A, B = np.meshgrid(ls.alphas, ls.betas)
    Z = np.log10(np.maximum(ls.loss, 1e-12)) if log else ls.loss
    zlabel = "log10 loss" if log else "loss"
    colors = {"original": "black"}
    fig_c, ax = plt.subplots(figsize=(5.5, 4.5))
    cs = ax.contourf(A, B, Z, levels=30, cmap="viridis")
    ax.contour(A, B, Z, levels=15, colors="white", linewidths=0.4, alpha=0.6)
    fig_c.colorbar(cs, ax=ax, label=zlabel)
    for name, (a, b, off, _) in ls.marks.items():
        ax.plot(a, b, "o", color=colors.get(name, "red"), markersize=6, markeredgecolor="white",
                label=name if name in ("original",) or name.endswith("0") or "seed" not in name else None)
    ax.set_xlabel("α (direction 1)")
    ax.set_ylabel("β (direction 2)")
    ax.set_title(title or f"loss of the perturbed problem ({ls.kind} plane)")
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="upper right", fontsize=8)
    fig_s = plt.figure(figsize=(6, 4.8))
    ax3 = fig_s.add_subplot(projection="3d")
    ax3.plot_surface(A, B, Z, cmap="viridis", alpha=0.85, linewidth=0)
    for name, (a, b, off, l) in ls.marks.items():
        z = np.log10(max(l, 1e-12)) if log else l
        ax3.scatter([a], [b], [z], color=colors.get(name, "red"), s=30, depthshade=False)
    ax3.set_xlabel("α")
    ax3.set_ylabel("β")
    ax3.set_zlabel(zlabel)
    ax3.set_title(title or f"loss of the perturbed problem ({ls.kind} plane)")
    return fig_c, fig_s
