"""Theorem 4: a Rademacher-complexity bound on the robust error under weight perturbations.

For the class W = {W : ‖Wˡ‖_∞ ≤ M_l}, inputs with ‖x‖_∞ ≤ B, n samples and the ramp loss φ_γ
applied to the surrogate margin m̃_{yi} = m_{yi} − η_{yi}:

    R_S ≤ (K(K−1)/γ) [ 2^d Π_l M_l · B · √(2 log(2 n₀) / n) + (M_d (P̄_ε − P̄) + ε_d P̄_ε) B / √n ]

and with probability ≥ 1 − δ, for every W ∈ W:
Pr[∃ Ŵ ∈ B_ε(W) misclassifying x] ≤ (1/n) Σ_j φ_γ(min_{i≠y_j} m̃_{y_j i}) + 2 R_S + 3 √(log(2/δ) / (2n)).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .bounds import product_gap
from .certify import certified_margin
from .network import check_eps, check_inputs, check_weights, layer_norms

__all__ = ["ramp", "robust_surrogate_loss", "rademacher_bound", "theorem4_bound"]


def ramp(t: Tensor, gamma: float) -> Tensor:
    """φ_γ(t): 1 for t ≤ 0, 1 − t/γ on (0, γ), 0 for t ≥ γ.

    >>> ramp(torch.tensor([-1., 0.5, 2.]), 1.0)
    tensor([1.0000, 0.5000, 0.0000])
    """
    if not gamma > 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    return (1 - t / gamma).clamp(0.0, 1.0)


def robust_surrogate_loss(weights, x, y, eps, gamma: float, activation="relu") -> Tensor:
    """ℓ̃_j = φ_γ(min_{i≠y_j} (m_{y_j i} − η_{y_j i})) per input, shape (N,); ≥ the worst-case 0-1 loss over B_ε."""
    return ramp(certified_margin(weights, x, y, eps, activation=activation), gamma)


def rademacher_bound(norms, eps, B: float, n: int, n0: int, K: int, gamma: float) -> dict:
    """The two terms of the Theorem 4 bound on R_S(ℓ̃ ∘ W) and their sum (plain floats)."""
    M = torch.as_tensor(norms, dtype=torch.float64).detach().flatten()
    d = M.numel()
    e = check_eps(torch.as_tensor(eps, dtype=torch.float64).detach(), d, M)
    if n < 1 or n0 < 1 or K < 2 or not gamma > 0 or not B >= 0:
        raise ValueError("need n ≥ 1, n0 ≥ 1, K ≥ 2, gamma > 0, B ≥ 0")
    Pbar = float(torch.prod(M[:-1]))
    Pbar_e = float(torch.prod(M[:-1] + e[:-1]))
    gap = float(product_gap(M[:-1], e[:-1]))
    c = K * (K - 1) / gamma
    t1 = c * (2.0**d) * float(torch.prod(M)) * B * math.sqrt(2 * math.log(2 * n0) / n)
    t2 = c * (float(M[-1]) * gap + float(e[-1]) * Pbar_e) * B / math.sqrt(n)
    return {"complexity_term": t1, "perturbation_term": t2, "rademacher": t1 + t2, "P_bar": Pbar, "P_bar_eps": Pbar_e}


@torch.no_grad()
def theorem4_bound(weights: Sequence[Tensor], x: Tensor, y: Tensor, eps, gamma: float, delta: float = 0.05,
                   activation="relu") -> dict:
    """Evaluate Theorem 4 for a trained model on its training set (x, y).

    M_l are the model's own norms and B = max_j ‖x_j‖_∞ (so W is the smallest class in the
    theorem's family containing the model; a bound uniform over a grid of (M, γ) would add a
    union-bound term).  Returns the empirical robust surrogate loss, R_S, the confidence term and
    the bound on Pr[∃ Ŵ ∈ B_ε(W) misclassifying x].
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    weights = [w.detach() for w in check_weights(weights)]
    x = check_inputs(weights, x)
    n, n0 = x.shape
    K = weights[-1].shape[0]
    emp = float(robust_surrogate_loss(weights, x, y, eps, gamma, activation).mean())
    e = check_eps(eps, len(weights), weights[0])
    rad = rademacher_bound(layer_norms(weights), e, float(x.abs().max()), n, n0, K, gamma)
    conf = 3 * math.sqrt(math.log(2 / delta) / (2 * n))
    return {
        "gamma": gamma,
        "delta": delta,
        "n": n,
        "empirical_surrogate_loss": emp,
        **rad,
        "confidence_term": conf,
        "bound": emp + 2 * rad["rademacher"] + conf,
    }
