"""The Gram matrix ``GGᵀ`` of the training outputs' Jacobian G at w̄, and products with G and Gᵀ for many
vectors at once, without holding G.

G is n·K × p (centred over the classes for a loss that ignores a common shift).  For ResNet-56 on 1000
CIFAR images it has 8.5e9 entries (34 GB in float32); its Gram matrix has 1e8 (0.8 GB in float64).
:func:`gram_matrix` holds one *panel* of P points (P·K·p entries) and one *block* of b points at a time:
the panel's rows against themselves and against every later block, so a point's Jacobian is computed
1 + (points before it)/P times — n + n²/(2P) per-sample Jacobians in all — and the products cost
n²K²p/2 multiply–adds (the Gram's own cost), in float64 (the Jacobians stay in the problem's dtype and are
converted a chunk of parameters at a time), so the result equals ``G @ G.T`` of
:func:`~setsens.operators.dense_output_jacobian` in float64 to rounding.  Resumable per panel.

:func:`jacobian_products` applies G and Gᵀ to m vectors in one pass (per-sample Jacobians in blocks, one
matrix product each): m products for the price of one Jacobian pass (n·K reverse passes of one sample),
where m JVP/VJP passes cost about m gradients — cheaper from m ≈ K on.

Memory: the panel, one block, the Gram matrix and (for its eigendecomposition) twice that again; never
n·K·p.  :func:`plan` sizes the panel from a byte budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

from .atomic import atomic_torch_save
from .operators import cache_budget, per_sample_jacobian
from .problem import Problem, center_classes

__all__ = ["GramPlan", "plan", "jacobian_chunks", "float64_product", "gram_matrix", "jacobian_products"]

#: points whose Jacobians one vmapped reverse pass computes at once (its memory: chunk·K·p entries and
#: K copies of one sample's activations per point)
CHUNK = 16
_PARAMETER_CHUNK = 1 << 14  # columns converted to float64 at a time


@dataclass(frozen=True)
class GramPlan:
    """How the Gram factor is built: ``path`` ``"dense"`` (G held: n·K·p entries) or ``"streamed"``
    (:func:`gram_matrix`, a panel of ``panel`` points); ``bytes`` what the chosen path holds at its peak
    (estimated), ``budget`` the bytes it was allowed."""

    path: str
    panel: int
    bytes: int
    budget: int


def plan(n: int, k: int, p: int, itemsize: int, memory: str | int = "auto", path: str = "auto") -> GramPlan:
    """The path and panel size for an (n·K) × p Jacobian of ``itemsize``-byte entries within ``memory``
    bytes (``"auto"``: half the memory available now).  ``path="auto"`` holds G when G and its Gram fit
    in a quarter of the budget (the exact reference, fastest for small problems), streams otherwise.
    Raises ``ValueError`` when even the Gram matrix and one panel of a few points do not fit."""
    if path not in ("auto", "dense", "streamed"):
        raise ValueError(f"path must be 'auto', 'dense' or 'streamed', got {path!r}")
    budget = 2 * cache_budget("auto", torch.device("cpu")) if memory == "auto" else cache_budget(memory, None)
    rows, per_point = n * k, k * p * itemsize
    gram = 3 * rows * rows * 8  # the matrix, its eigenvectors, the solver's workspace
    dense = rows * p * itemsize + gram
    if path == "dense" or (path == "auto" and dense <= budget // 4):
        return GramPlan("dense", n, dense, budget)
    block = min(CHUNK, n)
    panel = min(n, (budget - gram) // per_point - 2 * block)
    if panel < block:
        raise ValueError(f"the Gram matrix of {n} points × {k} outputs ({gram / 1e9:.1f} GB with its "
                         f"eigendecomposition) and one panel of Jacobians do not fit in {budget / 1e9:.1f} GB: "
                         "use fewer training points or allow more memory")
    return GramPlan("streamed", int(panel), gram + (panel + 2 * block) * per_point, budget)


def jacobian_chunks(problem: Problem, centered: bool, start: int = 0, stop: int | None = None,
                    chunk: int = CHUNK) -> Iterator[tuple[int, Tensor]]:
    """``(first point, J)`` for the points ``start … stop − 1`` in order, ``chunk`` at a time: J the
    (points, K, p) per-sample output Jacobian at w̄ in the problem's dtype, centred over the classes if
    ``centered``.  Cost: points·K reverse passes of one sample."""
    stop = problem.n if stop is None else stop
    jac = per_sample_jacobian(problem)
    offset = 0
    for x, _ in problem.batches():
        lo, hi = max(start - offset, 0), min(stop - offset, x.shape[0])
        for s in range(lo, hi, chunk):
            J = jac(problem.params, x[s:min(s + chunk, hi)])
            yield offset + s, center_classes(J, 1) if centered else J
        offset += x.shape[0]
        if offset >= stop:
            return


def float64_product(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b.T`` in float64, a chunk of columns converted at a time (a float32 product would put rounding of
    ε₃₂·λ_max into every entry: the Gram's small eigenvalues, those κ depends on, would be lost)."""
    if a.dtype == torch.float64:
        return a @ b.T
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for j in range(0, a.shape[1], _PARAMETER_CHUNK):
        out += a[:, j:j + _PARAMETER_CHUNK].double() @ b[:, j:j + _PARAMETER_CHUNK].double().T
    return out


def gram_matrix(problem: Problem, centered: bool, panel: int, progress: Callable[[int, int], None] | None = None,
                checkpoint: str | Path | None = None) -> Tensor:
    """``GGᵀ`` ((n·K) × (n·K), float64) from panels of ``panel`` points, G never held (module doc for the
    cost).  ``progress(points done, n)`` after each panel; ``checkpoint``: the finished panels are saved
    there atomically (keyed by the problem's size and w̄) and a rerun resumes after them."""
    n, p = problem.n, problem.p
    k = next(jacobian_chunks(problem, centered, 0, 1))[1].shape[1]
    key = (n, p, k, centered, int(panel), float(problem.params.double().norm()),
           float(problem.params.double().sum()))
    M, done = torch.zeros(n * k, n * k, dtype=torch.float64, device=problem.params.device), 0
    if checkpoint is not None and Path(checkpoint).is_file():
        state = torch.load(checkpoint, weights_only=True)
        if tuple(state["key"]) == key:
            M, done = state["M"].to(M.device), int(state["done"])
    for s in range(done, n, panel):
        e = min(s + panel, n)
        JP = torch.cat([J.reshape(-1, p) for _, J in jacobian_chunks(problem, centered, s, e)])
        M[s * k:e * k, s * k:e * k] = float64_product(JP, JP)
        for t, JB in jacobian_chunks(problem, centered, e, n):
            block = float64_product(JP, JB.reshape(-1, p))
            M[s * k:e * k, t * k:t * k + block.shape[1]] = block
            M[t * k:t * k + block.shape[1], s * k:e * k] = block.T
        del JP
        if checkpoint is not None:
            atomic_torch_save({"key": key, "M": M, "done": e}, checkpoint)
        if progress is not None:
            progress(e, n)
    return M


def jacobian_products(problem: Problem, centered: bool, right: Tensor | None = None, left: Tensor | None = None
                      ) -> tuple[Tensor | None, Tensor | None]:
    """``(right @ Gᵀ, left @ G)`` in one pass over the points: ``right`` (m, p) weight-space rows give
    (m, n·K) output rows (G v for each), ``left`` (m, n·K) output rows give (m, p) weight-space rows
    (Gᵀ u for each; ``left`` is centred first when G is).  Either may be None.  Cost: one per-sample
    Jacobian pass (n·K reverse passes of one sample) and 2·m·n·K·p multiply–adds."""
    if left is not None and centered:
        left = center_classes(left.reshape(left.shape[0], problem.n, -1)).reshape(left.shape[0], -1)
    outs, back = [], None
    for s, J in jacobian_chunks(problem, centered):
        J = J.reshape(-1, problem.p)
        if right is not None:
            outs.append(right.to(J) @ J.T)
        if left is not None:
            k = left.shape[1] // problem.n
            part = left[:, s * k:s * k + J.shape[0]].to(J) @ J
            back = part if back is None else back + part
    return (torch.cat(outs, 1) if right is not None else None), back
