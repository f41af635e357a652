"""The function-space (Gauss–Newton) estimate of the weight shift: keep every training output.

Near an interpolating minimiser the solution set is, to first order, the set of weights that
reproduce the network's outputs on the training data.  When the points K move by Δx, a shift v
keeps the data fitted when, for every training point i,

    G_i v = −r_i,   G_i = ∂f(x̄_i, w̄)/∂w,   r_i = ∂f(x̄_i, w̄)/∂x · Δx_i  (zero for i ∉ K),

with the outputs centred over the classes when the loss ignores a common shift of the logits
(cross-entropy).  This module holds G and r; ``setsens.estimate(..., "gauss-newton")`` returns the
minimum-norm such v, ``v = −G⁺ r``, by CGLS (:func:`setsens.krylov.cgls`), matrix-free.

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
over the data per iteration — about two gradient costs, against two to six for one Hessian-vector
product (``benchmarks/hvp_ratio.py``).  No p×p or (n·K)×p matrix is formed.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import jvp, vjp

from .operators import Adjoint
from .problem import Perturbation, Problem

__all__ = ["OutputJacobian", "output_shift"]


class OutputJacobian:
    """``G = ∂f(x̄, w)/∂w`` over all training points, (n·K) × p, matrix-free.

    ``G @ v`` returns the (n, K) output change along v (one forward-mode pass over the data);
    ``G.T @ u`` takes (n, K) and returns a length-p vector (one reverse-mode pass); :meth:`dot` is
    the inner product of two output vectors.  With ``centered`` the outputs are centred over the
    classes first (``P = I − 𝟙𝟙ᵀ/K`` on each row): the loss then sees exactly the part of the outputs
    it depends on.  ``calls`` counts passes.  On a sharded problem the rows are those held here
    and ``G.T @ u`` and :meth:`dot` are all-reduced.
    """

    def __init__(self, problem: Problem, w: Tensor | None = None, centered: bool = False):
        self.problem = problem
        self.w = problem.params if w is None else w
        self.centered = centered
        self.calls = 0

    def matvec(self, v: Tensor) -> Tensor:
        v = v.to(self.w)
        out = [jvp(lambda w: self.problem.outputs(w, x), (self.w,), (v,))[1] for x, _ in self.problem.batches()]
        self.calls += 1
        out = torch.cat(out).reshape(len(self.problem.rows), -1)
        return _center(out) if self.centered else out

    def rmatvec(self, u: Tensor) -> Tensor:
        u = _center(u.to(self.w)) if self.centered else u.to(self.w)
        out, start = torch.zeros_like(self.w), 0
        for x, _ in self.problem.batches():
            f, pullback = vjp(lambda w: self.problem.outputs(w, x), self.w)
            out += pullback(u[start:start + x.shape[0]].reshape(f.shape))[0]
            start += x.shape[0]
        self.calls += 1
        return self.problem.reduce(out)

    def dot(self, a: Tensor, b: Tensor) -> float:
        """``⟨a, b⟩`` of two (n, K) output vectors (the rows held here, all-reduced)."""
        return float(self.problem.reduce((a * b).sum()))

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.matvec(v)

    @property
    def T(self) -> Adjoint:
        return Adjoint(self)


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
    return _center(r) if centered else r


def _center(u: Tensor) -> Tensor:
    """Centre each row over the classes (``P = I − 𝟙𝟙ᵀ/K``): what a softmax loss sees of the outputs."""
    return u - u.mean(dim=-1, keepdim=True)
