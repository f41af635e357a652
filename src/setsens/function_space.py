"""The function-space (Gauss–Newton) estimate of the weight shift: keep every training output.

Near an interpolating minimiser the solution set is, to first order, the set of weights that
reproduce the network's outputs on the training data.  When the points K move by Δx, a shift v
keeps the data fitted when, for every training point i,

    G_i v = −r_i,   G_i = ∂f(x̄_i, w̄)/∂w,   r_i = ∂f(x̄_i, w̄)/∂x · Δx_i  (zero for i ∉ K),

with the outputs centred over the classes when the loss ignores a common shift of the logits
(cross-entropy).  This module holds G, r and the one computation of the minimum-norm such v,
``v = −G⁺ r`` (:func:`gauss_newton_shift`: a product with a dense factor, or :func:`min_norm_solve`, CGLS
matrix-free), which ``setsens.estimate(..., "gauss-newton")``, the audit and the poisoning attack share.

Relation to eq. 19 (``H v + J Δx = 0``).  Write ``H = Gᵀ Λ G + Σ_i ⟨∂ℓ_i/∂f, ∇²_w f_i⟩`` and
``J Δx = Gᵀ Λ r + Σ_i (∂G_i/∂x Δx_i)ᵀ ∂ℓ_i/∂f`` (Λ: the per-sample Hessians of the loss in the
outputs).  Dropping the terms carried by the output gradients ``∂ℓ_i/∂f`` (the Gauss–Newton
approximation) leaves ``GᵀΛ(Gv + r) = 0``, which every v here satisfies.  For a squared error at a
zero-residual fit those terms vanish and the estimate *is* the minimum-norm solution of eq. 19
(tested).  For cross-entropy they are of the size of the loss, as Λ is, so the exact feasibility
residual of eq. 19 is reported beside the estimate, not assumed small.

Why it helps.  In eq. 19 the directions that restore a zero-loss point carry curvature of the size
of its loss (``p(1 − p)``), so a Krylov solve on H reaches them last.  Here the weights Λ are gone:
the residual ``‖G v + r‖`` is the output mismatch itself, and the first iterate already moves along
``Gᵀ r``, the direction that restores the moved points' outputs.

Cost: one Jacobian-vector product (forward mode) and one vector-Jacobian product (reverse mode)
over the data per iteration.  G is fixed at w̄ during a solve, so :class:`OutputJacobian` linearises
each batch once and keeps what the linearisation stores (the JVP's tangent graph with its primal
values folded in, and the VJP's autograd graph) within a memory budget; an iteration then costs
the two tangent passes only: 1.35–1.48 gradients against 1.98–2.17 uncached on ResNet-56 (batch 250,
2 CPU cores, two runs; the floor of these two passes is 1.32 there, see benchmarks/hvp_ratio.py), 0.71
against 1.80 on the digits MLP (docs/runs/hvp-ratio-*.json).  No p×p or (n·K)×p matrix is formed.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor
from torch.func import jvp, vjp

from .krylov import KrylovResult, cgls, cgne
from .linear import LinearOperator
from .operators import cache_budget, graph_bytes, linearized, memory_in_use
from .problem import Perturbation, Problem, center_classes

__all__ = ["OutputJacobian", "output_shift", "min_norm_solve", "gauss_newton_shift"]


class OutputJacobian(LinearOperator):
    """``G = ∂f(x̄, w)/∂w`` over all training points, (n·K) × p, matrix-free.

    A :class:`~setsens.linear.LinearOperator`: ``G @ v`` returns the (n, K) output change along v (one
    forward-mode pass over the data); ``G.T @ u`` takes (n, K) (or flat) and returns a length-p vector
    (one reverse-mode pass); :meth:`dot` is the inner product of two output vectors.  With ``centered``
    the outputs are centred over the classes first (``P = I − 𝟙𝟙ᵀ/K`` on each row): the loss then sees
    exactly the part of the outputs it depends on.  The centring is this operator's: G *is* ``P ∂f/∂w``,
    ``G @ v`` returns centred outputs and ``G.T @ u`` centres ``u`` itself, so ``G.T`` is G's exact
    adjoint and callers pass uncentred vectors.  ``calls`` counts passes.  On a sharded problem the
    rows are those held here (``shape`` counts them) and ``G.T @ u`` and :meth:`dot` are all-reduced.

    ``cache`` (``"auto"``, ``"none"`` or a number of bytes, see :func:`cache_budget`): the second
    product on a batch linearises it (``torch.func.linearize`` for ``G v``, a retained autograd graph
    for ``Gᵀ u``) if its estimated size fits in what is left of the budget; later products on that
    batch run the tangent passes only (see the module's figures) and equal the uncached ones to
    rounding.  Batches that do not fit are recomputed each time; a one-off
    product never builds anything.  Memory per cached point: at least twice the activations the
    backward pass keeps, and what the process's memory grew by in a build if more (about 8 MB per
    CIFAR image for ResNet-56 in float32 by the first, 27 MB by the second: the default budget then
    holds about 200 images where 22 GB is free, so a batch of 250 is recomputed there — pass
    ``cache=`` bytes or a smaller batch size); ``cached_bytes`` is the sum.
    Building costs a trace of the JVP once per batch, a few gradients (plus about 0.4 s the first
    time in a process).
    """

    def __init__(self, problem: Problem, w: Tensor | None = None, centered: bool = False,
                 cache: str | int = "auto"):
        self.problem = problem
        self.w = problem.params if w is None else w
        self.centered = centered
        self.calls = 0
        self.cache, self.cached_bytes = cache, 0
        cache_budget(cache, self.w.device)  # checks it
        self._linear: dict[int, tuple] = {}  # batch number → (v ↦ G_b v, u ↦ G_bᵀ u)
        self._seen: set[int] = set()  # batches with one product done
        self._traceable = True  # False once torch.func.linearize has failed on the model

    @cached_property
    def shape(self) -> tuple[int, int]:
        """(rows held here · K, p); K read off one point's outputs on first use."""
        x, _ = next(self.problem.batches())
        with torch.no_grad():
            k = self.problem.outputs(self.w, x[:1]).numel()
        return len(self.problem.rows) * k, self.problem.p

    def matvec(self, v: Tensor) -> Tensor:
        v = v.to(self.w)
        out = [self._products(i, x)[0](v) for i, (x, _) in enumerate(self.problem.batches())]
        self.calls += 1
        out = torch.cat(out).reshape(len(self.problem.rows), -1)
        return center_classes(out) if self.centered else out

    def rmatvec(self, u: Tensor) -> Tensor:
        u = u.reshape(len(self.problem.rows), -1)
        u = center_classes(u.to(self.w)) if self.centered else u.to(self.w)
        out, start = torch.zeros_like(self.w), 0
        for i, (x, _) in enumerate(self.problem.batches()):
            out += self._products(i, x)[1](u[start:start + x.shape[0]])
            start += x.shape[0]
        self.calls += 1
        return self.problem.reduce(out)

    def _products(self, i: int, x: Tensor) -> tuple:
        """``(v ↦ G_b v, u ↦ G_bᵀ u)`` on batch ``i``: its cached linearisation (built at the batch's
        second product if it fits the budget) or passes that recompute the outputs."""
        if i in self._linear:
            return self._linear[i]
        f = lambda w: self.problem.outputs(w, x)  # noqa: E731
        first, size = i not in self._seen, self._bytes_per_point * x.shape[0]
        self._seen.add(i)
        if first or self.cached_bytes + size > cache_budget(self.cache, self.w.device, self.cached_bytes):
            def recompute_pull(u):
                out, back = vjp(f, self.w)
                return back(u.reshape(out.shape))[0]

            return lambda v: jvp(f, (self.w,), (v,))[1], recompute_pull
        before = memory_in_use(self.w.device)
        with torch.enable_grad():
            wr = self.w.detach().requires_grad_(True)
            out = f(wr)
        push = linearized(f, self.w)[0] if self._traceable else None
        if push is None:  # untraceable model: only Gᵀ u is cached
            self._traceable = False
            push = lambda v: jvp(f, (self.w,), (v,))[1]  # noqa: E731
        pull = lambda u: torch.autograd.grad(out, wr, u.reshape(out.shape), retain_graph=True)[0]  # noqa: E731
        size = max(size, memory_in_use(self.w.device) - before)  # what the build really took, if more
        self._per_point = max(self._per_point, size // x.shape[0])
        if self.cached_bytes + size > cache_budget(self.cache, self.w.device, self.cached_bytes):
            return push, pull  # it took more than the budget allows: used for this product, not kept
        self._linear[i] = (push, pull)
        self.cached_bytes += size
        return self._linear[i]

    @property
    def _bytes_per_point(self) -> int:
        """Bytes a cached point takes: first twice the activations the backward pass keeps (two points
        measured), then the most that a build has really taken."""
        if not hasattr(self, "_per_point"):
            x, _ = next(self.problem.batches())
            with torch.enable_grad():
                wr = self.w.detach().requires_grad_(True)
                self._per_point = graph_bytes(self.problem.outputs(wr, x[:2]), exclude=wr)
        return self._per_point

    def dot(self, a: Tensor, b: Tensor) -> float:
        """``⟨a, b⟩`` of two (n, K) output vectors (the rows held here, all-reduced)."""
        return float(self.problem.reduce((a * b).sum()))


def output_shift(problem: Problem, perturbation: Perturbation, w: Tensor | None = None,
                 centered: bool = False) -> Tensor:
    """``r``: the first-order change of the outputs when the points move by Δx, shape (n, K).

    ``r_i = ∂f(x̄_i, w)/∂x · Δx_i`` for i in K (one forward-mode pass over |K| points), zero
    elsewhere (on a sharded problem: the rows held here).  Linear in Δx, so a Krylov solve from
    zero is linear in Δx too.
    """
    pert = problem.check_perturbation(perturbation)
    w = problem.params if w is None else w
    local = problem.localize(pert)
    if local is None:  # none of the moved points is held here: zero rows of the outputs' width
        x, _ = next(problem.batches())
        return torch.zeros(len(problem.rows), problem.outputs(w, x[:1]).reshape(1, -1).shape[1],
                           dtype=w.dtype, device=w.device)
    x, _ = problem.points(local.indices + problem.rows.start)
    rK = jvp(lambda x_: problem.outputs(w, x_), (x,), (local.delta.to(x),))[1].reshape(len(x), -1)
    r = torch.zeros(len(problem.rows), rK.shape[1], dtype=rK.dtype, device=rK.device)
    r.index_add_(0, local.indices.to(r.device), rK)
    return center_classes(r) if centered else r


def min_norm_solve(G: OutputJacobian, y: Tensor, precondition=None, **options) -> KrylovResult:
    """``G⁺ y``, matrix-free: the minimum-norm least-squares solution of ``G x = y`` in G's output inner
    product — CGLS, or CG on ``GGᵀ`` preconditioned in G's range (:func:`~setsens.krylov.cgne`) when
    ``precondition`` (:mod:`setsens.preconditioners`) is given.  ``options``: those of
    :func:`~setsens.krylov.cgls` (``maxiter``, ``rtol``, ``x0``, ``callback``, ``checkpoint``).  The one
    Gauss–Newton solve: the shift (``y = −r``), the range projections of the radius rule (``y = G z``)
    and the audit's per-point modulus (``y = e_k``) all run it."""
    if precondition is None:
        return cgls(G, y, dot=G.dot, **options)
    return cgne(G, y, precondition=precondition, dot=G.dot, **options)


def gauss_newton_shift(problem: Problem, r: Tensor, factor=None, *, maxiter: int = 200,
                       rtol: float = 1e-8) -> Tensor:
    """The minimum-norm Gauss–Newton shift ``v = −G⁺ r`` for output changes ``r`` (n, K) (with a factor also
    (m, n, K) for m at once, then (m, p)): one product with ``factor`` (a :class:`setsens.audit.GramFactor`,
    dense, small networks) or one :func:`min_norm_solve` on the matrix-free G (``maxiter``, ``rtol``).
    The centring is G's (the problem's loss decides): pass ``r`` uncentred or centred alike."""
    if factor is not None:
        return factor.shift(r)
    G = OutputJacobian(problem, centered=problem.loss_ignores_output_shift)
    return min_norm_solve(G, -r, maxiter=maxiter, rtol=rtol).x.to(problem.params)
