"""The poisoning audit's core: how far each training point can move the solution set, and many
perturbation queries for the price of one factorisation (Gauss–Newton form).

Moving point k by Δx_k changes its outputs by ``r = E_k A_k Δx_k`` (``A_k = ∂f(x_k)/∂x``, K × d,
centred over the classes for a loss that ignores a common shift), and the estimated set moves by
the minimum-norm ``v = −G⁺ r = −Gᵀ (GGᵀ)⁺ r``.  Hence ``‖v‖² = (A_k Δx_k)ᵀ B_kk (A_k Δx_k)`` with
``B = (GGᵀ)⁺``: the local modulus of point k (the largest first-order move of the set per unit
‖Δx_k‖) is ``κ_k = σ_max(B_kk^{1/2} A_k)`` and its worst direction the top right singular vector.
A group of points moved together (:func:`group_modulus`) uses the block of B on its rows.

One factorisation of the (n·K) × (n·K) Gram matrix ``GGᵀ`` answers every point and every query:
forming G costs n·K per-sample gradients and n·K·p memory, the eigendecomposition O((n·K)³); each
query then costs one JVP over its points and one product with Gᵀ.  The pseudo-inverse drops
eigenvalues below ``rcond·λ_max`` (default NumPy's ``n·K·ε``), as the dense estimate does.
:class:`GramFactor` picks how by memory (:mod:`setsens.gram`): G held (the digits demo: 1000 × 8832), the Gram
matrix streamed from per-sample Jacobians (exact, memory (n·K)²), or a Nyström sketch (approximate, memory linear
in n) whose top points :func:`scan` then solves exactly; :func:`exact_modulus` (per-point CGLS) is the
matrix-free reference.

:class:`Audit` owns a problem and its factor and offers all of this (and the attack and certificates of
:mod:`setsens.poisoning` and :mod:`setsens.certificate`) as methods.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from .function_space import OutputJacobian, gauss_newton_shift, min_norm_solve, output_shift
from .gram import (CHUNK, REFINE_POINTS, REFINE_ROUNDS, REFINE_SAMPLE, REFINE_TOL, REFINE_TOP, SOLVED, EigenInverse,
                   block_error, center_gram, float64_product, gram_matrix, gram_solve, jacobian_products,
                   nystrom_inverse, output_width, plan, point_blocks, resumable_plan)
from .linear import LinearOperator
from .operators import dense_output_jacobian
from .problem import Perturbation, Problem, center_classes
from .progress import ProgressFn

if TYPE_CHECKING:
    from .certificate import Certificate
    from .finetune import Training
    from .poisoning import AttackOptions, Poisoning

__all__ = ["GramFactor", "Scan", "scan", "group_modulus", "input_jacobians", "exact_modulus", "answer_queries",
           "Audit", "Certificates"]


class GramFactor(LinearOperator):
    """``GGᵀ = Q Λ Qᵀ`` at w̄, with ``G`` the (centred) output Jacobian: the pseudo-inverse of G in
    function space.  ``seconds`` is what building it cost.

    As a :class:`~setsens.linear.LinearOperator` it is ``G⁺ = Gᵀ(GGᵀ)⁺`` (p × n·K): ``factor @ r`` maps
    output changes r ((n, K), or (m, n, K) for m at once) to ``G⁺ r`` (p, or (m, p)), and
    ``factor.T @ g`` maps weight-space vectors g (p, or rows (m, p)) to ``(Gᵀ)⁺ g = (GGᵀ)⁺ G g``
    ((n, K), or (m, n, K)) — the output vector through which a gradient in w reaches the data (the
    coderivative).  The centring is the factor's (G is centred when ``centered``): ``@`` centres r,
    ``.T @`` returns vectors in G's (centred) row space.  ``calls`` counts products, a batch of m one.

    ``path`` (:func:`setsens.gram.plan`, within ``memory`` bytes): ``"dense"`` holds G (n·K·p entries),
    ``"streamed"`` builds GGᵀ from per-sample Jacobians in panels and never holds G (its products are then
    JVP/VJP passes, or one Jacobian pass for K or more at once); both are exact and sum GGᵀ in float64.
    ``rcond``: eigenvalues below ``rcond·λ_max`` are dropped — by default those below the float64 sums'
    rounding (n·K·ε₆₄) and those whose singular value of G is below n·K·ε of the Jacobian's dtype (NumPy's
    pseudo-inverse rule).  ``checkpoint``: the streamed Gram matrix's finished panels (or the sketch's power
    iterations, and :meth:`refine`'s iterates beside it) are saved there and a rerun resumes after them, with their
    panel or rank whatever memory is free then (:func:`setsens.gram.resumable_plan`);
    ``progress`` reports them.  ``"nystrom"`` (where the exact Gram matrix does not fit, or when asked:
    approximate, see :class:`setsens.gram.NystromInverse`; :meth:`refine` makes chosen blocks exact) sketches with
    ``rank``, ``power`` iterations and ``seed``."""

    def __init__(self, problem: Problem, rcond: float | None = None, path: str = "auto", memory: str | int = "auto",
                 progress: ProgressFn | None = None, checkpoint: str | None = None,
                 rank: int = 1000, power: int = 1, seed: int = 0):
        t0 = time.perf_counter()
        self.problem = problem
        self.centered = problem.loss_ignores_output_shift
        self.k = output_width(problem)
        rows = problem.n * self.k
        itemsize = torch.finfo(problem.dtype).bits // 8
        self.plan = resumable_plan(plan(problem.n, self.k, problem.p, itemsize, memory, path, rank), problem,
                                   checkpoint, self.k, self.centered, rank, power, seed)
        if rcond is None:  # above the float64 sums' rounding, and σ above rows·ε of the Jacobian's dtype (NumPy's pinv)
            rcond = max(rows * torch.finfo(torch.float64).eps, (rows * torch.finfo(problem.dtype).eps) ** 2)
        self.rcond, self.G, self.checkpoint = rcond, None, checkpoint
        if self.plan.path == "nystrom":
            self.gram_inverse = nystrom_inverse(problem, self.centered, self.plan.rank, rcond, power, seed, progress,
                                                checkpoint)
        else:
            if self.plan.path == "dense":
                self.G = dense_output_jacobian(problem, centered=self.centered)
                gram = float64_product(self.G, self.G)
            else:
                gram = gram_matrix(problem, self.centered, self.plan.panel, progress, checkpoint)
            self.gram_inverse = EigenInverse(center_gram(gram, problem.n) if self.centered else gram, rcond)
        self.rank = self.gram_inverse.rank
        self.shape = (problem.p, rows)
        self.calls = self._refinements = 0
        self._searched = None  # the refinements' directions, recycled by the next one
        self.seconds = time.perf_counter() - t0

    def refine(self, points: Tensor, tol: float = REFINE_TOL, maxiter: int = 50,
               progress: ProgressFn | None = None) -> float:
        """Make an approximate (``"nystrom"``) factor exact on the block of ``points`` and their coupling to the points
        refined before (every block within all of them from now on; products with many points stay approximate): its
        columns of ``(GGᵀ)⁺`` by :func:`setsens.gram.gram_solve`, preconditioned with the sketch, until
        :func:`setsens.gram.block_error` estimates the relative error left in every point's κ at most ``tol`` (or the
        residual is below :data:`~setsens.gram.SOLVED`: ``tol=0`` asks for that) — taken only if reached within
        ``maxiter`` iterations.  A refined κ is a lower bound of the exact one (the Galerkin iterate,
        :func:`~setsens.gram.block_pcg`).  The estimate is of each point's own block; the coupling between points
        (:func:`group_modulus`) is as accurate as the residual, exact to rounding only with ``tol=0``.  Returns the
        estimated error (0 for the exact paths, which need nothing, and for a solve to ``SOLVED``).  Each refinement
        starts from the directions the earlier ones searched (:func:`~setsens.gram.block_pcg`'s ``basis``: deflated
        block CG), at most :attr:`recycled_directions` of them: the memory that grows with the rounds.  Cost: two
        Jacobian passes per iteration, with |points|·K vectors each (ResNet-56 with 1000 images, rank 500 and 110
        points, 2 threads: at the default 1 %, 4 iterations of ~400 s, the top 20 within 0.11 % (estimated 0.23 %),
        docs/runs/audit-scale/audit_scale.json; to residual 0.1, 5, where per-column CG took 14,
        refine-1000-block.json; the error per iteration, refine-trace-1000.json.  Where GGᵀ is too ill-conditioned —
        nearly dependent gradients — the solve may not converge at all)."""
        if not self.gram_inverse.approximate:
            return 0.0
        t0 = time.perf_counter()
        rows = (points[:, None] * self.k + torch.arange(self.k)).reshape(-1)
        rows = rows.to(self.device)
        rhs = torch.zeros(self.shape[1], len(rows), dtype=torch.float64, device=self.device)
        rhs[rows, torch.arange(len(rows), device=self.device)] = 1.0
        rhs = self.rows(rhs.T.reshape(len(rows), self.problem.n, self.k)).T  # centred as G is: on each point's rows
        own = point_blocks(rhs[rows], self.k).transpose(1, 2)

        def error(X: Tensor, memory: dict) -> tuple[float, dict]:  # from each point's block of rhsᵀX
            return block_error(own @ point_blocks(X[rows], self.k), memory)

        self._refinements += 1  # each call its own checkpoint: a rerun of the same calls resumes each
        solve = gram_solve(self.problem, self.centered, rhs, self.gram_inverse, SOLVED, maxiter, progress,
                           None if self.checkpoint is None else f"{self.checkpoint}-refine{self._refinements}",
                           error, tol, self._searched, keep=self.recycled_directions)
        self._searched = solve.basis if solve.basis is not None and solve.basis[0].shape[1] else None
        estimate = 0.0 if solve.residual <= SOLVED else solve.error
        if estimate <= tol:
            self.gram_inverse.refine(rows, solve.X)
        self.seconds += time.perf_counter() - t0
        return estimate

    @property
    def recycled_directions(self) -> int:
        """How many directions :meth:`refine` keeps for the next refinement: what the plan's budget leaves beside
        its estimate (two float64 n·K-vectors each: a direction and its product), and at most half the n·K outputs
        (beyond, the rounding of their projections is what is left to search, :func:`setsens.gram.block_pcg`)."""
        rows = self.shape[1]
        return min(rows // 2, max(0, self.plan.budget - self.plan.bytes) // (2 * rows * 8))

    @property
    def exact_points(self) -> Tensor:
        """The points whose block of ``(GGᵀ)⁺`` is exact: all of them with an exact path; with ``"nystrom"`` those
        of every :meth:`refine` that was taken (none before)."""
        if not self.gram_inverse.approximate:
            return torch.arange(self.problem.n)
        return (self.gram_inverse.exact_rows[::self.k].cpu() // self.k).sort().values

    @property
    def dtype(self) -> torch.dtype:
        return self.problem.dtype

    @property
    def device(self) -> torch.device:
        return self.problem.params.device

    def block(self, points: Tensor) -> Tensor:
        """``B_GG``: the block of ``(GGᵀ)⁺`` on the outputs of ``points`` (|points|·K square)."""
        return self.gram_inverse.block((points[:, None] * self.k + torch.arange(self.k)).reshape(-1))

    def rows(self, r: Tensor) -> Tensor:
        """Output changes ``r`` ((n, K), or (m, n, K) for m at once) as rows in G's row space: (m, n·K),
        centred over the classes as G is, in float64."""
        r = r.to(torch.float64).reshape(-1, self.problem.n, self.k)
        return (center_classes(r) if self.centered else r).reshape(r.shape[0], -1)

    def matvec(self, r: Tensor) -> Tensor:
        """``G⁺ r`` for output changes ``r`` of shape (n, K) (or flat), or (m, n, K) for m at once (then (m, p))."""
        self.calls += 1
        v = self.vjp(self.gram_inverse.apply(self.rows(r)))
        return v if r.ndim == 3 else v[0]

    def rmatvec(self, g: Tensor) -> Tensor:
        """``u = (Gᵀ)⁺ g = (GGᵀ)⁺ G g`` for a weight-space vector ``g`` (p; then (n, K)) or rows (m, p)
        (then (m, n, K)), in G's row space."""
        self.calls += 1
        u = self.gram_inverse.apply(self.jvp(g.reshape(-1, self.problem.p))).to(self.dtype)  # the weights' dtype
        return u.reshape(*g.shape[:-1], self.problem.n, self.k)

    def jvp(self, g: Tensor) -> Tensor:
        """``G g`` for weight-space rows g (m, p): (m, n·K) in float64 (the inverse's dtype).  Cost: G held, one
        product; else m JVP passes, or from m = K on one per-sample Jacobian pass."""
        if self.G is not None:
            return (g.to(self.G) @ self.G.T).double()
        if g.shape[0] < self.k:  # a few JVP passes cost less than one per-sample Jacobian pass
            return torch.stack([(self._operator @ row).reshape(-1) for row in g]).double()
        return jacobian_products(self.problem, self.centered, right=g)[0].double()

    def vjp(self, u: Tensor) -> Tensor:
        """``Gᵀ u`` for output rows u (m, n·K): (m, p) in the problem's dtype.  Cost: as :meth:`jvp`."""
        if self.G is not None:
            return u.to(self.G) @ self.G
        if u.shape[0] < self.k:
            return torch.stack([self._operator.T @ row.to(self.dtype) for row in u])
        return jacobian_products(self.problem, self.centered, left=u)[1]

    @cached_property
    def gauss_newton_spectrum(self) -> tuple[Tensor, Tensor]:
        """``(μ, R)``: the nonzero eigenvalues μ of the Gauss–Newton matrix 𝒢 = Gᵀ C G (C block diagonal, each
        point's loss Hessian in its outputs times the risk's weight; without weight decay) and R (n·K × r) with
        its eigenvectors ``Gᵀ R diag(μ)^-½``, from ``C^½ GGᵀ C^½ = U diag(μ) Uᵀ``, R = C^½ U.  Exact paths
        only (it needs GGᵀ itself); eigenvalues below the factor's rcond of the largest are dropped.  Cost: n
        small Hessians, an SVD of n·K × rank(GGᵀ) (n·K = 9000: about a minute on 2 cores); cached."""
        from .operators import output_hessians

        if self.gram_inverse.approximate:
            raise ValueError("the Gauss–Newton spectrum needs GGᵀ itself: an exact path (dense or streamed), not "
                             "the Nyström sketch")
        lam, Q = torch.linalg.eigh(output_hessians(self.problem).double())
        root = (Q * lam.clamp(min=0).sqrt()[:, None, :]) @ Q.transpose(1, 2)  # C^½, (n, K, K)
        half = lambda M: (root @ M.reshape(self.problem.n, self.k, -1)).reshape(M.shape)  # noqa: E731
        keep = self.gram_inverse.values > 0
        U, S, _ = torch.linalg.svd(half(self.gram_inverse.Q[:, keep] * self.gram_inverse.values[keep].sqrt()),
                                   full_matrices=False)
        mu = S ** 2
        kept = mu > self.rcond * mu[0]
        return mu[kept], half(U[:, kept])

    @cached_property
    def _operator(self) -> OutputJacobian:
        return OutputJacobian(self.problem, centered=self.centered)

    def shift(self, r: Tensor) -> Tensor:
        """The minimum-norm ``v = −G⁺ r`` for output changes ``r`` of shape (n, K), or (m, n, K) for m
        queries at once (then (m, p))."""
        return -self.matvec(r)


def input_jacobians(problem: Problem, points: Tensor | None = None) -> Tensor:
    """``A_k = ∂f(x_k)/∂x`` for the given points (default all): (|points|, K, d), centred over the
    classes for a loss that ignores a common shift.  Cost: |points|·K reverse passes of one sample."""
    points = torch.arange(problem.n) if points is None else problem.check_indices(points)
    one = torch.func.vmap(torch.func.jacrev(lambda x_: problem.outputs(problem.params, x_[None]).reshape(-1)))
    x = problem.points(points)[0]  # one pass over a DataLoader, not one per chunk
    A = torch.cat([one(chunk).flatten(2) for chunk in x.split(CHUNK)])
    return center_classes(A, 1) if problem.loss_ignores_output_shift else A


@dataclass
class Scan:
    """Every point's local modulus κ_k (the set's largest first-order move per unit ‖Δx_k‖) and its
    worst direction (unit, the points' input shape), ranked from the most to the least sensitive."""

    kappa: Tensor
    direction: Tensor
    ranking: Tensor
    seconds: float
    factor_seconds: float
    exact_points: Tensor  # the points whose κ_k is exact (to the refinement's tolerance): all with an exact factor
    refine_error: float = 0.0  # the refinement's estimated relative error of a refined κ (the largest of its rounds)
    #: with an approximate factor, the points not refined that could still belong to the top (:func:`scan`'s rule)
    unresolved: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def top(self, m: int) -> Tensor:
        return self.ranking[:m]


def scan(problem: Problem, factor: GramFactor | None = None, refine: int = REFINE_POINTS, top: int = REFINE_TOP,
         rounds: int = REFINE_ROUNDS, sample: int = REFINE_SAMPLE, tol: float = REFINE_TOL,
         progress: ProgressFn | None = None) -> Scan:
    """κ_k and the worst Δx_k for every training point from one :class:`GramFactor`.

    With an approximate factor (``factor.gram_inverse.approximate``) every κ_k is the sketch's but those of the
    points refined (:meth:`GramFactor.refine`; ``exact_points``), in up to ``rounds`` rounds: first the ``refine``
    points the sketch ranks highest and ``sample`` others drawn at random (seeded), which show how far the sketch
    underrates points it does not rank high; then, while any is left, every other point whose sketch κ times ρ —
    the largest exact ÷ sketch ratio among the points refined so far — reaches the ``top``-th largest exact κ.  The
    rule is a heuristic, not a bound (a point the sketch underrates by more than ρ can be missed); the points it
    names but did not refine are ``unresolved`` (when the rounds run out, or a round's solve does not converge: that
    round is not taken, ``refine_error`` above ``tol``).  A refined κ_k comes from the block CG iterate at which
    :func:`setsens.gram.block_error` estimates its relative error at most ``tol``: it is below the exact κ_k
    (:func:`setsens.gram.block_pcg`'s Galerkin bound), and the estimate (``refine_error``) is not a bound
    (:func:`setsens.gram.block_error`): on ResNet-56's preconditioned solves it stayed above the true error at every
    iteration of the 110-point first rounds and fell 3 % under it once, at a 20-point round's third iteration
    (docs/runs/audit-scale/refine-trace-1000.json, recycle-1000.json).
    ResNet-56, rank-500 sketch: at 200 CIFAR images the sketch places the exact top 20 within its top 36, at 1000
    within its top 72 (docs/runs/audit-scale/refine-200.json, refine-1000.json).

    Cost: the factor, n·K per-sample input gradients, n small (K × d) SVDs, and with an approximate factor each
    round's refinement (per CG iteration two Jacobian passes, plus products linear in the points refined).
    """
    t0 = time.perf_counter()
    factor = factor or GramFactor(problem)
    A = input_jacobians(problem)
    kappa, directions = torch.empty(problem.n, dtype=A.dtype), torch.empty(problem.n, A.shape[2], dtype=A.dtype)

    def measure(points: Tensor) -> None:
        for k in points.tolist():
            kappa[k], directions[k] = _largest_move(factor, torch.tensor([k]), A[k])

    measure(torch.arange(problem.n))
    error, unresolved = 0.0, torch.zeros(0, dtype=torch.long)
    if factor.gram_inverse.approximate and refine:
        sketch = kappa.clone()
        order = sketch.argsort(descending=True)
        rest = order[refine:]
        drawn = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(0))[:sample]]
        points = torch.cat([order[:refine], drawn])
        for _ in range(rounds):
            error = max(error, factor.refine(points.sort().values, tol, progress=progress))
            if error > tol:  # not taken: these points keep the sketch's κ
                break
            measure(points)
            exact = factor.exact_points
            ratio = float((kappa[exact] / sketch[exact]).max())
            threshold = kappa[exact].topk(min(top, len(exact))).values[-1]
            outside = torch.ones(problem.n, dtype=torch.bool)
            outside[exact] = False
            points = (outside & (sketch * ratio >= threshold)).nonzero()[:, 0]
            if not len(points):
                break
        unresolved = points
    return Scan(kappa, directions.reshape(problem.n, *problem.input_shape), kappa.argsort(descending=True),
                time.perf_counter() - t0, factor.seconds, factor.exact_points, error, unresolved)


def group_modulus(problem: Problem, points, factor: GramFactor | None = None) -> tuple[float, Tensor]:
    """``(κ_G, worst Δx_G)`` for a group of points moved together: the largest first-order move of the
    set per unit ‖Δx_G‖ (the norm over all the group's moves), and the unit move that makes it
    ((|G|, …) in the inputs' shape).  Cost: |G|·K input gradients and one (|G|K × |G|d) SVD."""
    factor = factor or GramFactor(problem)
    points = problem.check_indices(points)
    A = input_jacobians(problem, points)
    kappa, direction = _largest_move(factor, points, torch.block_diag(*A))
    return float(kappa), direction.reshape(len(points), *problem.input_shape)


def _largest_move(factor: GramFactor, points: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """σ_max of ``Δx ↦ G⁺ E A Δx`` on ``points`` (‖v‖² = (AΔx)ᵀ B (AΔx), B their block of (GGᵀ)⁺) and
    its top right singular vector."""
    lam, U = torch.linalg.eigh(factor.block(points))
    root = (U * lam.clamp(min=0).sqrt()) @ U.T
    _, s, Vh = torch.linalg.svd(root @ A.to(root), full_matrices=False)
    return s[0], Vh[0]


def exact_modulus(problem: Problem, point: int, maxiter: int = 500, rtol: float = 1e-12) -> float:
    """κ_k by K independent matrix-free CGLS solves ``G m_j = e_{k,j}`` (the reference :func:`scan` is
    checked against): ``σ_max([m_1 … m_K] A_k)``.  Cost: K minimum-norm solves."""
    centered = problem.loss_ignores_output_shift
    G = OutputJacobian(problem, centered=centered)
    A = input_jacobians(problem, [point])[0]
    K = A.shape[0]
    columns = []
    for j in range(K):
        e = torch.zeros(problem.n, K, dtype=problem.dtype, device=problem.device)
        e[point, j] = 1.0
        columns.append(min_norm_solve(G, center_classes(e) if centered else e, maxiter=maxiter, rtol=rtol).x.to(e))
    return float(torch.linalg.matrix_norm(torch.stack(columns, 1) @ A, ord=2))


def answer_queries(problem: Problem, perturbations: list[Perturbation], factor: GramFactor | None = None) -> Tensor:
    """The minimum-norm Gauss–Newton shift v₀ for each perturbation (rows), from one factor.

    Equals ``estimate(problem, pert, "gauss-newton", solve=SolveOptions(rule="fixed"))``'s shift for
    a converged solve.  Cost: one JVP over each query's points, then one matrix product for all.
    """
    r = torch.stack([output_shift(problem, p) for p in perturbations])
    return gauss_newton_shift(problem, r, factor or GramFactor(problem))


@dataclass
class Certificates:
    """Both poisoning certificates of held-out points: ``first_order`` (any network) and ``margin_bounds``
    (bias-free ReLU networks; None otherwise, with the one-line reason in ``skipped``)."""

    first_order: Certificate
    margin_bounds: Certificate | None = None
    skipped: str | None = None

    def kinds(self) -> dict[str, Certificate]:
        """The certificates computed, by name (``"first order"``, ``"margin bounds"``)."""
        kinds = {"first order": self.first_order}
        if self.margin_bounds is not None:
            kinds["margin bounds"] = self.margin_bounds
        return kinds


class Audit:
    """The poisoning audit of one problem: it owns the problem and its :class:`GramFactor` (``factor``,
    built on first use unless given, then shared by every method) and the :class:`Scan` (computed once).

    Each method is the module function of the same job with the owned problem and factor."""

    def __init__(self, problem: Problem, factor: GramFactor | None = None):
        if factor is not None and factor.problem is not problem:
            raise ValueError("factor was built for another problem")
        self.problem = problem
        self._factor = factor
        self._scan: Scan | None = None

    @property
    def factor(self) -> GramFactor:
        """The Gram factor of the problem: built on first use (O((n·K)³), n·K·p memory), then reused."""
        if self._factor is None:
            self._factor = GramFactor(self.problem)
        return self._factor

    def scan(self, progress: ProgressFn | None = None) -> Scan:
        """Every point's κ_k and worst direction (:func:`scan`); computed once: n·K input gradients and
        n small SVDs on top of the factor (and its refinement when it is approximate)."""
        if self._scan is None:
            self._scan = scan(self.problem, self.factor, progress=progress)
        return self._scan

    def group_modulus(self, points) -> tuple[float, Tensor]:
        """``(κ_G, worst Δx_G)`` of ``points`` moved together (:func:`group_modulus`): |G|·K input gradients
        and one SVD."""
        return group_modulus(self.problem, points, self.factor)

    def queries(self, perturbations: list[Perturbation]) -> Tensor:
        """The Gauss–Newton shift v₀ of each perturbation, one row each (:func:`answer_queries`): one JVP
        per query, one product for all."""
        return answer_queries(self.problem, perturbations, self.factor)

    def shift(self, perturbation: Perturbation) -> Tensor:
        """``v = −G⁺ r(Δx)`` for one perturbation (:func:`~setsens.poisoning.set_shift`): one JVP and one
        product."""
        from .poisoning import set_shift

        return set_shift(self.problem, perturbation, self.factor)

    def input_gradient(self, objective: Callable[[Tensor], Tensor], perturbation: Perturbation | None = None) -> Tensor:
        """``∂φ(w̄ + v(Δx))/∂x_k`` for every training point (:func:`~setsens.poisoning.input_gradient`):
        two products with the factor and one reverse pass over the training outputs."""
        from .poisoning import input_gradient

        return input_gradient(self.problem, objective, perturbation, self.factor)

    def attack(self, objective: Callable[[Tensor], Tensor], options: AttackOptions | None = None, points=None,
               retrain: Callable[[Perturbation], Tensor] | None = None) -> Poisoning:
        """The coderivative attack on φ (:func:`~setsens.poisoning.poison`); its first stage uses the owned
        factor (``solver="factor"``), later stages factor their retrained problems."""
        from .poisoning import AttackOptions, poison

        options = AttackOptions() if options is None else options
        factor = self.factor if options.solver == "factor" else None
        return poison(self.problem, objective, options, points, retrain, factor=factor)

    def certificates(self, x: Tensor, deltas, points: int, training: Training | None = None,
                     progress: ProgressFn | None = None) -> Certificates:
        """Both certificates of the predictions at ``x`` against any move of ``points`` training points by
        ``δ‖x_k‖``, δ in ``deltas``: first order (:func:`~setsens.certificate.first_order_certificate`,
        per held-out point K reverse passes and K adjoint products; with ``training``, of the budget response
        instead of the set) and, for bias-free ReLU networks, the margin bounds
        (:func:`~setsens.certificate.poisoning_certificate`, the scan and one bound per δ; they bound the set's
        move, so not with ``training``)."""
        from .certificate import first_order_certificate, poisoning_certificate

        result = Certificates(first_order_certificate(self.problem, x, deltas, points, self.factor,
                                                      training=training, progress=progress))
        if training is not None:
            result.skipped = "the margin bounds bound the solution set's move, not the budget response's"
            return result
        try:  # outside bias-free ReLU networks, layer_weights refuses with a one-line reason
            result.margin_bounds = poisoning_certificate(self.problem, self.scan(), x, deltas, points)
        except ValueError as err:
            result.skipped = str(err)
        return result
