"""Certified bounds on the change of pairwise margins under weight perturbations.

Setting and notation: Tsai, Hsu, Yu & Chen, "Formalizing Generalization and Robustness of Neural
Networks to Weight Perturbations", NeurIPS 2021.  For f(x|W) = Wᵈ σ(··· σ(W¹x)), a perturbation Ŵ with
‖Ŵˡ − Wˡ‖_∞ ≤ ε_l for the perturbed layers l ∈ S, and the pairwise margin m_{yi} = f_y − f_i,

    |m̂_{yi} − m_{yi}| ≤ η_{yi} = a_{yi} (P_ε − P) B + 2 ε_d P_ε B          (Theorems 2 and 3)

with M_l = ‖Wˡ‖_∞ (max row ℓ1 norm), a_{yi} = ‖Wᵈ_y − Wᵈ_i‖_1, B = ‖x‖_∞, P = Π_{l<d} M_l,
P_ε = Π_{l<d}(M_l + ε_l) and ε_l := 0 for l ∉ S.  Layer indices are 0-based here.

Every function is vectorised over the batch and the classes, differentiable in the weights
(used as a training loss) and costs O(Σ_l n_l n_{l-1} + K² n_{d-1} + N K): the norms, the K×K
table of a_{yi} and one multiply per entry.  P_ε − P is summed by telescoping, so no
cancellation occurs for small budgets.

Every function also takes a :class:`~setsens.weights.layers.Network` (convolutions, biases,
folded BatchNorm, pooling, residual blocks) in place of the weight list: η is then the recursion of
:mod:`.layers` (one :func:`~setsens.weights.network.layer_loop` pass; per layer kind the norm
inequality it uses is stated there), which on an MLP equals Theorem 2 (with biases:
:func:`margin_change_bound_with_bias`).  ``hidden="clean"`` tightens it with the clean activations.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .layers import Gap, Network
from .network import check_eps, check_inputs, check_labels, check_weights, layer_loop, layer_norms

__all__ = [
    "layer_mask",
    "relative_budget",
    "pairwise_last_layer_l1",
    "product_gap",
    "layer_budgets",
    "assemble_bound",
    "margin_change_bound",
    "margin_change_bound_all_pairs",
    "single_layer_bound",
    "margin_change_bound_with_bias",
    "network_bound",
]


def layer_mask(layers, depth: int) -> Tensor:
    """Boolean mask of the perturbed layers: ``None`` = all; indices are 0-based, negatives allowed."""
    mask = torch.zeros(depth, dtype=torch.bool)
    if layers is None:
        mask[:] = True
        return mask
    if isinstance(layers, int):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError("layers must name at least one layer (or be None for all layers)")
    for k in layers:
        if isinstance(k, bool) or not isinstance(k, int):
            try:
                if isinstance(k, Tensor) and k.numel() == 1 and not k.is_floating_point():
                    k = int(k)
                else:
                    raise TypeError
            except TypeError:
                raise ValueError(f"layer indices must be integers, got {k!r}") from None
        if not -depth <= k < depth:
            raise ValueError(f"layer index {k} out of range for a network with {depth} layers (0-based)")
        mask[k % depth] = True
    return mask


def relative_budget(weights: Sequence[Tensor], fraction: float) -> Tensor:
    """ε_l = fraction · ‖Wˡ‖_∞ for every layer (differentiable in the weights).

    >>> relative_budget([torch.tensor([[1., -3.]]).repeat(2, 1), torch.eye(2)], 0.01)
    tensor([0.0400, 0.0100])
    """
    if not (isinstance(fraction, (int, float)) and fraction >= 0 and fraction == fraction and fraction != float("inf")):
        raise ValueError(f"fraction must be a finite non-negative number, got {fraction!r}")
    return fraction * layer_norms(weights)


def pairwise_last_layer_l1(w_last: Tensor) -> Tensor:
    """The K×K table a_{yi} = ‖Wᵈ_{y,:} − Wᵈ_{i,:}‖_1."""
    return (w_last[:, None, :] - w_last[None, :, :]).abs().sum(dim=-1)


def _exclusive_cumprod(v: Tensor) -> Tensor:
    one = torch.ones((*v.shape[:-1], 1), dtype=v.dtype, device=v.device)
    return torch.cat([one, torch.cumprod(v, -1)[..., :-1]], -1) if v.shape[-1] else v


def product_gap(m: Tensor, e: Tensor) -> Tensor:
    """Π(m_l + e_l) − Π m_l, summed by telescoping: Σ_l e_l Π_{j<l}(m_j+e_j) Π_{j>l} m_j.

    ``e`` may hold one budget vector per row (shape (N, L)); the gap is then one per row.

    >>> product_gap(torch.tensor([2., 3.]), torch.tensor([1., 0.5]))
    tensor(4.5000)
    """
    if m.numel() == 0:
        return torch.zeros(e.shape[:-1], dtype=m.dtype, device=m.device)
    before = _exclusive_cumprod(m + e)
    after = torch.flip(_exclusive_cumprod(torch.flip(m, (0,))), (0,))
    return (e * before * after).sum(-1)


def layer_budgets(eps, layers, weights: Sequence[Tensor], name: str = "eps") -> tuple[Tensor, Tensor]:
    """``(ε, mask)``: one checked budget per layer, set to 0 outside ``layers``, and the mask."""
    d = len(weights)
    e = check_eps(eps, d, weights[0], name)
    mask = layer_mask(layers, d).to(e.device)
    return torch.where(mask, e, torch.zeros_like(e)), mask


def _prepare(weights, x, eps, layers):
    weights = check_weights(weights)
    x = check_inputs(weights, x)
    e, _ = layer_budgets(eps, layers, weights)
    return weights, x, e


def _check_hidden(hidden):
    if hidden not in ("paper", "clean"):
        raise ValueError(f"hidden must be 'paper' (products of norms) or 'clean' (clean activations), got {hidden!r}")


def network_bound(net, x: Tensor, e: Tensor, y: Tensor | None = None, beta: Tensor | None = None,
                  hidden: str = "paper") -> Tensor:
    """η by the layer recursion of :mod:`.layers` from checked inputs (a :class:`Network` or an MLP list).

    ``e``/``beta``: weight/bias budgets per weighted layer, (d,) or (N, d).  Shapes as :func:`assemble_bound`;
    η comes back in float64 (or wider), whatever the network's dtype.
    One pass of :func:`layer_loop` (a forward pass plus O(1) per step and input) after the norms.
    """
    _check_hidden(hidden)
    if not isinstance(net, Network):
        net = Network.from_mlp(list(net))
    # the recursion in float64 at least: products of ~50 layer norms overflow float32 (ResNet-56: 1e62)
    wide = torch.promote_types(e.dtype, torch.float64)
    e = e.to(wide)
    beta = torch.zeros_like(e) if beta is None else beta.to(wide)
    B = x.flatten(1).abs().amax(dim=1).to(wide)
    _, g = layer_loop(net, x, bound=(e, beta, net.norms().to(wide), Gap(torch.zeros_like(B), B), hidden))
    A = pairwise_last_layer_l1(net[-1]).to(wide)
    K = A.shape[0]
    c2 = 2 * e[..., -1] * g.H + 2 * beta[..., -1]
    if y is None:
        eta = A[None] * g.delta[:, None, None] + c2[:, None, None]
        return eta * (1 - torch.eye(K, dtype=eta.dtype, device=eta.device))
    eta = A[y] * g.delta[:, None] + c2[:, None]
    return eta.masked_fill(torch.nn.functional.one_hot(y, K).bool(), 0.0)


def assemble_bound(weights: Sequence[Tensor], x: Tensor, e: Tensor, y: Tensor | None = None,
                   hidden: str = "paper") -> Tensor:
    """η of Theorems 2–3 from checked inputs: η_{yi} = a_{yi} (P_ε − P) B + 2 ε_d P_ε B.

    ``e`` holds the budgets (0 for exact layers), one vector (d,) or one per input (N, d).  Returns
    (N, K) for the labels ``y`` (0 at i = y), or (N, K, K) for every pair (0 on the diagonal).
    A :class:`Network` (or ``hidden="clean"``) goes through the recursion of :func:`network_bound`.
    """
    if isinstance(weights, Network) or hidden != "paper":
        return network_bound(weights, x, e, y, hidden=hidden)
    M = layer_norms(weights)
    B = x.abs().amax(dim=1)
    c1 = product_gap(M[:-1], e[..., :-1]) * B
    c2 = 2 * e[..., -1] * torch.prod(M[:-1] + e[..., :-1], dim=-1) * B
    A = pairwise_last_layer_l1(weights[-1])
    K = A.shape[0]
    if y is None:
        eta = A[None] * c1[:, None, None] + c2[:, None, None]
        return eta * (1 - torch.eye(K, dtype=eta.dtype, device=eta.device))
    eta = A[y] * c1[:, None] + c2[:, None]
    return eta.masked_fill(torch.nn.functional.one_hot(y, K).bool(), 0.0)


def margin_change_bound(weights: Sequence[Tensor], x: Tensor, y: Tensor, eps, layers=None,
                        hidden: str = "paper") -> Tensor:
    """η: an (N, K) tensor with η[j, i] ≥ |m̂_{y_j i} − m_{y_j i}| for every Ŵ in the budget set.

    ``eps`` holds one budget ε_l ≥ 0 per layer on ‖ΔWˡ‖_∞ (max row ℓ1 norm); ``layers`` the
    perturbed layers (0-based, ``None`` = all), the others are kept exact (Theorem 3).  The entry
    for i = y_j is 0.  Differentiable in ``weights`` (and in ``eps``).

    >>> W = [torch.tensor([[1., 0.], [0., 2.]]), torch.tensor([[1., -1.], [0., 1.]])]
    >>> margin_change_bound(W, torch.tensor([[1., 1.]]), torch.tensor([0]), [0.1, 0.1])
    tensor([[0.0000, 0.7200]])
    """
    weights, x, e = _prepare(weights, x, eps, layers)
    y = check_labels(y, x.shape[0], weights[-1].shape[0])
    return assemble_bound(weights, x, e, y, hidden)


def margin_change_bound_all_pairs(weights: Sequence[Tensor], x: Tensor, eps, layers=None,
                                  hidden: str = "paper") -> Tensor:
    """η for every ordered class pair: (N, K, K) with [j, y, i] ≥ |m̂_{yi}(x_j) − m_{yi}(x_j)|; 0 on the diagonal."""
    weights, x, e = _prepare(weights, x, eps, layers)
    return assemble_bound(weights, x, e, None, hidden)


def single_layer_bound(weights: Sequence[Tensor], x: Tensor, y: Tensor, eps_k: float, k: int) -> Tensor:
    """Theorem 1: only layer k moves, ‖ΔWᵏ‖_∞ ≤ ε_k.  (N, K) bound on |m̂_{y_j i} − m_{y_j i}|.

    k not last: ε_k a_{yi} Π_{l<d, l≠k} M_l B;  k last: 2 ε_d P B.  Written independently of
    :func:`margin_change_bound` (Theorem 3 with S = {k} must agree with it).
    """
    weights = check_weights(weights)
    x = check_inputs(weights, x)
    d = len(weights)
    if isinstance(weights, Network):  # Theorem 3 with S = {k}: the recursion
        return margin_change_bound(weights, x, y, [eps_k] * d, layers=[k])
    (k,) = layer_mask(k, d).nonzero()[0].tolist()
    e = check_eps([eps_k], 1, weights[0], name="eps_k")[0]
    K = weights[-1].shape[0]
    y = check_labels(y, x.shape[0], K)
    M = layer_norms(weights)
    B = x.abs().amax(dim=1)
    if k == d - 1:
        eta = (2 * e * torch.prod(M[:-1]) * B)[:, None].expand(-1, K)
    else:
        others = torch.prod(torch.cat([M[:k], M[k + 1 : d - 1]]))
        eta = e * pairwise_last_layer_l1(weights[-1])[y] * others * B[:, None]
    return eta.masked_fill(torch.nn.functional.one_hot(y, K).bool(), 0.0)


def margin_change_bound_with_bias(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None] | None,
    x: Tensor,
    y: Tensor,
    eps,
    beta=None,
    layers=None,
) -> Tensor:
    """η for networks with biases: (N, K) bound on |m̂ − m| when ‖ΔWˡ‖_∞ ≤ ε_l and ‖Δbˡ‖_∞ ≤ β_l.

    Recursion (σ 1-Lipschitz, σ(0) = 0), with H₀ = B = ‖x‖_∞ and δ₀ = 0:
    δ_l = M_l δ_{l-1} + ε_l H_{l-1} + β_l,  H_l = (M_l + ε_l) H_{l-1} + ‖bˡ‖_∞ + β_l,
    η_{yi} = a_{yi} δ_{d-1} + 2 ε_d H_{d-1} + 2 β_d.  With zero biases and β = 0 it equals
    Theorem 2 (:func:`margin_change_bound`).  ``beta = None`` means no bias perturbation.
    For a :class:`Network` (its biases inside it: pass ``biases=None``) the recursion of :mod:`.layers`.
    """
    weights, x, e = _prepare(weights, x, eps, layers)
    d = len(weights)
    if isinstance(weights, Network):
        if biases is not None:
            raise ValueError("a Network holds its own biases: pass biases=None")
        bt = None if beta is None else layer_budgets(beta, layers, weights, "beta")[0]
        y = check_labels(y, x.shape[0], weights[-1].shape[0])
        return network_bound(weights, x, e, y, bt)
    if biases is None:
        biases = [None] * d
    if not isinstance(biases, (list, tuple)) or len(biases) != d:
        raise ValueError(f"biases must be a list with one entry (tensor or None) per layer ({d})")
    for l, b in enumerate(biases):
        if b is not None:
            if not isinstance(b, Tensor) or b.shape != (weights[l].shape[0],):
                raise ValueError(f"biases[{l}] must have shape ({weights[l].shape[0]},), got "
                                 f"{tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__}")
            if not torch.isfinite(b).all():
                raise ValueError(f"biases[{l}] contains NaN or Inf")
    bt = torch.zeros(d, dtype=e.dtype) if beta is None else layer_budgets(beta, layers, weights, "beta")[0]
    K = weights[-1].shape[0]
    y = check_labels(y, x.shape[0], K)
    M = layer_norms(weights)
    H = x.abs().amax(dim=1)
    delta = torch.zeros_like(H)
    for l in range(d - 1):
        bnorm = biases[l].abs().max() if biases[l] is not None else 0.0
        delta = M[l] * delta + e[l] * H + bt[l]
        H = (M[l] + e[l]) * H + bnorm + bt[l]
    A = pairwise_last_layer_l1(weights[-1])
    eta = A[y] * delta[:, None] + (2 * e[-1] * H + 2 * bt[-1])[:, None]
    return eta.masked_fill(torch.nn.functional.one_hot(y, K).bool(), 0.0)
