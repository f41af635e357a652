"""A poisoning certificate proved end to end for convex models: least squares and L2-regularised
logistic (binary or softmax) regression on a linear model.  No first-order step: the retrained
*minimiser* itself is bounded, by strong convexity and the Lipschitz continuity of the gradient in x.

**Setting.**  Features ``x_i ∈ R^d`` (optionally with a constant 1 appended, the intercept: ``x̃_i =
(x_i, 1)``; it is never perturbed and is penalised by λ like every other weight), targets ``y_i``, a
linear model with weights w (a vector of length d̃, or a C × d̃ matrix W for softmax, flattened row by
row; ``‖·‖`` is the Euclidean / Frobenius norm), and

    L(w; X) = (1/n) Σ_i ℓ(w; x̃_i, y_i) + (λ/2) ‖w‖²,

with ℓ = ½(wᵀx̃ − y)² (``"squared"``), log(1 + e^{wᵀx̃}) − y wᵀx̃ (``"logistic"``, y ∈ [0, 1]) or
logsumexp(W x̃) − (W x̃)_y (``"softmax"``, y a class index).  The adversary picks ANY K training points
and moves each in ℓ2 by at most δ: ``‖x'_k − x_k‖₂ ≤ δ`` (absolute, per point), labels fixed.

**Theorem.**  Let μ be a strong-convexity constant of L(·; X') valid for every admissible X', and
``b_k(δ; w) ≥ sup_{‖Δ‖₂≤δ} ‖∇_w ℓ(w; x_k + Δ, y_k) − ∇_w ℓ(w; x_k, y_k)‖``.  Then for ANY w (the
computed minimiser, or a user's approximately trained weights) and every admissible X', the retrained
minimiser w*(X') = argmin L(·; X') exists, is unique, and

    ‖w*(X') − w‖ ≤ ρ(δ, K) := ( ‖∇_w L(w; X)‖ + (1/n) Σ_{K largest} b_k(δ; w) ) / μ.

*Proof.*  L' = L(·; X') is continuous and μ-strongly convex, so w* exists, is unique and ∇L'(w*) = 0.
Strong convexity gives ⟨∇L'(w) − ∇L'(w*), w − w*⟩ ≥ μ‖w − w*‖², and Cauchy–Schwarz ‖w − w*‖ ≤
‖∇L'(w)‖/μ.  Now ∇L'(w) = ∇L(w; X) + (1/n) Σ_{k moved} [∇ℓ(w; x'_k) − ∇ℓ(w; x_k)]: by the triangle
inequality its norm is at most ‖∇L(w; X)‖ + (1/n) Σ_{k moved} b_k, and the sum over any K points is at
most the sum of the K largest b_k.  ∎  The first term is the inexactness of w: with δ = 0 the theorem
says ‖w̄ − w‖ ≤ ‖∇L(w)‖/μ for the exact clean minimiser w̄, so the ball around the computed w holds
w̄ and every retrained minimiser.

**The constants** (r_k = wᵀx̃_k − y_k, s_k = wᵀx̃_k, w_f the weights of the d perturbable features,
T = δ‖w_f‖₂, spectral norm for a matrix):

* μ.  ℓ is convex in w for every x, so ∇²L' ⪰ λI: μ = λ (logistic, softmax; λ > 0 required).  For
  least squares ∇²L' = X̃'ᵀX̃'/n + λI, and X̃' = X̃ + E with at most K non-zero rows of norm ≤ δ, so
  ‖E‖₂ ≤ ‖E‖_F ≤ √K δ and Weyl's inequality for singular values gives σ_min(X̃') ≥ σ_min(X̃) − √K δ:
  μ = λ + max(0, σ_min(X̃) − √K δ − ε_svd)²/n, ε_svd = 64·ε·max(n, d̃)·σ_max(X̃) a rounding allowance
  for the computed σ_min.  (The clean Gram's λ_min alone is NOT valid for X'.)  μ = 0 gives ρ = ∞.
* b_k, least squares: ∇ℓ = x̃ r, so the difference is Δ(r + t) + x̃ t with t = Δᵀw_f, |t| ≤ T:
  b_k = δ(|r_k| + T) + ‖x̃_k‖T.
* b_k, logistic: ∇ℓ = x̃(σ(s) − y); the difference is Δ(σ(s+t) − y) + x̃(σ(s+t) − σ(s)), of norm ≤
  f(u) = δ|u − y| + ‖x̃‖|u − σ(s)| with u = σ(s + t).  f is convex in u and u ranges over
  [σ(s − T), σ(s + T)], so the sup is attained at an end: b_k = max(f(σ(s_k − T)), f(σ(s_k + T))) —
  exact for this triangle bound.
* b_k, softmax: ∇ℓ = (p − e_y) x̃ᵀ with p = softmax(W x̃); the difference is (p' − e_y)Δᵀ + (p' − p)x̃ᵀ,
  of norm ≤ δ‖p' − e_y‖ + ‖x̃‖‖p' − p‖.  p depends on the logits only up to a common shift, so the move that
  counts is u = P W_fΔ (P = I − 11ᵀ/C centres over the classes), ‖u‖ ≤ T := δ‖P W_f‖₂.  Each log p_i moves by
  |u_i − Σ_j p_j u_j| ≤ max_j |u_i − u_j| ≤ √2‖u‖ ≤ a := √2 T along the segment, so p_i and 1 − p_i = Σ_{j≠i} p_j
  stay within factors e^{±a}: p'_i ∈ [l_i, h_i] = [max(p_i e^{−a}, 1 − (1 − p_i)e^{a}), min(p_i e^{a},
  1 − (1 − p_i)e^{−a})].  The softmax Jacobian diag(p) − ppᵀ is PSD, annihilates 1, and has λ_max ≤
  2 max_i p_i(1 − p_i) ≤ ½ (Gershgorin), so ‖p' − p‖ ≤ q := min(L T, √2) with L = min(½, 2 max_i
  sup_{[l_i, h_i]} t(1 − t)) (√2: two probability vectors are at most that far apart); and ‖p' − e_y‖ ≤
  min(‖p − e_y‖ + q, √2(1 − l_y)) (‖p' − e_y‖² = (1 − p'_y)² + Σ_{j≠y} p'_j² ≤ 2(1 − p'_y)²):
  b_k = δ·that + ‖x̃_k‖ q.

**Certificate.**  A linear model's margin moves at most as far as its weights let it: binary
(squared: the sign of wᵀx̃, the least-squares classifier with ±1 targets; logistic: the logit's sign)
``|Δ(wᵀx̃)| ≤ ‖x̃‖ ρ``; softmax ``m_cj = (W_c − W_j)ᵀx̃`` changes by at most ``‖x̃‖‖ΔW_c − ΔW_j‖ ≤
√2 ‖x̃‖ ‖ΔW‖_F``.  A prediction at w is certified at δ when its margin exceeds that bound with ρ(δ, K):
then the exactly retrained model on ANY admissible poisoning predicts the same class.  ρ grows with δ,
so each point also gets its radius, the largest certified δ (bisection).

Proved up to floating-point rounding of the bound's own arithmetic (relative ~1e-15) and of the SVD
(allowed for above).  Compare :mod:`setsens.certificate`, whose certificates are first order in the set;
:func:`first_order_move_bound` is that first-order move (−H⁻¹ ∂²L/∂w∂x Δx) for the same convex problem, to
measure what the proof costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .certificate import CertifiedFractions

__all__ = ["ConvexModel", "ConvexCertificate", "objective", "gradient", "hessian", "minimiser", "strong_convexity",
           "point_bounds", "predict", "move_bound", "first_order_move_bound", "convex_certificate"]

LOSSES = ("squared", "logistic", "softmax")
_SQRT2 = 2.0 ** 0.5


@dataclass(frozen=True, eq=False)
class ConvexModel:
    """A convex training problem: ``features`` (n, d), ``targets`` (n,), ``loss`` in
    ``"squared"``, ``"logistic"`` (targets in [0, 1]) or ``"softmax"`` (class indices < ``classes``),
    L2 weight ``l2`` = λ (> 0 for the logistic losses; least squares with λ = 0 needs full column rank),
    ``intercept``: append a constant, unperturbed feature 1 (penalised by λ too).  Stored in float64."""

    features: Tensor
    targets: Tensor
    loss: str = "squared"
    l2: float = 0.0
    intercept: bool = False
    classes: int | None = None

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        x = torch.as_tensor(self.features, dtype=torch.float64)
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"features must be (n, d) with n ≥ 1, got shape {tuple(x.shape)}")
        y = torch.as_tensor(self.targets)
        if y.shape != (len(x),):
            raise ValueError(f"targets must have shape ({len(x)},), got {tuple(y.shape)}")
        if not (self.l2 >= 0 and self.l2 < float("inf")):
            raise ValueError(f"l2 must be finite and ≥ 0, got {self.l2}")
        if self.loss != "squared" and self.l2 <= 0:
            raise ValueError(f"the {self.loss} loss needs l2 > 0 (its only strong convexity, μ = λ)")
        classes = self.classes
        if self.loss == "softmax":
            y = y.long()
            classes = int(y.max()) + 1 if classes is None else int(classes)
            if classes < 2 or y.min() < 0 or y.max() >= classes:
                raise ValueError(f"softmax targets must be class indices in [0, {classes}) with ≥ 2 classes")
        else:
            y = y.to(torch.float64)
            if self.loss == "logistic" and ((y < 0) | (y > 1)).any():
                raise ValueError("logistic targets must lie in [0, 1]")
            if classes is not None:
                raise ValueError("classes is for the softmax loss only")
            classes = None
        if not torch.isfinite(x).all() or (y.is_floating_point() and not torch.isfinite(y).all()):
            raise ValueError("features and targets must be finite")
        object.__setattr__(self, "features", x)
        object.__setattr__(self, "targets", y)
        object.__setattr__(self, "classes", classes)

    @property
    def n(self) -> int:
        return len(self.features)

    @property
    def d(self) -> int:
        """The number of perturbable features (the intercept excluded)."""
        return self.features.shape[1]

    @property
    def outputs(self) -> int:
        return self.classes if self.loss == "softmax" else 1

    @property
    def p(self) -> int:
        return self.outputs * (self.d + int(self.intercept))

    def design(self, features: Tensor | None = None) -> Tensor:
        """x̃: the features (default the training ones) with the intercept's column of ones if any."""
        x = self.features if features is None else torch.as_tensor(features, dtype=torch.float64)
        x = x.reshape(len(x), -1)
        if x.shape[1] != self.d:
            raise ValueError(f"features must have {self.d} columns, got {x.shape[1]}")
        return torch.cat([x, x.new_ones(len(x), 1)], 1) if self.intercept else x

    def weights(self, w: Tensor) -> Tensor:
        """The flat w as the (outputs, d̃) matrix W."""
        return torch.as_tensor(w, dtype=torch.float64).reshape(self.outputs, -1)

    def scores(self, w: Tensor, features: Tensor | None = None) -> Tensor:
        """Wx̃ per point: (m, outputs)."""
        return self.design(features) @ self.weights(w).T


def _residuals(model: ConvexModel, z: Tensor) -> Tensor:
    """∂ℓ/∂z per point at scores z (n, outputs): the per-sample gradient is residualᵀ x̃."""
    y = model.targets
    if model.loss == "squared":
        return z - y[:, None]
    if model.loss == "logistic":
        return torch.sigmoid(z) - y[:, None]
    return torch.softmax(z, 1) - torch.nn.functional.one_hot(y, model.classes).to(z)


def objective(model: ConvexModel, w: Tensor, features: Tensor | None = None) -> Tensor:
    """L(w; X) (default the training features X; pass X' for a perturbed problem)."""
    z, y = model.scores(w, features), model.targets
    if model.loss == "squared":
        per = 0.5 * (z[:, 0] - y) ** 2
    elif model.loss == "logistic":
        per = torch.nn.functional.softplus(z[:, 0]) - y * z[:, 0]
    else:
        per = torch.logsumexp(z, 1) - z.gather(1, y[:, None])[:, 0]
    w = torch.as_tensor(w, dtype=torch.float64)
    return per.mean() + 0.5 * model.l2 * (w * w).sum()


def gradient(model: ConvexModel, w: Tensor, features: Tensor | None = None) -> Tensor:
    """∇_w L(w; X), flat."""
    x = model.design(features)
    e = _residuals(model, x @ model.weights(w).T)
    return (e.T @ x / model.n).reshape(-1) + model.l2 * torch.as_tensor(w, dtype=torch.float64).reshape(-1)


def hessian(model: ConvexModel, w: Tensor, features: Tensor | None = None) -> Tensor:
    """∇²_w L(w; X), dense p × p (flat w, row-major W)."""
    x = model.design(features)
    z = x @ model.weights(w).T
    if model.loss == "squared":
        h = x.T @ x / model.n
    elif model.loss == "logistic":
        s = torch.sigmoid(z[:, 0])
        h = (x * (s * (1 - s))[:, None]).T @ x / model.n
    else:
        q = torch.softmax(z, 1)
        S = torch.diag_embed(q) - q[:, :, None] * q[:, None, :]  # (n, C, C)
        h = torch.einsum("icj,ia,ib->cajb", S, x, x).reshape(model.p, model.p) / model.n
    return h + model.l2 * torch.eye(model.p, dtype=torch.float64)


def minimiser(model: ConvexModel, tol: float = 1e-10, maxiter: int = 100) -> Tensor:
    """The minimiser w̄ of L(·; X), flat.  Least squares: the closed form (``torch.linalg.lstsq`` on
    [X̃/√n; √λ I] w = [y/√n; 0], i.e. (X̃ᵀX̃/n + λI) w = X̃ᵀy/n); logistic and softmax: Newton with a
    backtracking line search from 0 until ‖∇L‖ ≤ ``tol``.  Raises ``RuntimeError`` if the gradient norm at
    the result exceeds ``tol`` (the certificates would still hold: they add ‖∇L(w)‖/μ)."""
    if model.loss == "squared":
        x, n = model.design(), model.n
        A, b = x / n ** 0.5, model.targets / n ** 0.5
        if model.l2 > 0:
            A = torch.cat([A, model.l2 ** 0.5 * torch.eye(model.p, dtype=torch.float64)])
            b = torch.cat([b, b.new_zeros(model.p)])
        elif torch.linalg.matrix_rank(x) < model.p:
            raise ValueError("least squares with l2 = 0 needs features (with the intercept) of full column rank")
        w = torch.linalg.lstsq(A, b[:, None], driver="gelsd").solution[:, 0]
        g = float(gradient(model, w).norm())
        if g > tol * max(1.0, float(torch.linalg.matrix_norm(A, 2) * b.norm())):
            raise RuntimeError(f"minimiser: least squares left ‖∇L‖ = {g:.3g}")
        return w
    w = torch.zeros(model.p, dtype=torch.float64)
    f = objective(model, w)
    for _ in range(maxiter):
        g = gradient(model, w)
        if g.norm() <= tol:
            return w
        step = torch.linalg.solve(hessian(model, w), g)
        t = 1.0
        while True:  # backtracking (Armijo, or a smaller gradient: near w̄ rounding hides the decrease of L)
            trial = w - t * step
            ft = objective(model, trial)
            if ft <= f - 1e-4 * t * (g @ step) or gradient(model, trial).norm() < g.norm() or t < 1e-12:
                break
            t *= 0.5
        w, f = trial, ft
    g = float(gradient(model, w).norm())
    if g > tol:
        raise RuntimeError(f"minimiser: Newton stopped at ‖∇L‖ = {g:.3g} > tol = {tol:g} after {maxiter} steps")
    return w


def strong_convexity(model: ConvexModel, delta=0.0, points: int = 0) -> float | Tensor:
    """μ: a strong-convexity constant of L(·; X') valid for EVERY X' with at most ``points`` rows moved
    by at most ``delta`` each (λ; for least squares plus the Weyl bound (σ_min(X̃) − √K δ)₊²/n).  A number δ →
    float; a 1-d tensor of budgets → tensor."""
    deltas = torch.as_tensor(delta, dtype=torch.float64)
    mu = torch.full_like(deltas, float(model.l2))
    if model.loss == "squared" and model.n >= model.p:  # else X̃ᵀX̃ is singular: λ alone
        s = torch.linalg.svdvals(model.design())
        slack = 64 * torch.finfo(torch.float64).eps * max(model.n, model.p) * float(s[0])
        smin = torch.clamp(float(s[-1]) - points ** 0.5 * deltas - slack, min=0.0)
        mu = mu + smin ** 2 / model.n
    return float(mu) if deltas.ndim == 0 else mu


def point_bounds(model: ConvexModel, delta, w: Tensor) -> Tensor:
    """b_k(δ; w) for every training point: a bound on ‖∇_w ℓ(w; x_k + Δ) − ∇_w ℓ(w; x_k)‖ over ‖Δ‖₂ ≤ δ
    (the module docstring derives each).  ``delta`` a number → (n,); a 1-d tensor of m budgets → (m, n)."""
    deltas = torch.as_tensor(delta, dtype=torch.float64)
    scalar = deltas.ndim == 0
    deltas = deltas.reshape(-1, 1)  # (m, 1)
    if (deltas < 0).any():
        raise ValueError("the budget δ must be ≥ 0")
    x = model.design()
    W = model.weights(w)
    xn = x.norm(dim=1)  # ‖x̃_k‖
    Wf = W[:, :model.d]
    if model.loss == "softmax":  # the centred logit map: a common shift of the logits leaves p unchanged
        T = deltas * float(torch.linalg.matrix_norm(Wf - Wf.mean(0), 2))
    else:
        T = deltas * float(Wf.norm())
    z = x @ W.T
    y = model.targets
    if model.loss == "squared":
        b = deltas * ((z[:, 0] - y).abs() + T) + xn * T
    elif model.loss == "logistic":
        s = z[:, 0]
        f = lambda u: deltas * (u - y).abs() + xn * (u - torch.sigmoid(s)).abs()
        b = torch.maximum(f(torch.sigmoid(s - T)), f(torch.sigmoid(s + T)))
    else:
        logp = torch.log_softmax(z, 1)  # (n, C)
        e = logp.exp() - torch.nn.functional.one_hot(y, model.classes).to(z)
        a = (_SQRT2 * T)[..., None]  # (m, 1, 1): the largest move of any log p_i
        log1mp = torch.log1p(-logp.exp().clamp(max=1.0))  # log(1 − p_i)
        hi = torch.minimum((logp + a).clamp(max=0.0).exp(), 1 - (log1mp - a).exp())  # (m, n, C): p'_i ≤ hi
        lo = torch.maximum((logp - a).exp(), 1 - (log1mp + a).exp())  # p'_i ≥ lo
        h = torch.where(hi < 0.5, hi * (1 - hi), torch.where(lo > 0.5, lo * (1 - lo), torch.full_like(lo, 0.25)))
        q = torch.clamp(torch.clamp(2 * h.amax(2), max=0.5) * T, max=_SQRT2)  # ≥ ‖p' − p‖, (m, n)
        ly = lo.gather(2, y[None, :, None].expand(len(lo), -1, 1))[..., 0]
        b = deltas * torch.minimum(e.norm(dim=1) + q, _SQRT2 * (1 - ly)) + xn * q
    return b[0] if scalar else b


def move_bound(model: ConvexModel, delta, points: int, w: Tensor | None = None) -> float | Tensor:
    """ρ(δ, K): every retrained minimiser w*(X'), X' any move of ``points`` training points by at most
    ``delta`` each (ℓ2), satisfies ‖w*(X') − w‖ ≤ ρ — the theorem of the module docstring, the inexactness
    ‖∇L(w)‖/μ included.  ``w`` defaults to :func:`minimiser`.  A number δ → float; a 1-d tensor → tensor."""
    _check_points(model, points)
    w = minimiser(model) if w is None else torch.as_tensor(w, dtype=torch.float64).reshape(-1)
    deltas = torch.as_tensor(delta, dtype=torch.float64)
    rho = _rho(model, deltas.reshape(-1), points, w, float(gradient(model, w).norm()))
    return float(rho[0]) if deltas.ndim == 0 else rho


def _rho(model: ConvexModel, deltas: Tensor, points: int, w: Tensor, g0: float) -> Tensor:
    b = point_bounds(model, deltas, w)  # (m, n)
    total = b.topk(points, dim=1).values.sum(1) if points else torch.zeros(len(deltas), dtype=torch.float64)
    mu = strong_convexity(model, deltas, points)
    rho = (g0 + total / model.n) / mu
    return torch.where(mu > 0, rho, torch.full_like(rho, float("inf")))


def first_order_move_bound(model: ConvexModel, delta: float, points: int, w: Tensor | None = None) -> float:
    """The first-order (influence-function) move for comparison: v = −H⁻¹ J Δx with H = ∇²_w L(w; X) and
    J_k = (1/n) ∂²ℓ(w; x_k)/∂w∂x_k (p × d); its worst size over K points moved by ‖Δx_k‖ ≤ δ is at most
    δ Σ_{K largest} ‖H⁻¹ J_k‖₂ — equal to it for K = 1, an upper bound for K > 1 (attained when the points'
    top singular directions align).  Exact Hessian, dense (small problems)."""
    _check_points(model, points)
    w = minimiser(model) if w is None else torch.as_tensor(w, dtype=torch.float64).reshape(-1)
    W = model.weights(w)

    def grad_one(xk, yk):  # ∇_w ℓ(w; x_k, y_k), flat
        xt = torch.cat([xk, xk.new_ones(1)]) if model.intercept else xk
        z = W @ xt
        if model.loss == "squared":
            e = z - yk
        elif model.loss == "logistic":
            e = torch.sigmoid(z) - yk
        else:
            e = torch.softmax(z, 0) - (torch.arange(model.classes) == yk).to(z)
        return torch.outer(e, xt).reshape(-1)

    J = torch.func.vmap(torch.func.jacfwd(grad_one), (0, 0))(model.features, model.targets) / model.n  # (n, p, d)
    M = torch.linalg.solve(hessian(model, w), J)  # H⁻¹ J_k, batched over k
    s = torch.linalg.matrix_norm(M, 2)  # (n,)
    return float(delta) * float(s.topk(points).values.sum()) if points else 0.0


@dataclass
class ConvexCertificate(CertifiedFractions):
    """``certified[i, j]``: held-out point j's prediction at w is kept by the exactly retrained model on
    every move of ``points`` training points with ``‖Δx_k‖₂ ≤ deltas[i]`` (absolute; proved, see the module
    docstring).  ``rho[i]`` = ρ(δ_i, K); ``margins`` the predictions' margins at w; ``scale`` what one unit of
    ‖Δw‖ can do to each margin (‖x̃‖, or √2‖x̃‖ for softmax); ``radius`` each point's largest certified δ
    (a lower end of a bisection, so certified there)."""

    deltas: Tensor
    points: int
    predictions: Tensor
    margins: Tensor
    scale: Tensor
    rho: Tensor
    certified: Tensor
    radius: Tensor


def predict(model: ConvexModel, w: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(class, margin) at w for each row of ``x``: binary (squared, logistic) class 1 if wᵀx̃ ≥ 0 else 0, margin
    |wᵀx̃|; softmax the argmax c and min_{j≠c} (W_c − W_j)ᵀx̃."""
    z = model.scores(w, x)
    if model.outputs == 1:
        return (z[:, 0] >= 0).long(), z[:, 0].abs()
    c = z.argmax(1)
    m = z.gather(1, c[:, None]) - z
    m.scatter_(1, c[:, None], float("inf"))
    return c, m.amin(1)


def convex_certificate(model: ConvexModel, x: Tensor, deltas, points: int, w: Tensor | None = None,
                       bisections: int = 60) -> ConvexCertificate:
    """Certify the predictions at held-out ``x`` (m, d) against every move of ``points`` training points by at
    most δ (ℓ2, absolute) for each δ in ``deltas``, and give each point its radius.  ``w`` defaults to
    :func:`minimiser`.  Cost: one ρ per δ (O(n) each, plus one SVD for least squares), ``bisections`` ρ's
    (vectorised over the points) for the radii."""
    _check_points(model, points)
    w = minimiser(model) if w is None else torch.as_tensor(w, dtype=torch.float64).reshape(-1)
    deltas = torch.as_tensor(deltas, dtype=torch.float64).reshape(-1)
    if (deltas < 0).any():
        raise ValueError("the budgets δ must be ≥ 0")
    g0 = float(gradient(model, w).norm())
    c, m = predict(model, w, x)
    scale = model.design(x).norm(dim=1) * (_SQRT2 if model.outputs > 1 else 1.0)
    rho = _rho(model, deltas, points, w, g0)
    certified = m[None] > scale[None] * rho[:, None]
    # radius: ρ is non-decreasing in δ (each b_k is a sup over a growing ball; μ shrinks), so bisect on the
    # test that certifies, margin > scale·ρ(δ)
    good = lambda d: m > scale * _rho(model, d, points, w, g0)
    lo = torch.zeros_like(m)
    ok0 = good(lo)
    hi = torch.ones_like(m)
    for _ in range(200):  # grow hi until it fails
        grow = ok0 & good(hi)
        if not grow.any():
            break
        hi = torch.where(grow, 2 * hi, hi)
    for _ in range(bisections):
        mid = (lo + hi) / 2
        ok = good(mid)
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    radius = torch.where(ok0, lo, torch.zeros_like(lo))
    return ConvexCertificate(deltas, points, c, m, scale, rho, certified, radius)


def _check_points(model: ConvexModel, points: int) -> None:
    if not 0 <= points <= model.n:
        raise ValueError(f"points must be in [0, {model.n}], got {points}")
