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

The pseudo-inverse ``(GGᵀ)⁺`` the audit needs: :class:`EigenInverse` (exact, from the Gram matrix, held or
streamed), or :class:`NystromInverse` (approximate, linear in n: a rank-r sketch plus the exact per-point
diagonal blocks, for when the (n·K)² Gram matrix cannot be held; its error depends on the network), made exact
on the blocks of a few points by :func:`gram_solve` (block CG preconditioned with the sketch, two Jacobian passes
per iteration).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
from torch import Tensor

from .atomic import atomic_torch_save
from .operators import cache_budget, per_sample_jacobian
from .problem import Problem, center_classes
from .progress import ProgressFn, report

__all__ = ["GramPlan", "plan", "resumable_plan", "output_width", "jacobian_chunks", "float64_product", "gram_matrix",
           "jacobian_products", "center_gram", "EigenInverse", "NystromInverse", "nystrom_inverse", "gram_solve",
           "block_pcg", "BlockSolve", "point_blocks", "relative_rise", "block_error"]

#: points whose Jacobians one vmapped reverse pass computes at once (its memory: chunk·K·p entries and
#: K copies of one sample's activations per point)
CHUNK = 16
_PARAMETER_CHUNK = 1 << 14  # columns converted to float64 at a time
#: with the Nyström path, :func:`setsens.audit.scan` makes exact the blocks of the ``REFINE_POINTS`` points the sketch
#: ranks most sensitive and ``REFINE_SAMPLE`` drawn at random, then, in up to ``REFINE_ROUNDS`` rounds in all, those
#: that could still belong to the top ``REFINE_TOP`` — solved until :func:`block_error`'s estimate of the relative
#: error left in any of their κ is at most ``REFINE_TOL`` (or the residual below ``SOLVED``).
REFINE_POINTS, REFINE_SAMPLE, REFINE_TOP, REFINE_ROUNDS, REFINE_TOL = 100, 10, 20, 3, 0.01
#: a relative residual at which a refinement counts as solved whatever its error estimate says (its κ error is then
#: about c × SOLVED², c measured 0.01–0.5 from ResNet-56 to a small linear model)
SOLVED = 1e-10


@dataclass(frozen=True)
class GramPlan:
    """How the Gram factor is built: ``path`` ``"dense"`` (G held: n·K·p entries), ``"streamed"``
    (:func:`gram_matrix`, a panel of ``panel`` points) or ``"nystrom"`` (:func:`nystrom_inverse` of rank
    ``rank``: approximate, for when the (n·K)² Gram matrix does not fit); ``bytes`` what the chosen path holds
    at its peak (estimated), ``budget`` the bytes it was allowed."""

    path: str
    panel: int
    bytes: int
    budget: int
    rank: int = 0


PATHS = ("auto", "dense", "streamed", "nystrom")


def plan(n: int, k: int, p: int, itemsize: int, memory: str | int = "auto", path: str = "auto",
         rank: int = 1000) -> GramPlan:
    """The path for an (n·K) × p Jacobian of ``itemsize``-byte entries within ``memory`` bytes (``"auto"``: half
    the memory available now).  ``path="auto"`` holds G when G and its Gram fit in a quarter of the budget (the
    exact reference, fastest for small problems), streams the exact Gram when it fits with a panel, and takes the
    Nyström approximation of rank ``rank`` (fewer if memory asks; memory linear in n) only when it does not (its
    error depends on the network, see :class:`NystromInverse`; :func:`setsens.audit.scan` makes the top points
    exact).  What the budget leaves beside the Nyström path's estimate holds the refinements' recycled directions
    (:attr:`setsens.audit.GramFactor.recycled_directions`).  Raises ``ValueError`` when the path cannot fit."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
    budget = 2 * cache_budget("auto", torch.device("cpu")) if memory == "auto" else cache_budget(memory, None)
    rows, per_point, block = n * k, k * p * itemsize, min(CHUNK, n)
    gram = 3 * rows * rows * 8  # the matrix, its eigenvectors, the solver's workspace
    dense = rows * p * itemsize + gram
    if path == "dense" or (path == "auto" and dense <= budget // 4):
        return GramPlan("dense", n, dense, budget)
    # 60 % of what the Gram matrix leaves: a chunk's vmapped reverse passes (K copies of its activations), its
    # centred copy and the float64 columns of the products come on top (measured on ResNet-56: 2–3 GB)
    panel = min(n, int(0.6 * (budget - gram)) // per_point - 2 * block)
    if path == "streamed" or (path == "auto" and panel >= block):
        if panel < block:
            raise ValueError(f"the Gram matrix of {n} points × {k} outputs ({gram / 1e9:.1f} GB with its "
                             f"eigendecomposition) and one panel of Jacobians do not fit in {budget / 1e9:.1f} GB: "
                             "use fewer training points, allow more memory, or path='nystrom' (approximate)")
        return GramPlan("streamed", int(panel), gram + int((panel + 2 * block) * per_point / 0.6), budget)
    per_rank = 2 * p * itemsize + 4 * rows * 8  # the sketch in weight space (and its float64 chunk), in outputs
    # the first round's CG: Gᵀ of its columns (one product held at a time) and six copies of them in outputs
    columns = min(REFINE_POINTS + REFINE_SAMPLE, n) * k
    fixed = 2 * block * per_point + rows * k * 8 * 3 + columns * (p * itemsize + 6 * rows * 8)
    rank = min(rank, rows // 2, max(0, (budget - fixed) // per_rank))
    if rank < 1:
        raise ValueError(f"not even a rank-1 Nyström sketch of {n} points × {k} outputs fits in "
                         f"{budget / 1e9:.1f} GB")
    return GramPlan("nystrom", block, fixed + rank * per_rank, budget, int(rank))


def output_width(problem: Problem) -> int:
    """K: the number of outputs of one training point (one forward pass of one point)."""
    with torch.no_grad():
        return problem.outputs(problem.params, problem.points([0])[0]).numel()


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


class Resume:
    """A long computation's state, saved atomically at ``path`` (None: not saved) under ``key`` — the problem's size,
    w̄ and data (:func:`problem_key`) and the computation's settings, built by ``key()`` only where there is a path;
    a rerun with the same key picks it up."""

    def __init__(self, path: str | Path | None, key: Callable[[], tuple]):
        self.path = None if path is None else Path(path)
        self.key = None if self.path is None else key()

    def load(self) -> dict:
        """The saved state (without its key), or {} when there is none for this key."""
        if self.path is None or not self.path.is_file():
            return {}
        state = torch.load(self.path, weights_only=True)
        return {k: v for k, v in state.items() if k != "key"} if tuple(state["key"]) == self.key else {}

    def save(self, **state) -> None:
        if self.path is not None:
            atomic_torch_save({"key": self.key, **state}, self.path)

    def saved_key(self) -> tuple | None:
        """The key of the state saved at ``path`` (None when there is none), read without loading the state."""
        if self.path is None or not self.path.is_file():
            return None
        return tuple(torch.load(self.path, weights_only=True, mmap=True)["key"])


def _bytes(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def fingerprint(t: Tensor) -> str:
    """A hash of ``t``'s bytes: equal for equal tensors whatever the thread count (a float reduction such as a norm
    is not: its rounding follows how the threads split it)."""
    return hashlib.sha256(_bytes(t)).hexdigest()


def problem_key(problem: Problem) -> tuple:
    """What identifies a problem's Jacobian: its size, a fingerprint of w̄ and one of the data it holds (their bytes
    in order, whatever the batches: a rerun on other data of the same size must not resume).  Cost: a pass over the
    data without the model."""
    inputs, targets = hashlib.sha256(), hashlib.sha256()
    for x, y in problem.batches():
        inputs.update(_bytes(x))
        targets.update(_bytes(y))
    return problem.n, problem.p, fingerprint(problem.params), inputs.hexdigest() + targets.hexdigest()


def _gram_key(problem: Problem, k: int, centered: bool, panel: int) -> tuple:
    return problem_key(problem) + ("gram", k, centered, panel)


def _sketch_key(problem: Problem, k: int, centered: bool, rank: int, power: int, seed: int) -> tuple:
    return problem_key(problem) + ("sketch", k, centered, rank, power, seed)


def resumable_plan(planned: GramPlan, problem: Problem, checkpoint: str | Path | None, k: int, centered: bool,
                   rank: int, power: int, seed: int) -> GramPlan:
    """``planned`` with the panel or the rank of the computation saved at ``checkpoint``, where that one can go on:
    under ``memory="auto"`` the plan follows the memory free now, so a rerun would otherwise miss its own checkpoint
    (its key holds the panel or the rank) and start again.  A saved panel is taken when it is no larger than the
    planned one, a saved sketch's rank when it is no larger than ``rank``, the rank asked for."""
    saved = Resume(checkpoint, tuple).saved_key()
    if not saved:
        return planned
    if planned.path == "streamed" and saved == _gram_key(problem, k, centered, saved[-1]):
        return replace(planned, panel=int(saved[-1])) if saved[-1] <= planned.panel else planned
    if planned.path == "nystrom" and saved == _sketch_key(problem, k, centered, saved[-3], power, seed):
        return replace(planned, rank=int(saved[-3])) if saved[-3] <= rank else planned
    return planned


def gram_matrix(problem: Problem, centered: bool, panel: int, progress: ProgressFn | None = None,
                checkpoint: str | Path | None = None) -> Tensor:
    """``GGᵀ`` ((n·K) × (n·K), float64) from panels of ``panel`` points, G never held (module doc for the
    cost).  ``progress``: stage ``"gram"``, points done of n, after each panel.  ``checkpoint``: the finished
    panels are saved there atomically (keyed by the problem's size, w̄ and data) and a rerun resumes after them."""
    n, p = problem.n, problem.p
    k = output_width(problem)
    resume = Resume(checkpoint, lambda: _gram_key(problem, k, centered, int(panel)))
    state = resume.load()
    M = torch.zeros(n * k, n * k, dtype=torch.float64, device=problem.params.device)
    M, done = (state["M"].to(M.device), int(state["done"])) if state else (M, 0)
    for s in range(done, n, panel):
        e = min(s + panel, n)
        JP = torch.empty((e - s) * k, p, dtype=problem.dtype, device=M.device)  # filled in place: one copy
        for t, J in jacobian_chunks(problem, centered, s, e):
            JP[(t - s) * k:(t - s) * k + J.shape[0] * k] = J.reshape(-1, p)
        M[s * k:e * k, s * k:e * k] = float64_product(JP, JP)
        for t, JB in jacobian_chunks(problem, centered, e, n):
            block = float64_product(JP, JB.reshape(-1, p))
            M[s * k:e * k, t * k:t * k + block.shape[1]] = block
            M[t * k:t * k + block.shape[1], s * k:e * k] = block.T
        del JP
        resume.save(M=M, done=e)
        report(progress, "gram", e, n)
    return M


def jacobian_products(problem: Problem, centered: bool, right: Tensor | None = None, left: Tensor | None = None,
                      diagonal: bool = False) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(right @ Gᵀ, left @ G, blocks)`` in one pass over the points: ``right`` (m, p) weight-space rows give
    (m, n·K) output rows (G v for each), ``left`` (m, n·K) output rows give (m, p) weight-space rows
    (Gᵀ u for each; ``left`` is centred first when G is), ``diagonal`` the (n, K, K) blocks ``G_k G_kᵀ`` of
    GGᵀ (float64).  Unasked ones are None.  Cost: one per-sample Jacobian pass (n·K reverse passes of one
    sample) and 2·m·n·K·p multiply–adds."""
    if left is not None and centered:
        left = center_classes(left.reshape(left.shape[0], problem.n, -1)).reshape(left.shape[0], -1)
    outs, back, blocks = [], None, []
    for s, J in jacobian_chunks(problem, centered):
        if diagonal:
            Jd = J.double()
            blocks.append(Jd @ Jd.transpose(1, 2))
        k, J = J.shape[1], J.reshape(-1, problem.p)
        if right is not None:
            outs.append(right.to(J) @ J.T)
        if left is not None:  # accumulated in place: a new (m, p) sum per chunk costs more than the product
            back = J.new_zeros(left.shape[0], problem.p) if back is None else back
            back.addmm_(left[:, s * k:s * k + J.shape[0]].to(J), J)
    return (torch.cat(outs, 1) if right is not None else None), back, (torch.cat(blocks) if diagonal else None)


def center_gram(M: Tensor, n: int) -> Tensor:
    """``P M P`` for a Gram matrix of n points' outputs (N = n·K square), P the class centring of every point:
    the centring's null space exact in float64, whatever G's dtype."""
    N = M.shape[0]
    once = center_classes(M.reshape(N, n, -1)).reshape(N, N)
    return center_classes(once.T.reshape(N, n, -1)).reshape(N, N)


def _pinv_psd(M: Tensor, rcond: float, scale: float | None = None) -> tuple[Tensor, Tensor, int]:
    """``(Q, 1/λ or 0, rank)`` of a symmetric PSD matrix (or a batch), eigenvalues below ``rcond·scale`` dropped
    (``scale``: by default each matrix's λ_max)."""
    lam, Q = torch.linalg.eigh(M)
    keep = lam > rcond * (lam.amax(-1, keepdim=True) if scale is None else scale)
    inverse = torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), torch.zeros_like(lam))
    return Q, inverse, int(keep.sum())


class EigenInverse:
    """``(GGᵀ)⁺`` exactly, from ``GGᵀ = QΛQᵀ`` (eigenvalues below ``rcond·λ_max`` dropped)."""

    approximate = False

    def __init__(self, gram: Tensor, rcond: float):
        self.Q, self.inverse, self.rank = _pinv_psd(gram, rcond)
        self.values = torch.where(self.inverse > 0, self.inverse.reciprocal(), 0.0)  # Λ, dropped ones 0

    def block(self, rows: Tensor) -> Tensor:
        """The block of ``(GGᵀ)⁺`` on ``rows`` (indices into the n·K outputs)."""
        Qr = self.Q[rows]
        return (Qr * self.inverse) @ Qr.T

    def apply(self, U: Tensor) -> Tensor:
        """``U (GGᵀ)⁺`` for output rows U (m, n·K)."""
        return ((U.to(self.Q) @ self.Q) * self.inverse) @ self.Q.T


class NystromInverse:
    """``(GGᵀ)⁺ ≈ (E + LLᵀ)⁺``: ``LLᵀ`` the randomised Nyström approximation of GGᵀ of rank r
    (``M Ω (ΩᵀMΩ)⁺ ΩᵀM``, Ω Gaussian n·K × r, power iterations sharpening its range), ``E`` the exact
    per-point K × K diagonal blocks of what it leaves (``G_kG_kᵀ − L_kL_kᵀ``), inverted by the Woodbury
    identity.  Exact when GGᵀ minus its Nyström part is block diagonal — points coupled only through the r
    directions the sketch captures; the coupling it leaves off the diagonal blocks is the error, and it is
    not small in general: κ's ranking within Spearman 0.96–0.98 of the exact one on ResNet-56 (100 CIFAR
    images, r = 100–200), but up to 17–26 % off on the top 20 (a prototype; this implementation at r = 500:
    Spearman 0.95–0.97, top 20 up to 16 / 20 / 35 % off at 250 / 500 / 1000 images, docs/runs/audit-scale), and far
    worse on networks whose points' gradients are nearly dependent (small tanh networks on low-dimensional
    inputs: 50–99 %, tests/core/test_gram.py).  Use it where the exact
    (n·K)² Gram matrix cannot be held; :func:`setsens.audit.scan` makes chosen blocks exact (:meth:`refine`,
    :func:`gram_solve`: on ResNet-56 with 1000 images and r = 497 its first round, the sketch's top 100 and 10 random
    points, took the top-20 error from 35 % to 0.07 %, the sketch having placed the exact top 20 as low as 72nd,
    docs/runs/audit-scale/refine-1000.json), and :func:`setsens.audit.exact_modulus` checks any point.  Memory
    n·K·r and n·K²; cost 2 + 2·power Jacobian passes."""

    approximate = True

    def __init__(self, blocks: Tensor, L: Tensor, rcond: float, centered: bool = False):
        n, k = blocks.shape[0], blocks.shape[1]
        Lb = L.reshape(n, k, -1)
        residual = blocks - Lb @ Lb.transpose(1, 2)
        if centered:  # the centring's null direction exact: a small residual would otherwise keep its rounding
            residual = center_gram_blocks(residual)
        # dropped below rcond of the largest diagonal block (a well-captured block's residual is small, not noise)
        Q, inv, self.rank = _pinv_psd(residual, rcond, float(torch.linalg.eigvalsh(blocks).max()))
        self.E_inv = (Q * inv[:, None, :]) @ Q.transpose(1, 2)  # (n, K, K)
        self.EiL = (self.E_inv @ Lb).reshape(n * k, -1)  # E⁺L, (n·K, r)
        self.S = torch.linalg.inv(torch.eye(L.shape[1], dtype=L.dtype, device=L.device) + L.T @ self.EiL)
        self.k = k
        self.exact, self.exact_rows, self._exact_at = None, torch.zeros(0, dtype=torch.long, device=L.device), None

    def refine(self, rows: Tensor, columns: Tensor) -> None:
        """Take ``columns``, the true ``(GGᵀ)⁺``'s columns on ``rows`` ((n·K, len(rows)), :func:`gram_solve`): every
        block within these rows and those refined before is exact from now on, the coupling to the earlier ones
        taken from these columns (rows refined again are replaced; ``apply`` stays approximate)."""
        block = columns[rows]
        block = (block + block.T) / 2
        kept = self.exact_rows[~torch.isin(self.exact_rows, rows)]
        if len(kept):
            old = self._exact_at[kept]
            cross = columns[kept]  # (kept, rows): the coupling from the new columns
            block = torch.cat([torch.cat([self.exact[old][:, old], cross], 1), torch.cat([cross.T, block], 1)])
        self.exact, self.exact_rows = block, torch.cat([kept, rows])
        at = torch.full((self.EiL.shape[0],), -1, dtype=torch.long, device=rows.device)  # a row's place in exact
        at[self.exact_rows] = torch.arange(len(self.exact_rows), device=rows.device)
        self._exact_at = at

    def block(self, rows: Tensor) -> Tensor:
        """The block of the approximate ``(GGᵀ)⁺`` on ``rows`` (whole points' outputs, as :class:`EigenInverse`);
        exact within the rows given to :meth:`refine`."""
        if self.exact is not None and bool((self._exact_at[rows] >= 0).all()):
            at = self._exact_at[rows]
            return self.exact[at][:, at]
        points = rows.reshape(-1, self.k)[:, 0] // self.k
        Ei = torch.block_diag(*self.E_inv[points])
        A = self.EiL[rows]
        return Ei - A @ self.S @ A.T

    def apply(self, U: Tensor) -> Tensor:
        U = U.to(self.EiL)
        n = self.E_inv.shape[0]
        direct = (U.reshape(-1, n, 1, self.k) @ self.E_inv).reshape(U.shape)
        return direct - ((U @ self.EiL) @ self.S) @ self.EiL.T


def nystrom_inverse(problem: Problem, centered: bool, rank: int, rcond: float, power: int = 1, seed: int = 0,
                    progress: ProgressFn | None = None, checkpoint: str | Path | None = None) -> NystromInverse:
    """:class:`NystromInverse` of rank ``rank`` (at most half the n·K outputs: beyond, the residual blocks vanish
    and the exact paths are the better buy) with ``power`` power iterations, Ω seeded by
    ``seed``.  ``progress``: stage ``"sketch"``, Jacobian passes done, after each.  ``checkpoint``: Ω is saved
    there after each power iteration and the finished sketch at the end (N × rank); a rerun resumes from Ω (one
    Jacobian pass redone) or takes the finished sketch (none)."""
    n = problem.n
    k = output_width(problem)
    N, rank = n * k, min(rank, n * k // 2)
    resume = Resume(checkpoint, lambda: _sketch_key(problem, k, centered, rank, power, seed))
    state = resume.load()
    passes, iteration = 2 + 2 * power, int(state.get("iteration", 0))
    if state.get("rcond") == rcond:  # finished
        report(progress, "sketch", passes, passes)
        device = problem.params.device
        return NystromInverse(state["blocks"].to(device), state["L"].to(device), rcond, centered)
    done = 2 * iteration

    def tick():
        nonlocal done
        done += 1
        report(progress, "sketch", done, passes)

    omega = state.get("omega")
    if omega is None:
        omega = torch.randn(rank, N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        omega = omega.to(problem.params.device)  # drawn on the CPU: the same Ω on every device
        if centered:
            omega = center_classes(omega.reshape(rank, n, k)).reshape(rank, N)
    Z = jacobian_products(problem, centered, left=omega)[1]  # Ωᵀ G, (r, p)
    tick()
    for iteration in range(iteration + 1, power + 1):
        Y = jacobian_products(problem, centered, right=Z)[0].double()  # (M Ω)ᵀ
        tick()
        omega = torch.linalg.qr(Y.T)[0].T
        resume.save(omega=omega, iteration=iteration)
        Z = jacobian_products(problem, centered, left=omega)[1]
        tick()
    Y, _, blocks = jacobian_products(problem, centered, right=Z, diagonal=True)  # (MΩ)ᵀ and the diagonal blocks
    tick()
    C = float64_product(Z, Z)  # ΩᵀMΩ
    V, inv, _ = _pinv_psd(C, rcond)
    L = Y.double().T @ (V * inv.sqrt())  # M_nys = L Lᵀ
    if centered:
        blocks = center_gram_blocks(blocks)
    resume.save(omega=omega, iteration=power, blocks=blocks, L=L, rcond=rcond)
    return NystromInverse(blocks, L, rcond, centered)


class BlockSolve(NamedTuple):
    """What :func:`block_pcg` reached: the iterate, the largest relative residual, the iterations taken, the caller's
    error estimate at the iterate (inf without one, or before it can tell) and, when asked to keep them, the
    A-orthonormal directions searched (those given as ``basis`` first) with their products, ``(V, AV)``."""

    X: Tensor
    residual: float
    iterations: int
    error: float
    basis: tuple[Tensor, Tensor] | None = None


def gram_solve(problem: Problem, centered: bool, rhs: Tensor, preconditioner: NystromInverse, rtol: float,
               maxiter: int, progress: ProgressFn | None = None, checkpoint: str | Path | None = None,
               error: Callable[[Tensor, dict], tuple[float, dict]] | None = None, tol: float = 0.0,
               basis: tuple[Tensor, Tensor] | None = None, keep: int = 0) -> BlockSolve:
    """``X`` with ``GGᵀ X = rhs`` for columns ``rhs`` (n·K, c) in G's (centred) row space, by :func:`block_pcg`
    preconditioned with ``preconditioner``'s approximate ``(GGᵀ)⁺`` (Nyström-preconditioned CG: Frangella, Tropp &
    Udell, SIAM J. Matrix Anal. Appl. 2023; it needs few iterations when the sketch holds GGᵀ's large eigenvalues),
    with :func:`block_pcg`'s stopping rules (``rtol``, ``error`` and ``tol``, ``maxiter``) and its recycling (``basis``,
    ``keep``).  Cost per iteration: two Jacobian passes (Gᵀ, then G) with one vector per column; ``progress``: stage
    ``"refine"`` after each.  ``checkpoint``: the iterates are saved there after each iteration (with the directions
    kept), and a rerun resumes from them."""
    def gram(X: Tensor) -> Tensor:
        back = jacobian_products(problem, centered, left=X.T)[1]  # Xᵀ G, (c, p)
        return jacobian_products(problem, centered, right=back)[0].double().T

    resume = Resume(checkpoint, lambda: problem_key(problem) + ("block-solve", centered, tuple(rhs.shape),
                                                              fingerprint(rhs))
                    + (() if basis is None else ("recycled", fingerprint(basis[0]))))

    def saved(state: dict) -> None:
        resume.save(**state)
        report(progress, "refine", state["done"], maxiter, residual=state["residual"], error=state["error"])

    return block_pcg(gram, lambda R: preconditioner.apply(R.T).T, rhs, rtol, maxiter, resume.load(), saved, error,
                     tol, basis, keep)


def block_pcg(gram, precondition, rhs: Tensor, rtol: float, maxiter: int, state: dict | None = None,
              saved=None, error: Callable[[Tensor, dict], tuple[float, dict]] | None = None,
              tol: float = 0.0, basis: tuple[Tensor, Tensor] | None = None, keep: int = 0) -> BlockSolve:
    """Block conjugate gradients (O'Leary, Linear Algebra Appl. 1980) for ``A X = rhs``, A symmetric positive
    semi-definite given by ``gram(D) = A D`` and a preconditioner ``precondition(R) ≈ A⁺ R``: every column searches the
    space spanned by all columns' directions, so c right-hand sides gain c dimensions of Krylov space per iteration
    (independent CG: one each) — fewer products where the columns share the spectrum's hard part.  The directions are
    made A-orthonormal each iteration (an eigendecomposition of DᵀAD, c × c, dropping those below 1e-10 of its
    largest: dependent ones, which would make the step ill-defined).  With X₀ = 0 the iterate is the Galerkin
    solution on the Krylov space searched, so ``rhsᵀX`` grows with every iteration towards ``rhsᵀA⁺rhs`` and stays below
    it (Loewner order), short of it by ``RᵀA⁺R``.

    ``basis``: ``(V, AV)``, directions an earlier solve with the same A searched (its :class:`BlockSolve`'s ``basis``,
    ``keep``; made A-orthonormal again here, as rounding loses that).  The search then starts from the Galerkin
    solution on span(V) and keeps every new direction A-conjugate to V (deflated CG: Saad, Yeung, Erhel & Guyomarc'h,
    SIAM J. Sci. Comput. 2000), so what the earlier solve learnt of A's hard part is not searched again; the iterate is
    the Galerkin solution on span(V) plus the Krylov space searched, and the bound above holds.  A basis spanning
    (nearly) all of A's range leaves only the rounding of its projections to search, which the A-orthonormalisation
    above amplifies (on a small tanh network whose kept directions outnumbered the range, the residual rose to 1e4):
    :meth:`setsens.audit.GramFactor.refine` keeps at most half the rows.  ``keep``: how many directions at most to
    return (the basis's first, then the earliest of this solve's; any subset of A-orthonormal directions is one too) —
    two N × ``keep`` matrices, the memory this holds beyond the iteration's.

    Stops when every column's residual ``‖rhs − AX‖`` is at most ``rtol``·‖rhs‖, when ``error(X, memory)`` — the
    caller's estimate of the error left in what it wants from X, returned with the memory of earlier iterates it
    needs (``{}`` at first) — is at most ``tol``, or after ``maxiter`` iterations.  ``state`` (from ``saved``, called
    with it after each iteration) resumes.  On ResNet-56's Gram matrix with the scan's preconditioner: 4–6
    iterations to residual 0.1 where per-column CG took 6–14 (docs/runs/audit-scale/block-cg-200.json)."""
    scale = rhs.norm(dim=0).clamp(min=torch.finfo(torch.float64).tiny)
    V, AV = (rhs[:, :0], rhs[:, :0]) if basis is None else _a_orthonormal(*basis)
    kept = ([V[:, :keep]], [AV[:, :keep]])  # lists, joined once at the end: a join per iteration would hold them twice

    def deflate(Z: Tensor) -> Tensor:  # Z made A-conjugate to V
        return Z if basis is None else Z - V @ (AV.T @ Z)

    if state:
        X, R, D, done = state["X"], state["R"], state["D"], int(state["done"])
        memory, estimate = state.get("memory", {}), float(state.get("error", float("inf")))
        kept = state.get("kept", kept)
    else:
        y = V.T @ rhs  # the Galerkin solution on span(V)
        X, R, done, memory, estimate = V @ y, rhs - AV @ y, 0, {}, float("inf")
        D = deflate(precondition(R))
    residual = float((R.norm(dim=0) / scale).max())
    while residual > rtol and estimate > tol and done < maxiter:
        Q = gram(D)
        W = _orthonormalizing(D.T @ Q)  # D W is A-orthonormal
        if not W.shape[1]:  # D = 0: the residual is zero
            break
        D, Q = D @ W, Q @ W
        room = keep - sum(c.shape[1] for c in kept[0])
        if room > 0:  # a slice copied: a view would hold all of D
            kept[0].append(D if room >= D.shape[1] else D[:, :room].clone())
            kept[1].append(Q if room >= Q.shape[1] else Q[:, :room].clone())
        alpha = D.T @ R
        X, R = X + D @ alpha, R - Q @ alpha
        done, residual = done + 1, float((R.norm(dim=0) / scale).max())
        if error is not None:
            estimate, memory = error(X, memory)
        Z = precondition(R)
        D = deflate(Z) - D @ (Q.T @ Z)  # A-conjugate to the directions searched so far and to V
        if saved is not None:
            saved({"X": X, "R": R, "D": D, "done": done, "residual": residual, "memory": memory, "error": estimate,
                   **({"kept": kept} if keep else {})})
    # at most keep, also where a resumed state kept more (under an earlier, larger keep)
    return BlockSolve(X, residual, done, estimate,
                      (torch.cat(kept[0], 1)[:, :keep], torch.cat(kept[1], 1)[:, :keep]) if keep else None)


def _orthonormalizing(C: Tensor) -> Tensor:
    """W with WᵀCW = I for a PSD C = DᵀAD, so that D W is A-orthonormal: an eigendecomposition of C, dropping the
    eigenvalues below 1e-10 of its largest (dependent directions)."""
    lam, E = torch.linalg.eigh((C + C.T) / 2)
    independent = lam > 1e-10 * lam.max().clamp(min=torch.finfo(torch.float64).tiny)
    return E[:, independent] / lam[independent].sqrt()


def _a_orthonormal(V: Tensor, AV: Tensor) -> tuple[Tensor, Tensor]:
    """``(V, AV)`` with VᵀAV = I again: CG's directions lose their A-orthogonality in rounding, and a basis that has
    lost it would make the recycled search stall."""
    W = _orthonormalizing(V.T @ AV)
    return V @ W, AV @ W


def point_blocks(C: Tensor, k: int) -> Tensor:
    """The (m, K, K) diagonal blocks, one per point, of an (m·K) × (m·K) matrix over m points' K outputs."""
    m = C.shape[0] // k
    return C.reshape(m, k, m, k).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def relative_rise(before: Tensor, after: Tensor) -> Tensor:
    """For PSD blocks (m, K, K) that grow, ``before ⪯ after``: the bound ``1 − √(1 − λ_max(A⁺ᐟ²(A − B)A⁺ᐟ²))`` on
    the rise of ``σ_max(X^½ M)`` from ``X = B = before`` to ``X = A = after``, relative to its value at ``after``, for
    every M — so of every κ computed from the block, whatever its input Jacobian (B ⪰ (1 − λ)A); attained by some
    M.  Eigenvalues of ``after`` below 1e-10 of its largest are dropped."""
    lam, U = torch.linalg.eigh((after + after.transpose(1, 2)) / 2)
    keep = lam > 1e-10 * lam[:, -1:].clamp(min=torch.finfo(lam.dtype).tiny)
    W = U * torch.where(keep, lam.clamp(min=torch.finfo(lam.dtype).tiny).rsqrt(), 0.0)[:, None, :]
    step = W.transpose(1, 2) @ (after - before) @ W
    return 1 - (1 - torch.linalg.eigvalsh((step + step.transpose(1, 2)) / 2)[:, -1].clamp(0, 1)).sqrt()


def block_error(blocks: Tensor, memory: dict) -> tuple[float, dict]:
    """:func:`block_pcg`'s ``error`` for per-point blocks (m, K, K) of a Galerkin approximation of ``(GGᵀ)⁺``, which
    grow towards the exact ones with every iteration: the largest estimated relative error left in a κ computed from
    them (each block's in the returned memory, ``"tail"``).  Each block's last rise s_j (:func:`relative_rise`) and
    the one before, s_{j−1}, extrapolated as a geometric tail, ``s_j q / (1 − q)`` with q = s_j / s_{j−1} (inf where
    q ≥ 1: the rises do not yet shrink; 0 where s_j = 0), so it needs three iterates.  An estimate, not a bound: it
    assumes the rises keep shrinking at least as fast, and falls short where they do not (unpreconditioned CG,
    tests/core/test_gram.py).  Measured against exact κ: above the true error on the tests' small networks and
    on ResNet-56's 110-point rounds (docs/runs/audit-scale/refine-trace-*.json), 3 % under it once on a 20-point
    round (recycle-1000.json)."""
    if "blocks" not in memory:
        return float("inf"), {"blocks": blocks}
    rise = relative_rise(memory["blocks"], blocks)
    if "rise" not in memory:
        return float("inf"), {"blocks": blocks, "rise": rise}
    ratio = rise / memory["rise"]
    tail = torch.where(ratio < 1, rise * ratio / (1 - ratio).clamp(min=torch.finfo(rise.dtype).tiny), torch.inf)
    tail = torch.where(rise == 0, 0.0, tail)
    return float(tail.max()), {"blocks": blocks, "rise": rise, "tail": tail}


def center_gram_blocks(blocks: Tensor) -> Tensor:
    """``P B P`` for per-point K × K blocks (n, K, K)."""
    return center_classes(center_classes(blocks).transpose(1, 2)).transpose(1, 2)
