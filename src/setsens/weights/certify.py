"""Certificates: predictions that no weight perturbation in the budget set can change.

If m_{yi}(x) > η_{yi}(x) for every i ≠ y, then for every Ŵ with ‖Ŵˡ − Wˡ‖_∞ ≤ ε_l the margin
m̂_{yi} ≥ m_{yi} − η_{yi} > 0, so argmax f(x|Ŵ) = y.  The paper / clean certificates cost one forward pass and
one evaluation of the bound (O(N K) after the K×K table of last-layer row distances).  Any lower bound on m̂_{yi}
certifies the same way: ``bound="interval"`` / ``"linear"`` use those of :mod:`.relaxation` (tighter, dearer).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .bounds import assemble_bound, layer_budgets, margin_change_bound, margin_change_bound_all_pairs
from .relaxation import interval_margin_bound, linear_relaxation_margin_bound
from .network import check_batch, check_inputs, check_weights, forward, layer_norms, margins

__all__ = [
    "BOUNDS",
    "margin_lower_bound",
    "certified_margin",
    "certify",
    "certified_prediction",
    "certified_accuracy",
    "max_certified_budget",
]


#: the certificates by name: what lower-bounds the perturbed margins m̂_{yi}
BOUNDS = ("paper", "clean", "interval", "linear")


def margin_lower_bound(weights, x: Tensor, y: Tensor, eps, layers=None, activation="relu",
                       bound: str = "paper") -> Tensor:
    """(N, K): a lower bound on m̂_{y_j i}(x_j) for every Ŵ in the budget set, by the certificate ``bound``.

    ``"paper"`` / ``"clean"``: m − η of :func:`~setsens.weights.bounds.margin_change_bound` (products of norms;
    the same with the clean activations), column y = 0; ``"interval"`` / ``"linear"``:
    :func:`~setsens.weights.relaxation.interval_margin_bound` /
    :func:`~setsens.weights.relaxation.linear_relaxation_margin_bound` (column y = +inf).  Layers outside
    ``layers`` get budget 0.
    """
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {', '.join(map(repr, BOUNDS))}, got {bound!r}")
    weights, x, y = check_batch(weights, x, y)
    if bound in ("paper", "clean"):
        m = margins(forward(weights, x, activation), y)
        return m - margin_change_bound(weights, x, y, eps, layers, bound)
    e, _ = layer_budgets(eps, layers, weights)
    if bound == "interval":
        return interval_margin_bound(weights, x, y, e, activation=activation)
    return linear_relaxation_margin_bound(weights, x, y, e, activation=activation)


def _bound_name(hidden: str, bound: str | None) -> str:
    """One name per certificate: ``bound`` wins; ``hidden`` (the older keyword) names paper or clean."""
    if bound is None:
        return hidden
    if hidden != "paper":
        raise ValueError("give the certificate either as bound= or as hidden=, not both")
    return bound


def certified_margin(weights: Sequence[Tensor], x: Tensor, y: Tensor, eps, layers=None, activation="relu",
                     hidden: str = "paper", bound: str | None = None) -> Tensor:
    """The least lower bound min_{i≠y} m̂_{yi} per input, shape (N,): > 0 means certified correct for class y.

    ``bound``: the certificate (:func:`margin_lower_bound`): ``"paper"`` (default), ``"clean"``, ``"interval"``
    or ``"linear"``; ``hidden="paper"|"clean"`` is the older spelling of the first two.
    """
    name = _bound_name(hidden, bound)
    weights, x, y = check_batch(weights, x, y)
    return least_lower_bound(margin_lower_bound(weights, x, y, eps, layers, activation, name), y)


def least_lower_bound(low: Tensor, y: Tensor) -> Tensor:
    """min_{i≠y} of (N, K) lower bounds on m̂_{yi}, per row: > 0 means certified (column y ignored)."""
    return low.masked_fill(torch.nn.functional.one_hot(y, low.shape[1]).bool(), float("inf")).amin(dim=1)


def certify(weights, x, y, eps, layers=None, activation="relu", hidden: str = "paper",
            bound: str | None = None) -> Tensor:
    """Boolean (N,): the label y_j is predicted by every network in the budget set (``bound``: the certificate,
    as :func:`certified_margin`)."""
    return certified_margin(weights, x, y, eps, layers, activation, hidden, bound) > 0


def certified_prediction(weights: Sequence[Tensor], x: Tensor, eps, layers=None, activation="relu"):
    """``(prediction, certified)``: the clean argmax and whether every Ŵ in the budget set keeps it.

    Uses the all-pairs bound (N, K, K) because the predicted class need not be the label.
    """
    weights = check_weights(weights)
    x = check_inputs(weights, x)
    logits = forward(weights, x, activation)
    pred = logits.argmax(dim=1)
    eta = margin_change_bound_all_pairs(weights, x, eps, layers)
    eta_pred = eta[torch.arange(x.shape[0]), pred]
    return pred, least_lower_bound(margins(logits, pred) - eta_pred, pred) > 0


@torch.no_grad()
def certified_accuracy(weights, x, y, eps, layers=None, activation="relu", batch_size: int = 4096,
                       bound: str = "paper") -> float:
    """Fraction of (x_j, y_j) certified correct under the budget (a lower bound on robust accuracy), by the
    certificate ``bound`` (:func:`certified_margin`)."""
    n = x.shape[0]
    if n == 0:
        raise ValueError("certified_accuracy needs at least one input")
    hits = 0
    for s in range(0, n, batch_size):
        hits += int(certify(weights, x[s : s + batch_size], y[s : s + batch_size], eps, layers, activation,
                            bound=bound).sum())
    return hits / n


@torch.no_grad()
def max_certified_budget(
    weights: Sequence[Tensor],
    x: Tensor,
    y: Tensor,
    direction=None,
    layers=None,
    activation="relu",
    method: str = "auto",
    iters: int = 60,
) -> Tensor:
    """Largest t ≥ 0 per input such that the budget ε = t · direction is certified, shape (N,).

    ``direction`` (default: the layer norms M_l, so t is a fraction of each layer's norm) has one
    non-negative entry per layer.  The certificate holds for every ε strictly below t·direction
    (it is the supremum; η is non-decreasing in t).  0 where the clean prediction is already wrong,
    ``inf`` if no budget in that direction breaks the certificate.

    ``method``: ``"closed"`` (only one perturbed layer with non-zero direction: η is linear in t,
    so t = min_i m_{yi} / η_{yi}(1)), ``"bisection"`` (any layers, vectorised over the batch,
    ``iters`` halvings after bracketing) or ``"auto"``.
    """
    weights, x, y = check_batch(weights, x, y)
    K = weights[-1].shape[0]
    if direction is None:
        direction = layer_norms(weights)
    r, _ = layer_budgets(direction, layers, weights, "direction")
    m = margins(forward(weights, x, activation), y)
    notself = ~torch.nn.functional.one_hot(y, K).bool()
    m_min = m.masked_fill(~notself, float("inf")).amin(dim=1)
    active = int((r > 0).sum())
    if method == "auto":
        method = "closed" if active <= 1 else "bisection"
    if method not in ("closed", "bisection"):
        raise ValueError(f"method must be 'auto', 'closed' or 'bisection', got {method!r}")
    if active == 0:
        return torch.where(m_min > 0, torch.full_like(m_min, float("inf")), torch.zeros_like(m_min))
    if method == "closed":
        if active > 1:
            raise ValueError("the closed form needs exactly one perturbed layer (η is then linear in the budget)")
        eta1 = margin_change_bound(weights, x, y, r)
        ratio = torch.where(eta1 > 0, m / eta1, torch.where(m > 0, float("inf"), 0.0))
        t = ratio.masked_fill(~notself, float("inf")).amin(dim=1)
        return torch.where(m_min > 0, t, torch.zeros_like(t))

    lo = torch.zeros_like(m_min)
    pos = m_min > 0
    hi = torch.full_like(m_min, 1e-3)
    # bracket: double hi until the certificate fails (η grows at least linearly in t when r ≠ 0)
    for _ in range(200):
        still = pos & _certified_at(weights, x, y, m, notself, hi, r)
        if not still.any():
            break
        lo = torch.where(still, hi, lo)
        hi = torch.where(still, hi * 2, hi)
    else:
        hi = torch.where(pos & _certified_at(weights, x, y, m, notself, hi, r), float("inf"), hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        good = _certified_at(weights, x, y, m, notself, mid, r)
        lo = torch.where(good, mid, lo)
        hi = torch.where(good, hi, mid)
    return torch.where(pos, lo, torch.zeros_like(lo))


def _certified_at(weights, x, y, m, notself, t, r):
    """Certified at the per-input budget t_j · r (one budget vector per row)."""
    eta = assemble_bound(weights, x, t[:, None] * r[None, :], y)
    return ((m - eta) > 0).masked_fill(~notself, True).all(dim=1)
