"""Lipschitz modulus of the solution map ``x ↦ S(x)``: closed form, coderivative, retraining.

Three estimates of how fast the solution set can move per unit of data perturbation
(paper: Theorems 1–3, Lemmas 5–6; DESIGN §1):

* :func:`closed_form_modulus` — Theorem 2 (and Theorem 3 by :func:`theorem3_modulus`) for a
  bias-free ReLU fully-connected network with squared loss (the DFCNN of eq. 8).  Per point k and
  layer h it is Lemma 6 applied to the *single-point interpolation constraint*
  ``f(x_k, w^{(h)}, w̄^{(−h)}) = y_k`` (the proof, eqs. 33–44)::

      κ_h,k = sup { ‖A_kᵀ v‖ : ‖G_{k,h}ᵀ v‖ ≤ 1 },   A_k = ∇_x f(x_k),  G_{k,h} = ∇_{w^{(h)}} f(x_k)

  which for a scalar output is the printed ``‖∇_x f‖ / ‖∇_{W^{(h)}} f‖_F``.
* :class:`DenseModulus` / :func:`matrix_free_modulus` — the coderivative (Mordukhovich) criterion
  ``Jᵀ y = 0 ∀ y ∈ ker H`` and the modulus ``κ = sup{‖Jᵀ y‖ : ‖H y‖ ≤ 1} = ‖Jᵀ H⁺‖``
  (whole network or one block of weights), with the numerical null space
  ``{|λ| ≤ τ·λ_max}``.
* :func:`empirical_modulus` — retrain on perturbed data and divide the set shift by ``‖Δx‖``.

Relationship between the closed form and the block-restricted numerical modulus (tested in
``tests/lipschitz``; derivation in ``docs/lipschitz.md``).  At an interpolating w̄ (zero
residuals, the paper's Assumption 1) the layer-h Hessian block is ``H_hh = c Σ_i G_{i,h}ᵀ G_{i,h}``
and ``J_{h,k} = c G_{k,h}ᵀ A_k``, hence

    κ^num_h({k}) = ‖A_kᵀ G_{k,h} M_h⁺‖,   M_h = Σ_i G_{i,h}ᵀ G_{i,h}   (exact J scale)
    κ_h,k        = the same with M_h replaced by G_{k,h}ᵀ G_{k,h}.

So (R1) the closed form *equals* the block modulus of the one-point problem {x_k}; (R2) if the
stacked per-sample Jacobians of the block have full row rank (the block alone can interpolate),
``κ^num_h({k}) ≥ κ_h,k`` — Theorem 2 is then a lower bound, smaller by the sine of the angle between
point k's constraint and the others'; (R3) otherwise (fewer parameters in the block than
residuals) no ordering holds in general.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import scipy.sparse.linalg as spla
import torch
from torch import Tensor, nn
from torch.func import grad, jacfwd

from .models.mlp import mlp_layers
from .operators import J_SCALES, DataJacobian, Hessian, dense_hessian
from .problem import Perturbation, Problem, squared_error
from .progress import ProgressFn, report

__all__ = [
    "DEFAULT_TAU",
    "STABILITY_RTOL",
    "DFCNNLayout",
    "parse_dfcnn",
    "ClosedForm",
    "closed_form_modulus",
    "theorem3_modulus",
    "ModulusResult",
    "DenseModulus",
    "matrix_free_modulus",
    "modulus_from_matrices",
    "EmpiricalRecord",
    "empirical_modulus",
    "toy_modulus",
]

#: Default relative null-space tolerance: eigen-directions with ``|λ| ≤ τ·λ_max`` form the
#: numerical kernel of H (the cut-off the foundation's sweep found best for set estimates on the
#: digits DFCNN); every report re-evaluates κ at τ/10 and 10τ and flags it as ill-determined if it
#: moves by more than 10 % (it does on the digits network: docs/lipschitz.md §5).
DEFAULT_TAU = 1e-6
#: Relative change of κ over τ/10 … 10τ beyond which the modulus is reported as ill-determined.
STABILITY_RTOL = 0.10


# ==============================================================================================
# Theorem 2 / 3: closed form for the DFCNN
# ==============================================================================================
@dataclass(frozen=True)
class DFCNNLayout:
    """Where the weight matrices ``W^{(1)} … W^{(H)}, a`` of a DFCNN sit in the flat vector."""

    names: tuple[str, ...]
    slices: tuple[slice, ...]
    shapes: tuple[tuple[int, int], ...]

    @property
    def depth(self) -> int:
        """Number of hidden (ReLU) layers H; the last matrix is the output layer ``a``."""
        return len(self.names) - 1

    def labels(self) -> list[str]:
        return [f"W{h + 1}" for h in range(self.depth)] + ["a (output)"]

    def weights(self, w: Tensor) -> list[Tensor]:
        return [w[s].view(shape) for s, shape in zip(self.slices, self.shapes)]


def parse_dfcnn(problem: Problem) -> DFCNNLayout:
    """Check that ``problem`` is the paper's DFCNN (eq. 8) and locate its weight matrices.

    Required: squared loss (``setsens.problem.squared_error``), an ``nn.Sequential`` of
    ``Linear(bias=False)`` layers separated by ``nn.ReLU`` and ending in a ``Linear``, flat inputs.
    Anything else raises ``ValueError`` naming the offending part.

    >>> import torch
    >>> from setsens.models.mlp import mlp
    >>> net = mlp([3, 4, 2]).double()
    >>> x, y = torch.rand(5, 3, dtype=torch.float64), torch.zeros(5, 2, dtype=torch.float64)
    >>> pb = Problem(net, squared_error, (x, y))
    >>> parse_dfcnn(pb).labels()
    ['W1', 'a (output)']
    """
    if not problem.loss_is_squared_error:
        raise ValueError(
            "the closed form (Theorems 2-3) is derived for the squared loss ½‖f(x) − y‖² "
            f"(setsens.problem.squared_error); this problem uses {getattr(problem.loss, '__name__', problem.loss)!r}"
        )
    model = problem.model
    linears, activation = mlp_layers(model, flatten=False)
    if len(problem.input_shape) != 1:
        raise ValueError(f"the DFCNN takes flat inputs, the data have point shape {problem.input_shape}")
    if activation != "relu":
        raise ValueError(f"the activation is {activation}; Theorem 2 needs ReLU between the Linear layers")
    names = tuple(f"{i}.weight" for i, m in enumerate(model) if isinstance(m, nn.Linear))
    for name, m in zip(names, linears):
        if m.bias is not None:
            raise ValueError(f"layer {name.split('.')[0]} (Linear) has a bias; the paper's DFCNN is bias-free (eq. 8)")
    blocks = dict(problem.blocks())
    extra = set(blocks) - set(names)
    if extra:
        raise ValueError(f"unexpected parameters {sorted(extra)} in the DFCNN")
    shapes = tuple(tuple(m.weight.shape) for m in linears)
    if shapes[0][1] != problem.input_shape[0]:
        raise ValueError(f"first layer expects {shapes[0][1]} inputs, the data have {problem.input_shape[0]}")
    return DFCNNLayout(names, tuple(blocks[n] for n in names), shapes)


@dataclass
class ClosedForm:
    """Theorem 2 for each point k (rows) and weight matrix h (columns; the last is the output a).

    ``kappa[k, h]`` — Lemma 6 for the vector constraint ``f(x_k, w) = y_k`` (equals the printed
    formula for a scalar output); ``printed[k, h, j]`` — the printed scalar formula
    ``‖∇_x f_j‖ / ‖∇_{W^{(h)}} f_j‖_F`` for output coordinate j; ``network[k]`` — Lemma 6 with all
    layers free at once.  ``inf`` where ∇_{w^{(h)}} f is rank deficient in a direction that
    moves ∇_x f (Lemma 6's surjectivity fails: dead ReLU units).
    """

    indices: Tensor
    labels: list[str]
    kappa: Tensor
    printed: Tensor
    network: Tensor
    input_grad_norm: Tensor

    def theorem3(self) -> Tensor:
        """Theorem 3 over these points: ``(Σ_k κ_h,k²)^{1/2}`` per layer (see :func:`theorem3_modulus`)."""
        return theorem3_modulus(self.kappa)


def _lemma6(A: Tensor, Gram: Tensor) -> Tensor:
    """``sup{‖Aᵀv‖ : vᵀ Gram v ≤ 1}`` batched: A (b, c, d), Gram (b, c, c) PSD."""
    s, V = torch.linalg.eigh(0.5 * (Gram + Gram.transpose(-1, -2)))
    smax = s.amax(dim=-1, keepdim=True).clamp_min(1e-300)
    keep = s > 1e-12 * smax
    AtV = A.transpose(-1, -2) @ V  # (b, d, c)
    scaled = AtV / s.clamp_min(1e-300).sqrt().unsqueeze(-2)
    scaled = torch.where(keep.unsqueeze(-2), scaled, torch.zeros_like(scaled))
    kappa = torch.linalg.matrix_norm(scaled, ord=2)
    leak = torch.where(keep.unsqueeze(-2), torch.zeros_like(AtV), AtV).norm(dim=(-1, -2))
    anorm = A.norm(dim=(-1, -2))
    bad = leak > 1e-9 * anorm.clamp_min(1e-300)
    kappa = torch.where(bad, torch.full_like(kappa, math.inf), kappa)
    return torch.where((anorm == 0) & (smax[..., 0] <= 1e-300), torch.full_like(kappa, math.nan), kappa)


def closed_form_modulus(problem: Problem, indices=None, w: Tensor | None = None) -> ClosedForm:
    """Theorem 2's κ_h for every point in ``indices`` (default: all) and every weight matrix.

    Reading of the printed formula (documented in docs/lipschitz.md): numerator ``‖∇_{x_k} f‖``
    with the product ``W^{(1)ᵀ}D^{(1)} ⋯ W^{(H)ᵀ}D^{(H)} a`` taken left to right; denominator the
    Frobenius norm of ``∇_{W^{(h)}} f = D^{(h)} W^{(h+1)ᵀ}D^{(h+1)} ⋯ a · x_k^{(h−1)ᵀ}``; all
    activation patterns ``D^{(l)} = diag(1[W^{(l)} x_k^{(l−1)} > 0])`` at the perturbed point x_k.
    The output layer ``a`` (not covered by the theorem) gets the same Lemma-6 formula with
    ``∇_a f = x_k^{(H)}``.  The 1/n or 1/|K| factors cancel: κ_h is scale-free.
    Cost: one forward and one backward sweep per point, no Hessian.
    """
    layout = parse_dfcnn(problem)
    idx = torch.arange(problem.n) if indices is None else problem.check_indices(indices)
    w = problem.params if w is None else w
    Ws = layout.weights(w.detach())
    x, _ = problem.points(idx)
    x = x.reshape(x.shape[0], -1).to(w)
    acts, masks = [x], []
    for W in Ws[:-1]:
        z = acts[-1] @ W.T
        masks.append((z > 0).to(w))
        acts.append(torch.relu(z))
    a = Ws[-1]  # (c, m_H)
    c = a.shape[0]
    b = x.shape[0]
    # back[h] = ∂f/∂z^{(h)}: (b, c, m_h)
    back = [None] * len(masks)
    cur = a.expand(b, *a.shape)
    for h in range(len(masks) - 1, -1, -1):
        cur = cur * masks[h].unsqueeze(1)
        back[h] = cur
        cur = cur @ Ws[h]
    A = cur  # (b, c, d) = ∇_x f
    grams, printed = [], []
    for h in range(len(masks)):
        xn2 = (acts[h] ** 2).sum(dim=1)[:, None, None]
        grams.append(back[h] @ back[h].transpose(-1, -2) * xn2)
    xn2 = (acts[-1] ** 2).sum(dim=1)
    grams.append(torch.eye(c, dtype=w.dtype, device=w.device).expand(b, c, c) * xn2[:, None, None])
    rownorm_A = A.norm(dim=2)  # (b, c)
    kappa = torch.stack([_lemma6(A, g) for g in grams], dim=1)
    for g in grams:
        den = g.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
        printed.append(torch.where(den > 0, rownorm_A / den.clamp_min(1e-300), torch.full_like(den, math.inf)))
    network = _lemma6(A, sum(grams))
    return ClosedForm(
        indices=idx, labels=layout.labels(), kappa=kappa, printed=torch.stack(printed, dim=1),
        network=network, input_grad_norm=torch.linalg.matrix_norm(A, ord=2),
    )


def theorem3_modulus(kappa_points: Tensor) -> Tensor:
    """Theorem 3 (many perturbed points) from the per-point moduli ``κ_{·,k}`` (rows = points).

    ``(Σ_k κ_k²)^{1/2}`` bounds the multi-point modulus of the linearised map when the κ_k are the
    true per-point moduli (``‖Σ_k M_k Δx_k‖ ≤ Σ_k κ_k ‖Δx_k‖ ≤ (Σ_k κ_k²)^{1/2} ‖Δx‖``; tested with
    the numerical ones).  Fed Theorem 2's closed form, which is no bound on κ_k, it is the paper's
    heuristic, not a bound (measured: exceeded by 1.4–5.7×; docs/lipschitz.md).

    >>> theorem3_modulus(torch.tensor([[3.0], [4.0]]))
    tensor([5.])
    """
    return kappa_points.pow(2).sum(dim=0).sqrt()


# ==============================================================================================
# Coderivative criterion and numerical modulus
# ==============================================================================================
@dataclass
class ModulusResult:
    """κ = ‖Jᵀ H_τ⁺‖ on one block of weights, with the coderivative criterion and its stability.

    * ``kappa`` — the modulus at the tolerance ``tau`` (``|λ| ≤ τ·λ_max`` is the null space;
      ``filter="tikhonov"`` uses ``λ/(λ²+δ²)``, ``δ = τ·λ_max``, instead of truncation).
    * ``aubin_residual`` — ``‖(I − H H_τ⁺) J‖₂ / ‖J‖₂``: the share of J's action that falls in the
      numerical null space (0 when the Aubin criterion ``Jᵀy = 0 ∀y ∈ ker H`` holds exactly).
    * ``stability`` — κ at τ/10 and 10τ; ``ill_determined`` when it moves by more than 10 %.
    * ``direction`` — the worst-case unit Δx (shape (|K|, *input_shape)), ``response`` the weight
      shift ``v = −H_τ⁺ J Δx`` it causes (``‖v‖ = κ``).
    """

    kappa: float
    tau: float
    filter: str
    aubin_residual: float
    criterion_rtol: float
    lambda_max: float
    null_dim: int | None
    block: str
    scale: str
    indices: Tensor
    direction: Tensor | None = None
    response: Tensor | None = None
    stability: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)
    next_directions: list[Tensor] = field(default_factory=list, repr=False)

    @property
    def criterion_holds(self) -> bool:
        return self.aubin_residual <= self.criterion_rtol

    @property
    def ill_determined(self) -> bool:
        return bool(self.stability.get("ill_determined", False))

    def summary(self) -> dict:
        return {
            "block": self.block, "kappa": self.kappa, "tau": self.tau, "filter": self.filter,
            "aubin_residual": self.aubin_residual, "criterion_rtol": self.criterion_rtol,
            "criterion_holds": self.criterion_holds, "lambda_max": self.lambda_max,
            "null_dim": self.null_dim, "scale": self.scale, "points": int(self.indices.numel()),
            "stability": self.stability, "cost": self.cost,
        }


def _filter(lam: Tensor, lam_max: float, tau: float, kind: str) -> tuple[Tensor, Tensor]:
    """(pseudo-inverse filter φ(λ) ≈ 1/λ, null-space filter 1 − λφ(λ)) for truncation or Tikhonov."""
    if kind == "truncate":
        keep = lam.abs() > tau * lam_max
        phi = torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), torch.zeros_like(lam))
        return phi, (~keep).to(lam)
    if kind == "tikhonov":
        d2 = (tau * lam_max) ** 2
        return lam / (lam**2 + d2), d2 / (lam**2 + d2)
    raise ValueError(f"filter must be 'truncate' or 'tikhonov', got {kind!r}")


def _top_eig(M: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
    s, V = torch.linalg.eigh(0.5 * (M + M.T))
    return s.flip(0)[:k].clamp_min(0), V.flip(1)[:, :k]


def _top_eigenvalue(M: Tensor) -> float:
    """The largest eigenvalue of a symmetric PSD matrix: Lanczos (ARPACK, to machine precision) from
    a fixed start vector, dense below 64 rows."""
    n = M.shape[0]
    if n == 0:
        return 0.0
    if n <= 64:
        return float(torch.linalg.eigvalsh(0.5 * (M + M.T))[-1].clamp_min(0))
    v0 = np.random.default_rng(0).standard_normal(n)
    val = spla.eigsh(M.detach().cpu().numpy(), k=1, which="LA", v0=v0, return_eigenvectors=False)[0]
    return max(float(val), 0.0)


def _top_filtered_eig(G: Tensor, f: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
    """Top ``k`` eigenpairs of ``diag(f) G diag(f)`` from the rows where ``f ≠ 0`` only (truncation
    zeroes most of them: the kept or the null part of a spectrum), eigenvectors embedded back."""
    on = f != 0
    V = torch.zeros(f.numel(), 0, dtype=G.dtype, device=G.device)
    if not bool(on.any()):
        return torch.zeros(1, dtype=G.dtype, device=G.device), V
    s, Vs = _top_eig(f[on, None] * G[on][:, on] * f[None, on], k)
    V = torch.zeros(f.numel(), Vs.shape[1], dtype=G.dtype, device=G.device)
    V[on] = Vs
    return s, V


def modulus_from_matrices(
    H: Tensor, J: Tensor, tau: float = DEFAULT_TAU, filter: str = "truncate"
) -> tuple[float, float]:
    """``(κ, aubin_residual)`` from an explicit Hessian H (p×p) and data Jacobian J (p×m).

    The small dense reference: ``κ = ‖φ(H) J‖₂`` and ``‖(I − Hφ(H)) J‖₂ / ‖J‖₂``.

    >>> H = torch.tensor([[20., 10.], [10., 5.]], dtype=torch.float64)
    >>> J = torch.tensor([[4., 8.], [2., 4.]], dtype=torch.float64)
    >>> [round(v, 12) for v in modulus_from_matrices(H, J)]
    [0.4, 0.0]
    """
    lam, U = torch.linalg.eigh(0.5 * (H + H.T))
    lam_max = float(lam.abs().max())
    phi, null = _filter(lam, lam_max, tau, filter)
    UJ = U.T @ J
    kappa = float(torch.linalg.matrix_norm(phi[:, None] * UJ, ord=2))
    jn = float(torch.linalg.matrix_norm(J, ord=2))
    res = float(torch.linalg.matrix_norm(null[:, None] * UJ, ord=2)) / jn if jn > 0 else 0.0
    return kappa, res


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


# ==============================================================================================
# Empirical modulus: retraining
# ==============================================================================================
@dataclass
class EmpiricalRecord:
    """One retraining experiment: direction, size, and the measured set shift.

    ``shift`` = d(w′, S(x̄)) where w′ is warm-started retraining on the perturbed data from w̄,
    and the distance to the *original* solution set is measured the foundation way: retrain from
    w′ on the original data and take the distance moved (retrain.distance_to_solution_set).
    ``moved`` = ‖w′ − w̄‖ (includes motion along the old set, which costs nothing).
    """

    direction: str
    relative_step: float
    dx_norm: float
    shift: float
    moved: float
    ratio: float
    predicted_ratio: float | None
    retrain_grad_norm: float
    back_grad_norm: float
    seconds: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def empirical_modulus(
    problem: Problem,
    directions: dict[str, Perturbation],
    steps: Sequence[float],
    reference_norm: float,
    distance: Callable | None = None,
    predicted: dict[str, float] | None = None,
    progress: ProgressFn | None = None,
) -> list[EmpiricalRecord]:
    """Retrain along each unit direction at each relative step; ratio = shift / ‖Δx‖.

    ``directions`` map a name to a unit-norm Δx; the perturbation applied is
    ``step · reference_norm · Δx`` (reference_norm: ‖x̄_K‖, so steps are fractions of the data
    norm).  ``distance(problem, w, perturbation)`` defaults to
    :func:`setsens.retrain.distance_to_solution_set` (Levenberg–Marquardt for squared loss,
    L-BFGS otherwise).  ``predicted[name]`` (first-order ``‖H⁺JΔx‖/‖Δx‖``) is stored alongside.
    ``progress``: ``Progress("retraining", i, total, {direction, step, ratio})`` after each retraining.
    """
    if distance is None:
        from .retrain import distance_to_solution_set as distance
    out = []
    for name, unit in directions.items():
        nrm = unit.norm()
        if not (abs(nrm - 1.0) < 1e-6):
            raise ValueError(f"direction {name!r} must have unit norm, has {nrm:.6g}")
        for step in steps:
            if step <= 0:
                raise ValueError(f"steps must be positive, got {step}")
            t0 = time.perf_counter()
            pert = unit.scaled(step * reference_norm)
            fwd = distance(problem, problem.params, pert)
            back = distance(problem, fwd.w, None)
            dx = pert.norm()
            rec = EmpiricalRecord(
                direction=name, relative_step=float(step), dx_norm=dx, shift=back.distance,
                moved=fwd.distance, ratio=back.distance / dx,
                predicted_ratio=None if predicted is None else predicted.get(name),
                retrain_grad_norm=fwd.grad_norm, back_grad_norm=back.grad_norm,
                seconds=time.perf_counter() - t0,
            )
            out.append(rec)
            report(progress, "retraining", len(out), len(directions) * len(steps), direction=name, step=step,
                   ratio=rec.ratio)
    return out


# ==============================================================================================
# The toy example
# ==============================================================================================
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
