"""The numerical modulus of a :class:`~setsens.problem.Problem`: :class:`DenseModulus` (dense H and per-point
J, whole network or one block of weights, per point) and :func:`matrix_free_modulus` (Hessian-vector
products and LSMR), both through the criterion of :mod:`.criterion`; :func:`toy_modulus`, the paper's toy."""

from __future__ import annotations

import math
import time

import numpy as np
import scipy.sparse.linalg as spla
import torch
from torch import Tensor, nn
from torch.func import grad, jacfwd

from ..operators import J_SCALES, DataJacobian, Hessian, dense_hessian
from ..problem import Perturbation, Problem, squared_error
from .criterion import DEFAULT_TAU, STABILITY_RTOL, ModulusResult, _filter, _top_eigenvalue, _top_filtered_eig


def _point_jacobians(problem: Problem, idx: Tensor, w: Tensor, factor: float, chunk: int):
    """Yield ``(positions, J_chunk)`` with J_chunk (b, p, d): ``factor · ∂_{x_i} ∇_w ℓ_i`` per point."""
    x_all, y_all = problem.points(idx)
    shape = x_all.shape[1:]
    for s in range(0, idx.numel(), chunk):
        x, y = x_all[s : s + chunk], y_all[s : s + chunk]

        def jac_one(xi, yi):
            # ∂_{x_i} ∇_w ℓ_i: forward mode over the d input coordinates of one point
            g = grad(lambda ww, xx: problem.per_sample_loss(ww, xx[None], yi[None]).sum())
            return jacfwd(lambda xx: g(w, xx))(xi).reshape(w.numel(), -1)

        Jc = torch.stack([jac_one(x[i], y[i]) for i in range(x.shape[0])]) * factor
        yield torch.arange(s, s + x.shape[0]), Jc, shape


class DenseModulus:
    """Dense (small p) coderivative modulus for the whole network and every parameter block.

    Builds H (p×p) once and the Gram matrix ``J Jᵀ`` (p×p) of the data Jacobian over the
    perturbed points K, chunk by chunk, never the p × |K|·d Jacobian itself.  Per-point moduli
    ``κ_b({k})`` for every block b are computed in the same pass (``per_point=True``).
    Everything else — other tolerances, filters, blocks — is a cheap re-evaluation.
    Cost: one dense Hessian (p Hessian-vector products), one eigendecomposition per block,
    |K|·d forward-mode Jacobian columns; memory O(p²).
    """

    def __init__(
        self,
        problem: Problem,
        indices=None,
        w: Tensor | None = None,
        scale: str = "exact",
        per_point: bool = False,
        tau: float = DEFAULT_TAU,
        filter: str = "truncate",
        chunk: int = 32,
        hessian: Tensor | None = None,
    ):
        if scale not in J_SCALES:
            raise ValueError(f"scale must be one of {J_SCALES}, got {scale!r}")
        self.problem = problem
        self.w = problem.params if w is None else w
        self.indices = torch.arange(problem.n) if indices is None else problem.check_indices(indices)
        self.scale = scale
        self.factor = 1.0 / self.indices.numel() if scale == "paper" else problem.weight
        t0 = time.perf_counter()
        self.H = dense_hessian(problem, self.w) if hessian is None else hessian.to(self.w)
        self.H = 0.5 * (self.H + self.H.T)
        self.blocks: dict[str, slice] = {"network": slice(0, problem.p)}
        self.blocks.update(dict(problem.blocks()))
        self.spectra = {}
        self._gram_cache: dict[str, tuple[Tensor, float]] = {}
        for name, sl in self.blocks.items():
            lam, U = torch.linalg.eigh(self.H[sl, sl])
            self.spectra[name] = (lam, U)
        self.seconds_hessian = time.perf_counter() - t0
        t0 = time.perf_counter()
        p = problem.p
        self.gram = torch.zeros(p, p, dtype=self.w.dtype, device=self.w.device)
        self.point_kappa: dict[str, Tensor] = {}
        self.per_point_tau = tau
        self.per_point_filter = filter
        if per_point:
            self.point_kappa = {n: torch.zeros(self.indices.numel(), dtype=self.w.dtype) for n in self.blocks}
            filt = {n: self._phi_U(n, tau, filter) for n in self.blocks}
            # per-point modulus is measured with the single-point scale (|K| = 1 for "paper")
            pp_factor = 1.0 if scale == "paper" else problem.weight
        for pos, Jc, shape in _point_jacobians(problem, self.indices, self.w, self.factor, chunk):
            flat = Jc.permute(1, 0, 2).reshape(p, -1)
            self.gram += flat @ flat.T
            if per_point:
                for name, sl in self.blocks.items():
                    phiU = filt[name]
                    B = torch.einsum("rq,bqd->brd", phiU, Jc[:, sl, :]) * (pp_factor / self.factor)
                    self.point_kappa[name][pos] = torch.linalg.matrix_norm(B, ord=2).to(self.w.dtype)
        self.input_shape = shape
        self.seconds_jacobian = time.perf_counter() - t0
        self.jac = DataJacobian(problem, self.indices, self.w, scale)

    def _phi_U(self, block: str, tau: float, filter: str) -> Tensor:
        """``φ(Λ) Uᵀ`` without its zero rows (truncation drops the null space): ‖φ(Λ)UᵀB‖ for any B."""
        lam, U = self.spectra[block]
        phi, _ = _filter(lam, float(lam.abs().max()), tau, filter)
        on = phi != 0
        return phi[on, None] * U.T[on]

    def _eigen_gram(self, block: str) -> tuple[Tensor, float]:
        """``Uᵀ J Jᵀ U`` on the block's eigenbasis and ``‖J‖₂²``: independent of τ, computed once."""
        if block not in self._gram_cache:
            sl = self.blocks[block]
            _, U = self.spectra[block]
            G = U.T @ self.gram[sl, sl] @ U
            self._gram_cache[block] = (0.5 * (G + G.T), _top_eigenvalue(self.gram[sl, sl]))
        return self._gram_cache[block]

    def _kappa(self, block: str, tau: float, filter: str, k: int = 1) -> tuple[Tensor, Tensor, Tensor]:
        """``(σ², right singular vectors in the eigenbasis, φ)`` of ``φ(H_bb) J_b``: the top ``k``."""
        lam, _ = self.spectra[block]
        phi, _ = _filter(lam, float(lam.abs().max()), tau, filter)
        s, V = _top_filtered_eig(self._eigen_gram(block)[0], phi, k)
        return s, V, phi

    def modulus(
        self,
        block: str = "network",
        tau: float = DEFAULT_TAU,
        filter: str = "truncate",
        criterion_rtol: float = 1e-3,
        n_directions: int = 1,
        stability: bool = True,
    ) -> ModulusResult:
        """κ for ``block`` ("network" or a parameter name) at tolerance ``tau``."""
        if block not in self.blocks:
            raise KeyError(f"unknown block {block!r}; choose from {list(self.blocks)}")
        sl = self.blocks[block]
        lam, U = self.spectra[block]
        lam_max = float(lam.abs().max())
        G, jn2 = self._eigen_gram(block)  # Gram of Uᵀ J
        s, V, phi = self._kappa(block, tau, filter, max(1, n_directions))
        kappa = float(s[0].sqrt())
        _, null = _filter(lam, lam_max, tau, filter)
        on = null != 0
        res2 = _top_eigenvalue(null[on, None] * G[on][:, on] * null[None, on])
        aubin = math.sqrt(res2 / jn2) if jn2 > 0 else 0.0
        dirs = []
        for j in range(V.shape[1]):
            if float(s[j]) <= 0:
                break
            y = torch.zeros(self.problem.p, dtype=self.w.dtype, device=self.w.device)
            y[sl] = U @ (phi * V[:, j])
            mu = self.jac.rmatvec(y)
            dirs.append(mu / mu.norm())
        response = None
        if dirs:
            r = torch.zeros(self.problem.p, dtype=self.w.dtype)
            Jmu = (self.jac.matvec(dirs[0]))[sl]
            r[sl] = -(U @ (phi * (U.T @ Jmu)))
            response = r
        stab = {}
        if stability:
            lo = float(self._kappa(block, tau / 10, filter)[0][0].sqrt())
            hi = float(self._kappa(block, tau * 10, filter)[0][0].sqrt())
            change = max(abs(lo - kappa), abs(hi - kappa)) / kappa if kappa > 0 else 0.0
            stab = {"tau_over_10": lo, "tau_times_10": hi, "relative_change": change,
                    "ill_determined": bool(change > STABILITY_RTOL)}
        return ModulusResult(
            kappa=kappa, tau=tau, filter=filter, aubin_residual=aubin, criterion_rtol=criterion_rtol,
            lambda_max=lam_max, null_dim=int((lam.abs() <= tau * lam_max).sum()), block=block,
            scale=self.scale, indices=self.indices, direction=dirs[0] if dirs else None,
            response=response, stability=stab, next_directions=dirs[1:],
            cost={"dense_hessian_s": self.seconds_hessian, "jacobian_s": self.seconds_jacobian},
        )

    def first_order_shift(self, perturbation: Perturbation, block: str = "network", tau: float = DEFAULT_TAU,
                          filter: str = "truncate") -> float:
        """``‖H_τ⁺ J Δx‖`` for a Δx supported inside K (the first-order prediction of the shift)."""
        mu = self._embed(perturbation)
        sl = self.blocks[block]
        lam, U = self.spectra[block]
        phi, _ = _filter(lam, float(lam.abs().max()), tau, filter)
        return float((phi * (U.T @ self.jac.matvec(mu)[sl])).norm())

    def _embed(self, perturbation: Perturbation) -> Tensor:
        pos = {int(i): j for j, i in enumerate(self.indices)}
        mu = torch.zeros(self.indices.numel(), *self.input_shape, dtype=self.w.dtype)
        for r, i in enumerate(perturbation.indices.tolist()):
            if i not in pos:
                raise ValueError(f"perturbed point {i} is outside the modulus' index set K")
            mu[pos[i]] = perturbation.delta[r].to(mu)
        return mu


# ----------------------------------------------------------------------------------------------
def matrix_free_modulus(
    problem: Problem,
    indices=None,
    tau: float = DEFAULT_TAU,
    block: str = "network",
    scale: str = "exact",
    w: Tensor | None = None,
    solve_rtol: float = 1e-10,
    solve_maxiter: int = 2000,
    eig_tol: float = 1e-6,
    criterion: bool = True,
    criterion_rtol: float = 1e-3,
    seed: int = 0,
) -> ModulusResult:
    """κ = ‖Jᵀ H_δ⁺‖ without any p×p or p×|K|d matrix (Tikhonov filter ``δ = τ·λ_max``).

    * ``λ_max`` by Lanczos (``eigsh``) on the Hessian-vector product;
    * ``H_δ⁺ u = (H² + δ²)⁻¹ H u`` by LSMR with ``damp = δ`` (2 HVPs per iteration);
    * κ² = largest eigenvalue of ``Jᵀ H_δ⁺ H_δ⁺ J`` by Lanczos (``eigsh``) on the |K|·d data
      space — each Lanczos step costs two damped solves, one ``J μ`` and one ``Jᵀ y``;
    * criterion ``‖(I − H H_δ⁺) J‖₂ / ‖J‖₂`` by a further (loose-tolerance) Lanczos run.

    Total cost ≈ (Lanczos steps) × 2 × (LSMR iterations) × 2 HVPs; reported in ``cost``.
    Agrees with ``DenseModulus.modulus(filter="tikhonov")`` (tested).  Memory O(p + |K|d).
    """
    if scale not in J_SCALES:
        raise ValueError(f"scale must be one of {J_SCALES}, got {scale!r}")
    w = problem.params if w is None else w
    idx = torch.arange(problem.n) if indices is None else problem.check_indices(indices)
    blocks = {"network": slice(0, problem.p), **dict(problem.blocks())}
    if block not in blocks:
        raise KeyError(f"unknown block {block!r}; choose from {list(blocks)}")
    sl = blocks[block]
    hess = Hessian(problem, w)
    jac = DataJacobian(problem, idx, w, scale)
    pb = sl.stop - sl.start
    t0 = time.perf_counter()

    def to_t(v):
        return torch.from_numpy(np.ascontiguousarray(v)).to(w)

    def hv(v: np.ndarray) -> np.ndarray:
        full = torch.zeros(problem.p, dtype=w.dtype, device=w.device)
        full[sl] = to_t(v)
        return hess(full)[sl].detach().cpu().numpy()

    Hop = spla.LinearOperator((pb, pb), matvec=hv, rmatvec=hv, dtype=np.float64)
    rng = np.random.default_rng(seed)
    lam_max = float(abs(spla.eigsh(Hop, k=1, which="LM", tol=1e-8, v0=rng.standard_normal(pb))[0][0]))
    delta = tau * lam_max
    solves = {"count": 0, "iterations": 0}

    def hplus(u: np.ndarray) -> np.ndarray:
        out = spla.lsmr(Hop, u, damp=delta, atol=solve_rtol, btol=solve_rtol, maxiter=solve_maxiter)
        solves["count"] += 1
        solves["iterations"] += int(out[2])
        return out[0]

    mshape = (idx.numel(), *problem.input_shape)
    m = int(np.prod(mshape))

    def J_(mu: np.ndarray) -> np.ndarray:
        return jac.matvec(to_t(mu).reshape(mshape))[sl].detach().cpu().numpy()

    def Jt(y: np.ndarray) -> np.ndarray:
        full = torch.zeros(problem.p, dtype=w.dtype, device=w.device)
        full[sl] = to_t(y)
        return jac.rmatvec(full).reshape(-1).detach().cpu().numpy()

    def BtB(mu):
        return Jt(hplus(hplus(J_(mu))))

    op = spla.LinearOperator((m, m), matvec=BtB, rmatvec=BtB, dtype=np.float64)
    val, vec = spla.eigsh(op, k=1, which="LA", tol=eig_tol, v0=rng.standard_normal(m))
    kappa = float(math.sqrt(max(val[0], 0.0)))
    mu = to_t(vec[:, 0]).reshape(mshape)
    mu = mu / mu.norm()
    response = torch.zeros(problem.p, dtype=w.dtype)
    response[sl] = -to_t(hplus(J_(mu.reshape(-1).cpu().numpy())))
    aubin = math.nan
    if criterion:
        def CtC(v):
            jv = J_(v)
            c = jv - hv(hplus(jv))
            # adjoint of (I − H H⁺_δ) is (I − H⁺_δ H) = (I − H H⁺_δ) (they commute)
            return Jt(c - hv(hplus(c)))

        cop = spla.LinearOperator((m, m), matvec=CtC, rmatvec=CtC, dtype=np.float64)
        c2 = spla.eigsh(cop, k=1, which="LA", tol=1e-3, v0=rng.standard_normal(m))[0][0]
        jop = spla.LinearOperator((m, m), matvec=lambda v: Jt(J_(v)), dtype=np.float64)
        j2 = spla.eigsh(jop, k=1, which="LA", tol=1e-6, v0=rng.standard_normal(m))[0][0]
        aubin = float(math.sqrt(max(c2, 0.0) / j2)) if j2 > 0 else 0.0
    return ModulusResult(
        kappa=kappa, tau=tau, filter="tikhonov", aubin_residual=aubin, criterion_rtol=criterion_rtol,
        lambda_max=lam_max, null_dim=None, block=block, scale=scale, indices=idx, direction=mu,
        response=response,
        cost={"hvp": hess.calls, "jacobian_products": jac.calls, "solves": solves["count"],
              "lsmr_iterations": solves["iterations"], "seconds": time.perf_counter() - t0},
    )


def toy_modulus(scale: str = "exact") -> dict:
    """κ of the paper's toy (x̄ = (1, 2), y = (2, 4), w̄ = (1, 2), sum loss), dense.

    ``scale="exact"`` gives 0.4 (and κ‖Δx‖ = 0.178885 for Δx = 0.2·(−1, −2)); ``"paper"``
    (1/|K| = 1/2 in front of J, as in eqs. 14/17, with the sum-loss Hessian) gives the paper's 0.2.

    >>> r = toy_modulus()
    >>> round(r["kappa"], 10), round(r["kappa_times_dx"], 6), r["aubin_residual"]
    (0.4, 0.178885, 0.0)
    >>> round(toy_modulus("paper")["kappa"], 10)
    0.2
    """
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    y = torch.tensor([2.0, 4.0], dtype=torch.float64)
    net = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)).double()
    pb = Problem(net, squared_error, (x[:, None], y[:, None]),
                 params=torch.tensor([1.0, 2.0], dtype=torch.float64), reduction="sum")
    dm = DenseModulus(pb, scale=scale)
    res = dm.modulus()
    dx = 0.2 * torch.tensor([-1.0, -2.0], dtype=torch.float64)
    return {"kappa": res.kappa, "kappa_times_dx": res.kappa * float(dx.norm()),
            "aubin_residual": round(res.aubin_residual, 15), "scale": scale}
