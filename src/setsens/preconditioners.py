"""Faster Hessian products and a faster solve for large networks (ResNet-56 scale).

* :class:`FastHessian` — ``H v`` by double backward (default, fastest measured on CPU) or
  reverse-over-forward (``∇_w ⟨∇L(w), v⟩`` with the inner product from one forward-mode pass).  Same numbers as :class:`setsens.operators.Hessian` (to float
  rounding), counted the same way (``calls``), drop-in for it.
* :func:`minres` — MINRES (Paige & Saunders 1975) in torch, for symmetric, possibly singular and
  indefinite H, with a progress callback, resumable checkpoints of its full state, an optional
  deflation space and a record of its Lanczos basis (so later solves can recycle it).
* :func:`lanczos` — the top eigenpairs of H by Lanczos with full reorthogonalisation.
* :class:`Deflation` — ``(V, HV)`` for an (approximately) invariant subspace: MINRES runs on
  ``P H P`` with ``P = I − V Vᵀ`` and the V-component is solved exactly by a small Galerkin system.
  Because every solve of an experiment shares the same H (only the right-hand side ``J Δx``
  changes), the Ritz vectors of the first solve — free by-products of MINRES's own Lanczos
  process — deflate all later solves; :func:`Deflation.from_krylov` builds them.

Why deflation helps here.  Near a zero-loss minimiser the curvature seen by a perturbed point k is
tiny (the cross-entropy curvature ``p(1 − p)`` is about its loss) while a few directions
(the least well fitted images) carry most of the spectrum.  A Krylov method spends its first
iterations on those large eigenvalues; removing them exactly makes the remaining iterations work on
the directions that lower the loss on the perturbed points.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor
from torch.func import grad, jvp

from .operators import Hessian
from .problem import Perturbation, Problem

__all__ = ["FastHessian", "minres", "MinresResult", "lanczos", "Deflation"]


class FastHessian(Hessian):
    """``v ↦ H v`` by the fastest measured autodiff composition (same numbers as :class:`Hessian`).

    ``method="double_backward"``: ``∇_w ⟨∇_w L, v⟩`` with ``create_graph=True``;
    ``"rev_over_fwd"``: ``∇_w [jvp_w L · v]``; ``"auto"`` (default): double backward on the CPU,
    reverse-over-forward on a GPU.  Measured on ResNet-56 (``benchmarks/hvp_ratio.py``), in units
    of one gradient: 2 CPU cores, batch 250 — double backward 3.2×, forward-over-reverse
    (:class:`Hessian`) 5.9×, reverse-over-forward 6.3×; H100, batch 1000 — reverse-over-forward
    2.1×, forward-over-reverse 2.8×, double backward 6.6×.
    """

    def __init__(self, problem: Problem, w: Tensor | None = None, perturbation: Perturbation | None = None,
                 method: str = "auto"):
        super().__init__(problem, w, perturbation)
        if method not in ("auto", "double_backward", "rev_over_fwd"):
            raise ValueError(f"method must be 'auto', 'double_backward' or 'rev_over_fwd', got {method!r}")
        if method == "auto":
            method = "double_backward" if self.w.device.type == "cpu" else "rev_over_fwd"
        self.method = method

    def batch_hvp(self, w: Tensor, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        risk = self.problem.batch_risk
        if self.method == "double_backward":
            with torch.enable_grad():
                wr = w.detach().requires_grad_(True)
                g = torch.autograd.grad(risk(wr, x, y), wr, create_graph=True)[0]
                return torch.autograd.grad(g @ v, wr)[0]

        def directional(w_):
            return jvp(lambda u: risk(u, x, y), (w_,), (v,))[1]

        return grad(directional)(w)

    def __call__(self, v: Tensor) -> Tensor:
        v = v.to(self.w)
        out = torch.zeros_like(self.w)
        for x, y in self.problem.batches(self.perturbation):
            out += self.batch_hvp(self.w, x, y, v)
        self.calls += 1
        return out


# -- Lanczos and deflation ------------------------------------------------------------------------
def _ritz(V: Tensor, T: Tensor, HV: Tensor | None = None):
    theta, S = torch.linalg.eigh(0.5 * (T + T.T))
    Y = V @ S
    HY = HV @ S if HV is not None else None
    return theta, Y, HY


def lanczos(hvp: Callable[[Tensor], Tensor], p: int, steps: int, *, generator: torch.Generator | None = None,
            start: Tensor | None = None, dtype=torch.float64, device=None) -> tuple[Tensor, Tensor, Tensor]:
    """``steps`` Lanczos iterations with full reorthogonalisation; returns Ritz ``(θ, Y, HY)``.

    ``θ`` ascending; ``Y`` (p × steps) orthonormal; ``HY`` the exact products (one HVP per step,
    stored, so a :class:`Deflation` built from them needs no further products).
    """
    if start is None:
        start = torch.randn(p, generator=generator, dtype=dtype)
    q = start.to(dtype=dtype, device=device)
    q = q / q.norm()
    Q, HQ = [], []
    for _ in range(steps):
        Q.append(q)
        h = hvp(q).to(q)
        HQ.append(h)
        r = h.clone()
        Qm = torch.stack(Q, 1)
        for _ in range(2):  # full reorthogonalisation, twice is enough
            r -= Qm @ (Qm.T @ r)
        nb = float(r.norm())
        if nb < 1e-12 * float(h.norm() + 1e-300):
            break
        q = r / nb
    Qm, HQm = torch.stack(Q, 1), torch.stack(HQ, 1)
    T = Qm.T @ HQm
    return _ritz(Qm, T, HQm)


@dataclass
class Deflation:
    """An approximately H-invariant subspace ``V`` (orthonormal, p × k) with ``HV`` stored.

    ``project(x) = x − V Vᵀ x``; ``correct(u, b)`` adds the Galerkin component in span V so that
    ``x = P u + V c`` with ``(VᵀHV) c = Vᵀ(−b) − (HV)ᵀ P u`` (pseudo-inverted: eigenvalues of
    ``VᵀHV`` below ``rcond·max`` are dropped, the same regularisation as the rest of the solve).
    """

    V: Tensor
    HV: Tensor
    rcond: float = 1e-6

    def __post_init__(self):
        # re-orthonormalise (V may come from a float32 run) and carry HV along
        Q, R = torch.linalg.qr(self.V)
        keep = R.diagonal().abs() > 1e-8 * R.diagonal().abs().max()
        Rk = R[:, keep][keep]
        self.V = Q[:, keep]
        self.HV = torch.linalg.solve_triangular(Rk.T, self.HV[:, keep].T, upper=False).T
        G = self.V.T @ self.HV
        self.G = 0.5 * (G + G.T)

    @property
    def k(self) -> int:
        return self.V.shape[1]

    def project(self, x: Tensor) -> Tensor:
        return x - self.V @ (self.V.T @ x)

    def correct(self, u: Tensor, b: Tensor) -> Tensor:
        u = self.project(u)
        rhs = self.V.T @ (-b) - self.HV.T @ u
        lam, S = torch.linalg.eigh(self.G)
        keep = lam.abs() > self.rcond * lam.abs().max()
        c = S[:, keep] @ ((S[:, keep].T @ rhs) / lam[keep])
        return u + self.V @ c

    @classmethod
    def top(cls, theta: Tensor, Y: Tensor, HY: Tensor, k: int, max_residual: float = 1e-2, rcond: float = 1e-6):
        """The ``k`` Ritz pairs of largest |θ| whose residual ``‖Hy − θy‖/|θ|`` is below ``max_residual``."""
        res = (HY - Y * theta).norm(dim=0) / theta.abs().clamp_min(1e-300)
        order = torch.argsort(theta.abs(), descending=True)
        order = order[res[order] <= max_residual][:k]
        if order.numel() == 0:
            raise ValueError("no converged Ritz pair to deflate with (run more Lanczos steps)")
        return cls(Y[:, order].clone(), HY[:, order].clone(), rcond)

    @classmethod
    def from_krylov(cls, result: "MinresResult", k: int, max_residual: float = 1e-2, rcond: float = 1e-6):
        """Recycle the Lanczos basis a :func:`minres` run recorded (``keep_basis=True``)."""
        if result.basis is None:
            raise ValueError("the MINRES run did not keep its Lanczos basis (keep_basis=True)")
        V, HV = result.basis
        if result.deflation is not None:  # include the space that run itself was deflated by
            V = torch.cat([result.deflation.V, V], 1)
            HV = torch.cat([result.deflation.HV, HV], 1)
        Q, R = torch.linalg.qr(V)
        HQ = torch.linalg.solve_triangular(R.T, HV.T, upper=False).T
        theta, Y, HY = _ritz(Q, Q.T @ HQ, HQ)
        return cls.top(theta, Y, HY, k, max_residual, rcond)


# -- MINRES -----------------------------------------------------------------------------------------
@dataclass
class MinresResult:
    """Solution of ``H v = −b`` (least squares) and its history."""

    v: Tensor
    iterations: int
    hvp_count: int
    residuals: list[float]
    seconds: float
    converged: bool
    deflation: Deflation | None = None
    basis: tuple[Tensor, Tensor] | None = field(default=None, repr=False)
    resumed_from: int = 0

    @property
    def residual(self) -> float:
        return self.residuals[-1] if self.residuals else float("nan")


_SCALARS = ("beta", "oldb", "dbar", "epsln", "phibar", "cs", "sn", "itn", "hvps", "t_used")
_VECTORS = ("x", "w", "w2", "r1", "r2", "y")


def minres(
    hvp: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    maxiter: int = 50,
    rtol: float = 1e-6,
    x0: Tensor | None = None,
    deflation: Deflation | None = None,
    callback: Callable[[int, float, Tensor], None] | None = None,
    checkpoint: str | None = None,
    checkpoint_every: int = 1,
    keep_basis: bool = False,
    dtype=torch.float64,
) -> MinresResult:
    """Least-squares solve of ``H v = −b`` by MINRES (one ``hvp`` per iteration).

    The iteration count is the regulariser: from ``x0 = 0`` the iterates live in the Krylov space
    of H, which grows along well-determined directions first.  ``rtol`` stops on the relative
    residual ``‖H v + b‖/‖b‖`` (MINRES's own monotone estimate, of the deflated system when
    ``deflation`` is given).  ``callback(iteration, relative residual, v)`` runs after each step.

    ``checkpoint``: a file path; the whole solver state is saved there (atomically) every
    ``checkpoint_every`` iterations and a run started with the same path resumes from it
    (checked against ``b``'s norm and length).  ``keep_basis`` records the Lanczos vectors and
    their products for :meth:`Deflation.from_krylov`.
    """
    import os

    from .report import atomic_torch_save

    t0 = time.perf_counter()
    b = b.detach().to(dtype)
    p = b.numel()
    target = -b if deflation is None else deflation.project(-b)

    def A(v):
        out = hvp(v).to(dtype)
        return out if deflation is None else deflation.project(out)

    hvps = 0
    st = None
    if checkpoint is not None and os.path.exists(checkpoint):
        st = torch.load(checkpoint, map_location=b.device, weights_only=False)
        if st.get("p") != p or abs(st.get("bnorm", -1) - float(b.norm())) > 1e-6 * float(b.norm()) or st.get("maxiter_ok") is None:
            st = None  # a different problem: start afresh
    basis_V, basis_HV = [], []
    residuals: list[float] = []
    bnorm = max(float(target.norm()), 1e-300)
    if st is not None:
        x, w, w2, r1, r2, y = (st[k].to(dtype) for k in _VECTORS)
        beta, oldb, dbar, epsln, phibar, cs, sn, itn, hvps, t_used = (st[k] for k in _SCALARS)
        residuals = list(st["residuals"])
        resumed = itn
        t0 -= t_used
    else:
        x = torch.zeros_like(target) if x0 is None else (x0.detach().to(b.device, dtype) if deflation is None else deflation.project(x0.detach().to(b.device, dtype)))
        r1 = target - A(x) if x0 is not None else target.clone()
        hvps += int(x0 is not None)
        y = r1.clone()
        beta = float(r1.norm())
        oldb, dbar, epsln, phibar, cs, sn, itn = 0.0, 0.0, 0.0, beta, -1.0, 0.0, 0
        w = torch.zeros_like(target)
        w2 = torch.zeros_like(target)
        r2 = r1.clone()
        resumed = 0
    eps = torch.finfo(dtype).eps
    converged = beta == 0.0 or phibar / bnorm <= rtol
    while itn < maxiter and not converged:
        itn += 1
        v = y / beta
        y = A(v)
        hvps += 1
        if keep_basis:
            basis_V.append(v.clone())
            basis_HV.append(y.clone())
        if itn >= 2:
            y = y - (beta / oldb) * r1
        alfa = float(v @ y)
        y = y - (alfa / beta) * r2
        r1, r2 = r2, y
        y = r2.clone()
        oldb, beta = beta, float(r2.norm())
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = max(math.hypot(gbar, beta), eps)
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        w1, w2 = w2, w
        w = (v - oldeps * w1 - delta * w2) / gamma
        x = x + phi * w
        residuals.append(phibar / bnorm)
        converged = phibar / bnorm <= rtol or beta <= eps * bnorm
        if callback is not None:
            callback(itn, residuals[-1], x)
        if checkpoint is not None and (itn % checkpoint_every == 0 or converged or itn == maxiter):
            state = {k: t for k, t in zip(_VECTORS, (x, w, w2, r1, r2, y))}
            state.update(zip(_SCALARS, (beta, oldb, dbar, epsln, phibar, cs, sn, itn, hvps, time.perf_counter() - t0)))
            state.update(p=p, bnorm=float(b.norm()), residuals=residuals, maxiter_ok=True)
            atomic_torch_save(state, checkpoint)
    if deflation is not None:
        x = deflation.correct(x, b)
    basis = (torch.stack(basis_V, 1), torch.stack(basis_HV, 1)) if keep_basis and basis_V else None
    return MinresResult(x, itn, hvps, residuals, time.perf_counter() - t0, converged, deflation, basis, resumed)
