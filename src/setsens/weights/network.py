"""Bias-free feed-forward networks as pure functions of their weight matrices.

A network is a list ``weights = [W¹, …, Wᵈ]`` (first layer first, ``Wˡ`` of shape
``(n_l, n_{l-1})``) and an activation σ from the ReLU family (element-wise, 1-Lipschitz,
non-negative, monotone, σ(0) = 0):  f(x|W) = Wᵈ σ(Wᵈ⁻¹ ··· σ(W¹ x)).  Layer indices in this
package are 0-based (``weights[0]`` is W¹ of the notes).

:func:`network_from_model` turns an ``nn.Sequential`` into that form and refuses, with a clear
message, anything outside the setting (convolutions, biases where not allowed, Tanh, Sigmoid …).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..models.mlp import ACTIVATIONS, UnsupportedNetworkError, check_activation, mlp_layers

__all__ = [
    "UnsupportedNetworkError",
    "ACTIVATIONS",
    "get_activation",
    "check_activation",
    "check_weights",
    "check_inputs",
    "check_labels",
    "check_batch",
    "check_eps",
    "layer_norms",
    "forward",
    "layer_loop",
    "hidden_states",
    "forward_perturbed",
    "margins",
    "network_from_model",
]


def get_activation(activation) -> Callable[[Tensor], Tensor]:
    """The callable for an activation name in :data:`ACTIVATIONS` or a supported ``nn.Module``."""
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise UnsupportedNetworkError(
                f"unknown activation {activation!r}; supported (ReLU family): {sorted(ACTIVATIONS)}"
            )
        return ACTIVATIONS[activation]
    if isinstance(activation, nn.Module):
        check_activation(activation)
        return activation
    if any(activation is f for f in ACTIVATIONS.values()):
        return activation
    raise UnsupportedNetworkError(f"activation must be a name or an nn.Module, got {type(activation).__name__}")


def _finite(t: Tensor, name: str):
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf")


def check_weights(weights: Sequence[Tensor], name: str = "weights") -> list[Tensor]:
    """Validate a list of weight matrices (2-D, floating, finite, chained shapes, ≥ 2 outputs)."""
    if isinstance(weights, Tensor) or not isinstance(weights, (list, tuple)) or len(weights) == 0:
        raise ValueError(f"{name} must be a non-empty list of weight matrices, first layer first")
    out = []
    for l, w in enumerate(weights):
        if not isinstance(w, Tensor):
            raise ValueError(f"{name}[{l}] must be a torch.Tensor, got {type(w).__name__}")
        if w.ndim != 2:
            raise ValueError(f"{name}[{l}] must be a 2-D matrix (n_out, n_in), got shape {tuple(w.shape)}")
        if not w.is_floating_point():
            raise ValueError(f"{name}[{l}] must be floating point, got {w.dtype}")
        _finite(w, f"{name}[{l}]")
        if l > 0 and w.shape[1] != weights[l - 1].shape[0]:
            raise ValueError(
                f"{name}[{l}] has {w.shape[1]} inputs but {name}[{l - 1}] has {weights[l - 1].shape[0]} outputs"
            )
        out.append(w)
    if out[-1].shape[0] < 2:
        raise ValueError(f"the last layer must have at least 2 outputs (classes), got {out[-1].shape[0]}")
    return out


def check_inputs(weights: Sequence[Tensor], x: Tensor) -> Tensor:
    """Validate a batch ``x`` of shape (N, n₀) against the first layer; returns it in the weights' dtype."""
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"x must be a batch of shape (N, n0), got shape {tuple(x.shape)}")
    if x.shape[1] != weights[0].shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but the first layer expects {weights[0].shape[1]}")
    x = x.to(weights[0].dtype)
    _finite(x, "x")
    return x


def check_labels(y: Tensor, n: int, num_classes: int) -> Tensor:
    """Validate integer labels of shape (n,) in [0, num_classes)."""
    if not isinstance(y, Tensor):
        raise ValueError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"y must have shape ({n},), got {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"y must hold integer class indices, got {y.dtype}")
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]")
    return y.long()


def check_batch(weights: Sequence[Tensor], x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
    """``(weights, x, y)`` checked together by :func:`check_weights`, :func:`check_inputs`, :func:`check_labels`."""
    weights = check_weights(weights)
    x = check_inputs(weights, x)
    return weights, x, check_labels(y, x.shape[0], weights[-1].shape[0])


def check_eps(eps, depth: int, like: Tensor, name: str = "eps") -> Tensor:
    """One finite, non-negative budget per layer, as a 1-D tensor of length ``depth``."""
    if isinstance(eps, Tensor):
        e = eps.to(like.dtype)
    else:
        try:
            e = torch.as_tensor([float(v) for v in eps], dtype=like.dtype)
        except TypeError:
            raise ValueError(f"{name} must be a sequence with one budget per layer ({depth}), got {eps!r}") from None
    if e.ndim != 1 or e.shape[0] != depth:
        raise ValueError(f"{name} must hold one budget per layer: expected length {depth}, got shape {tuple(e.shape)}")
    _finite(e, name)
    if (e < 0).any():
        raise ValueError(f"{name} must be non-negative, got {e.tolist()}")
    return e


def layer_norms(weights: Sequence[Tensor]) -> Tensor:
    """M_l = ‖Wˡ‖_∞ = max_j Σ_k |Wˡ_jk| (max row ℓ1 norm) for every layer; differentiable.

    >>> layer_norms([torch.tensor([[1., -2.], [0.5, 0.5]]), torch.tensor([[3., 0.], [0., -1.]])])
    tensor([3., 3.])
    """
    return torch.stack([w.abs().sum(dim=1).max() for w in weights])


def layer_loop(weights: Sequence[Tensor], x: Tensor, activation="relu", add=None) -> list[Tensor]:
    """[h⁰ = x, h¹, …, hᵈ⁻¹, f(x)]: the one pass through the layers every forward variant uses.

    ``add(l, h)`` (optional) returns a term added to layer l's pre-activation ``Wˡ h`` (a bias, a
    weight perturbation's ``ΔWˡ h`` …) or ``None``.  Cost: one pass, O(N Σ n_l n_{l-1}).
    """
    act = get_activation(activation)
    hs = [x]
    d = len(weights)
    for l, w in enumerate(weights):
        z = hs[-1] @ w.T
        extra = add(l, hs[-1]) if add is not None else None
        if extra is not None:
            z = z + extra
        hs.append(act(z) if l < d - 1 else z)
    return hs


def hidden_states(weights: Sequence[Tensor], x: Tensor, activation="relu", biases=None) -> list[Tensor]:
    """[h⁰ = x, h¹, …, hᵈ⁻¹, f(x)]: the inputs of every layer, then the logits."""
    add = None if biases is None else (lambda l, h: biases[l])
    return layer_loop(weights, x, activation, add)


def forward(weights: Sequence[Tensor], x: Tensor, activation="relu", biases=None) -> Tensor:
    """Logits f(x|W), shape (N, K).  Cost: one pass, O(N Σ n_l n_{l-1})."""
    return hidden_states(weights, x, activation, biases)[-1]


def perturbation_term(delta, h: Tensor):
    """ΔW h for one shared ΔW (n_l, n_{l-1}) or one per input (N, n_l, n_{l-1}); ``None`` stays ``None``."""
    if delta is None:
        return None
    return h @ delta.T if delta.ndim == 2 else torch.einsum("njk,nk->nj", delta, h)


def forward_perturbed(weights: Sequence[Tensor], deltas: Sequence, x: Tensor, activation="relu") -> Tensor:
    """Logits of the perturbed network Ŵˡ = Wˡ + ΔWˡ.

    ``deltas[l]`` is ``None`` (layer not perturbed), a matrix shaped like ``weights[l]`` (one
    perturbation shared by the whole batch) or a stack (N, n_l, n_{l-1}) (one per input).
    """
    return layer_loop(weights, x, activation, lambda l, h: perturbation_term(deltas[l], h))[-1]


def margins(logits: Tensor, y: Tensor) -> Tensor:
    """Pairwise margins m_{y_j i} = f_{y_j} − f_i, shape (N, K) (0 where i = y_j)."""
    return logits.gather(1, y[:, None]) - logits


def network_from_model(model: nn.Module, allow_bias: bool = False):
    """``(weights, biases, activation)`` of an ``nn.Sequential`` MLP inside the setting.

    Accepts an optional leading ``nn.Flatten``, then Linear, activation, Linear, …, Linear, with
    one supported activation (the same everywhere).  ``weights`` are the live parameters (so
    gradients flow); ``biases`` is ``None`` for a bias-free network.

    >>> model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False))
    >>> w, b, act = network_from_model(model)
    >>> [tuple(t.shape) for t in w], b, act
    ([(3, 4), (2, 3)], None, 'relu')
    >>> network_from_model(nn.Sequential(nn.Conv2d(1, 2, 3)))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    setsens.models.mlp.UnsupportedNetworkError: module 0 (Conv2d) is outside the setting: ...
    """
    linears, activation = mlp_layers(model)
    weights = [m.weight for m in linears]
    biases = [m.bias for m in linears]
    has_bias = any(b is not None for b in biases)
    if has_bias and not allow_bias:
        raise UnsupportedNetworkError(
            "the network has biases; the bias-free bounds do not apply (use bias=False, or "
            "margin_change_bound_with_bias with allow_bias=True)"
        )
    check_weights([w.detach() for w in weights])
    return weights, (biases if has_bias else None), activation
