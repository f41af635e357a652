"""The function-space (Gauss–Newton) estimate of the weight shift: keep every training output.

Near an interpolating minimiser the solution set is, to first order, the set of weights that
reproduce the network's outputs on the training data.  When the points K move by Δx, a shift v
keeps the data fitted when, for every training point i,

    G_i v = −r_i,   G_i = ∂f(x̄_i, w̄)/∂w,   r_i = ∂f(x̄_i, w̄)/∂x · Δx_i  (zero for i ∉ K),

with the outputs centred over the classes when the loss ignores a common shift of the logits
(cross-entropy).  This module returns the minimum-norm such v, ``v = −G⁺ r``, matrix-free.

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

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor
from torch.func import jvp, vjp

from .operators import Adjoint
from .problem import Perturbation, Problem

__all__ = ["OutputJacobian", "output_shift", "cgls", "CglsResult", "function_space_shift"]


class OutputJacobian:
    """``G = ∂f(x̄, w)/∂w`` over all training points, (n·K) × p, matrix-free.

    ``G @ v`` returns the (n, K) output change along v (one forward-mode pass over the data);
    ``G.T @ u`` takes (n, K) and returns a length-p vector (one reverse-mode pass).  With
    ``centered`` the outputs are centred over the classes first (``P = I − 𝟙𝟙ᵀ/K`` on each row):
    the loss then sees exactly the part of the outputs it depends on.  ``calls`` counts passes.
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
        out = torch.cat(out).reshape(self.problem.n, -1)
        return _center(out) if self.centered else out

    def rmatvec(self, u: Tensor) -> Tensor:
        u = _center(u.to(self.w)) if self.centered else u.to(self.w)
        out, start = torch.zeros_like(self.w), 0
        for x, _ in self.problem.batches():
            f, pullback = vjp(lambda w: self.problem.outputs(w, x), self.w)
            out += pullback(u[start:start + x.shape[0]].reshape(f.shape))[0]
            start += x.shape[0]
        self.calls += 1
        return out

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.matvec(v)

    @property
    def T(self) -> Adjoint:
        return Adjoint(self)


def output_shift(problem: Problem, perturbation: Perturbation, w: Tensor | None = None,
                 centered: bool = False) -> Tensor:
    """``r``: the first-order change of the outputs when the points move by Δx, shape (n, K).

    ``r_i = ∂f(x̄_i, w)/∂x · Δx_i`` for i in K (one forward-mode pass over |K| points), zero
    elsewhere.  Linear in Δx, so a Krylov solve from zero is linear in Δx too.
    """
    pert = problem.check_perturbation(perturbation)
    w = problem.params if w is None else w
    x, _ = problem.points(pert.indices)
    rK = jvp(lambda x_: problem.outputs(w, x_), (x,), (pert.delta.to(x),))[1].reshape(len(x), -1)
    r = torch.zeros(problem.n, rK.shape[1], dtype=rK.dtype, device=rK.device)
    r.index_add_(0, pert.indices.to(r.device), rK)
    return _center(r) if centered else r


def _center(u: Tensor) -> Tensor:
    """Centre each row over the classes (``P = I − 𝟙𝟙ᵀ/K``): what a softmax loss sees of the outputs."""
    return u - u.mean(dim=-1, keepdim=True)


@dataclass
class CglsResult:
    """``x`` minimises ``‖A x − b‖`` over the Krylov space of AᵀA after ``iterations`` steps."""

    x: Tensor
    iterations: int
    residuals: list[float]  # ‖A x_k − b‖ / ‖b‖ after each step (monotone)
    seconds: float
    converged: bool
    resumed_from: int = 0
    extra: dict = field(default_factory=dict)


def cgls(A: Callable[[Tensor], Tensor], At: Callable[[Tensor], Tensor], b: Tensor, *, maxiter: int = 50,
         rtol: float = 1e-6, x0: Tensor | None = None, callback: Callable[[int, float, Tensor], None] | None = None,
         checkpoint: str | None = None, dot: Callable[[Tensor, Tensor], float] | None = None,
         dtype=torch.float64) -> CglsResult:
    """CGLS (Hestenes–Stiefel CG on ``AᵀA x = Aᵀb``, Björck's form): one ``A`` and one ``Aᵀ`` per step.

    From ``x₀ = 0`` the iterates stay in range(Aᵀ), so at convergence ``x = A⁺ b`` (the minimum-norm
    least-squares solution); before it, the iteration count regularises.  From ``x0`` the result
    keeps x0's component in ker(A): another member of the solution set.  The residual
    ``‖A x − b‖`` decreases monotonically.  Stops at ``‖A x − b‖ ≤ rtol‖b‖`` or when ``‖Aᵀ r‖``
    vanishes.  ``checkpoint``: the state is saved there (atomically) after every step and a run
    with the same path and ``b`` resumes.  ``dot``: the inner product of A's range (default: the sum
    of elementwise products); a data-parallel run passes an all-reduced one, so that A's rows can
    stay on the rank that owns them (:mod:`setsens.distributed`).  SciPy's LSQR computes the same
    iterates but offers no per-iterate callback, resumption or GPU tensors, which a long ResNet
    solve needs.
    """
    from .report import atomic_torch_save

    t0 = time.perf_counter()
    dot = dot or (lambda a, c: float((a * c).sum()))
    b = b.detach().to(dtype)
    bnorm = max(dot(b, b) ** 0.5, 1e-300)
    st = None
    if checkpoint is not None and os.path.exists(checkpoint):
        st = torch.load(checkpoint, map_location=b.device, weights_only=False)
        if st.get("shape") != tuple(b.shape) or abs(st["bnorm"] - bnorm) > 1e-9 * bnorm:
            st = None  # another problem: start afresh
    if st is not None:
        x, r, s, d = (st[k].to(dtype) for k in ("x", "r", "s", "d"))
        gamma, itn, residuals, resumed = st["gamma"], st["itn"], list(st["residuals"]), st["itn"]
        t0 -= st["seconds"]
    else:
        x = None if x0 is None else x0.detach().to(b.device, dtype)
        r = b.clone() if x is None else b - A(x).to(dtype)
        s = At(r).to(dtype)
        x = torch.zeros_like(s) if x is None else x
        d = s.clone()
        gamma, itn, residuals, resumed = float(s @ s), 0, [], 0
    converged = gamma == 0.0
    while itn < maxiter and not converged:
        q = A(d).to(dtype)
        qq = dot(q, q)
        if qq == 0.0:
            break
        alpha = gamma / qq
        x = x + alpha * d
        r = r - alpha * q
        s = At(r).to(dtype)
        gamma_new = float(s @ s)
        d = s + (gamma_new / gamma) * d
        gamma = gamma_new
        itn += 1
        residuals.append(dot(r, r) ** 0.5 / bnorm)
        converged = residuals[-1] <= rtol or gamma == 0.0
        if callback is not None:
            callback(itn, residuals[-1], x)
        if checkpoint is not None:
            atomic_torch_save({"x": x, "r": r, "s": s, "d": d, "gamma": gamma, "itn": itn, "residuals": residuals,
                               "shape": tuple(b.shape), "bnorm": bnorm, "seconds": time.perf_counter() - t0}, checkpoint)
    return CglsResult(x, itn, residuals, time.perf_counter() - t0, converged, resumed)


def function_space_shift(problem: Problem, perturbation: Perturbation, *, maxiter: int = 50, rtol: float = 1e-6,
                         centered: bool | None = None, scale: float = 1.0, x0: Tensor | None = None,
                         callback: Callable[[int, float, Tensor], None] | None = None,
                         checkpoint: str | None = None) -> tuple[Tensor, CglsResult]:
    """``v ≈ −G⁺ r``: the minimum-norm shift that keeps every training output (see the module doc).

    ``centered`` defaults to True for cross-entropy.  ``scale`` multiplies r (``n/|K|`` gives the
    paper's 1/|K| scaling of J).  The residuals in the result are the relative output mismatch
    ``‖G v + r‖/‖r‖`` over all n points.  Cost: ``maxiter`` × (one JVP + one VJP pass over the data).
    """
    if centered is None:
        centered = problem.loss_ignores_output_shift
    G = OutputJacobian(problem, centered=centered)
    r = output_shift(problem, perturbation, centered=centered) * scale
    res = cgls(G.matvec, G.rmatvec, -r, maxiter=maxiter, rtol=rtol, x0=x0, callback=callback, checkpoint=checkpoint)
    res.extra = {"passes": G.calls, "output_shift_norm": float(r.norm()), "centered": centered}
    return res.x.to(problem.params), res
