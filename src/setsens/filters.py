"""Cheap predictions at w̄ that name their reference: the linearised-training filter and the proximal response.

Linearise the perturbed and the clean fine-tuning around w̄ with the Gauss–Newton matrix 𝒢 (PSD) as the
curvature.  Their difference d_t obeys, for SGD with momentum μ and step η (``torch.optim``'s update),

    g_t = 𝒢 d_t + b,   buf_t = μ buf_{t−1} + g_t,   d_{t+1} = d_t − η (g_t + μ buf_t)   (Nesterov; else buf_t),

with b = J Δx the gradient change the move causes (the common drift cancels).  On each eigenvector of 𝒢 this is a
scalar recurrence, so ``d_T = −φ_T(𝒢) b`` with a filter φ_T that tends to 1/λ on well-trained directions and grows
like ηT on flat ones.  :func:`ggn_filter` applies it matrix-free: Lanczos on 𝒢 from b (k products) and the
recurrence run on the k Ritz values (k·T scalar steps, no T products).  It predicts the budget response
(:func:`setsens.retrain.training_response`) to the extent the network is linear in w over the run; on the
indefinite Hessian the same filter blows up along negative curvature with momentum, which is why 𝒢 is used.

:func:`proximal_prediction` is the damped Gauss–Newton solve ``−(𝒢 + λI)⁻¹ b``: the first-order proximal Bregman
response (Bae et al. 2022), the quantity influence functions estimate; its reference is
:func:`setsens.retrain.pbrf_response` with the same λ.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .finetune import Training, resolve_lr
from .krylov import lanczos, minres
from .operators import DataJacobian, Damped, GaussNewtonMatrix
from .problem import Perturbation, Problem

__all__ = ["Prediction", "momentum_filter", "filtered", "budget_filter", "ggn_filter", "proximal_prediction"]


@dataclass
class Prediction:
    """A predicted change of the weights, what it predicts (``reference``), and what it cost.  ``error``: the
    change of the prediction between k/2 and k Lanczos steps (filter) or the solve's relative residual (PBRF)."""

    method: str
    shift: Tensor
    reference: str
    error: float
    products: int
    seconds: float


def momentum_filter(values: Tensor, training: Training) -> Tensor:
    """φ_T(λ) for each eigenvalue λ: ``d_T = −φ_T(λ) b`` under the recurrence of the module doc (SGD with the
    training's momentum, Nesterov or not, lr and steps; its weight decay adds to λ)."""
    if training.optimizer != "sgd":
        raise ValueError(f"the linearised-training filter models SGD, not {training.optimizer}: use the tangent")
    lam = values.double() + training.weight_decay
    d, buf = torch.zeros_like(lam), torch.zeros_like(lam)
    mu, eta = training.momentum, training.lr
    for t in range(1, training.steps + 1):
        g = lam * d + 1.0  # b = 1 per mode: the filter is −d_T
        buf = mu * buf + g if t > 1 else g
        d = d - eta * ((g + mu * buf if training.nesterov else buf) if mu else g)
    return -d


def filtered(problem: Problem, v: Tensor, training: Training, rank: int = 40,
             gauss_newton: GaussNewtonMatrix | None = None) -> Tensor:
    """``φ_T(𝒢) v`` (see the module doc) by ``rank`` Lanczos steps on the Gauss–Newton matrix from ``v``; ``training``
    with its lr resolved (:func:`~setsens.finetune.resolve_lr`).  φ_T(𝒢) is symmetric, so the same call gives the
    adjoint (the sensitivity of an objective of the weights to b).  Cost: ``rank`` Gauss–Newton products (counted
    in ``gauss_newton.calls`` when given)."""
    run = lanczos(gauss_newton or GaussNewtonMatrix(problem), v, rank)
    Y = run.basis[0]
    return (Y @ (momentum_filter(run.values, training) * (Y.T @ v.double()))).to(v)


def budget_filter(problem: Problem, training: Training, rank: int = 40, factor=None) -> Callable[[Tensor], Tensor]:
    """``v ↦ φ_T(𝒢) v`` for v (p,) or rows (m, p), ``training`` with its lr resolved.  Given a
    :class:`~setsens.audit.GramFactor` on an exact path: exactly, ``φ_T(λ) v + Gᵀ R diag((φ_T(λ + μ) −
    φ_T(λ))/μ) Rᵀ G v`` from its Gauss–Newton spectrum (μ, R; λ the weight decay) — φ_T on 𝒢's range, φ_T(λ)
    on the rest; cost per call a G and a Gᵀ product (one per-sample Jacobian pass each for m ≥ K rows).
    Otherwise (no factor, or the Nyström sketch) :func:`filtered`: ``rank`` Lanczos steps from each v, exact
    only once ``rank`` reaches 𝒢's rank."""
    if factor is None or factor.gram_inverse.approximate:
        return lambda v: (torch.stack([filtered(problem, row, training, rank) for row in v]) if v.ndim == 2
                          else filtered(problem, v, training, rank))
    mu, R = factor.gauss_newton_spectrum
    floor = torch.full((1,), problem.weight_decay, dtype=torch.float64)
    at_zero = float(momentum_filter(floor, training))
    coefficient = (momentum_filter(mu + problem.weight_decay, training) - at_zero) / mu

    def apply(v: Tensor) -> Tensor:
        rows = v.reshape(-1, problem.p)
        out = at_zero * rows + factor.vjp(((factor.jvp(rows) @ R) * coefficient) @ R.T).to(rows)
        return out.reshape(v.shape)

    return apply


def ggn_filter(problem: Problem, perturbation: Perturbation, training: Training = Training(), *,
               rank: int = 40) -> Prediction:
    """``−φ_T(𝒢) b`` by ``rank`` Lanczos steps on the Gauss–Newton matrix from b (see the module doc); predicts
    the budget response of ``training`` (full batch).  Cost: ``rank`` + ``rank/2`` Gauss–Newton products (the
    second, shorter run measures the Lanczos error) and one forward-over-reverse pass."""
    t0 = time.perf_counter()
    training = resolve_lr(problem, training)
    b = DataJacobian(problem, perturbation.indices) @ perturbation.delta
    G = GaussNewtonMatrix(problem)
    full, half = (filtered(problem, b, training, k, G) for k in (rank, max(rank // 2, 1)))
    error = float((full - half).norm() / full.norm().clamp_min(1e-300))
    return Prediction("ggn-filter", -full, "training_response (" + training.describe() + ")", error, G.calls,
                      time.perf_counter() - t0)


def proximal_prediction(problem: Problem, perturbation: Perturbation, damping: float, *, maxiter: int = 200,
                        rtol: float = 1e-8) -> Prediction:
    """``−(𝒢 + λI)⁻¹ b`` by MINRES; predicts :func:`setsens.retrain.pbrf_response` with the same λ (not the plain
    :func:`setsens.retrain.proximal_response`, whose curvature is H).
    Cost: one Gauss–Newton product per iteration."""
    if not damping > 0:
        raise ValueError(f"the proximal response needs a damping λ > 0, got {damping}")
    t0 = time.perf_counter()
    b = DataJacobian(problem, perturbation.indices) @ perturbation.delta
    G = GaussNewtonMatrix(problem)
    A = Damped(G, damping)
    run = minres(A, -b, maxiter=maxiter, rtol=rtol)
    v = run.x.to(b)
    error = float((A(v) + b).norm() / b.norm())
    return Prediction("pbrf", v, f"pbrf_response (λ = {damping:g})", error, G.calls, time.perf_counter() - t0)
