"""Feed-forward networks as pure functions of their weight matrices (MLPs) or steps (:class:`Network`).

A network is a list ``weights = [W¹, …, Wᵈ]`` (first layer first, ``Wˡ`` of shape
``(n_l, n_{l-1})``) and an activation σ from the ReLU family (element-wise, 1-Lipschitz,
non-negative, monotone, σ(0) = 0):  f(x|W) = Wᵈ σ(Wᵈ⁻¹ ··· σ(W¹ x)).  Layer indices in this
package are 0-based (``weights[0]`` is W¹ of the notes).

:func:`network_from_model` turns an ``nn.Sequential`` MLP into that form and refuses, with a clear
message, anything outside the setting (biases where not allowed, Tanh, Sigmoid …).  A model with
convolutions, BatchNorm, pooling or residual blocks becomes a :class:`~setsens.weights.layers.Network`
(its steps and their bound rules: :mod:`.layers`), which every function here and in :mod:`.bounds`,
:mod:`.certify` and :mod:`.attacks` accepts in place of the list of weight matrices.  One loop,
:func:`layer_loop`, runs both forms: the forward pass, the perturbed ones and the bound recursion.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..models.mlp import ACTIVATIONS, UnsupportedNetworkError, check_activation, mlp_layers
from .layers import Activation, Affine, Gap, Network, build_network

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
    "Network",
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
    """Validate a list of weight matrices (2-D, floating, finite, chained shapes, ≥ 2 outputs).

    A :class:`Network` (chained when built) is returned as it is once its weights and biases are
    floating and finite.
    """
    if isinstance(weights, Network):
        for l, a in enumerate(weights.affines):
            for t, what in ((a.weight, "weight"), (a.bias, "bias")):
                if t is not None:
                    if not t.is_floating_point():
                        raise ValueError(f"{name} layer {l} ({a.name}): {what} must be floating point, got {t.dtype}")
                    _finite(t, f"{name} layer {l} ({a.name}) {what}")
        return weights
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
    if isinstance(weights, Network):
        if tuple(x.shape[1:]) != weights.input_shape:
            raise ValueError(f"x must be a batch of shape (N, {', '.join(map(str, weights.input_shape))}), "
                             f"got shape {tuple(x.shape)}")
        x = x.to(weights[0].dtype)
        _finite(x, "x")
        return x
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

    For a :class:`Network`: the ∞-norm of each weighted layer's operator (a convolution's exactly,
    without its matrix: :meth:`Network.norms`).

    >>> layer_norms([torch.tensor([[1., -2.], [0.5, 0.5]]), torch.tensor([[3., 0.], [0., -1.]])])
    tensor([3., 3.])
    """
    if isinstance(weights, Network):
        return weights.norms()
    return torch.stack([w.abs().sum(dim=1).max() for w in weights])


class _Loop:
    """What one pass carries: the ``add`` hook, the hidden states, the bound's (δ, H) and budgets."""

    def __init__(self, add, depth, bound, trace):
        self.add, self.depth, self.trace, self.records = add, depth, trace, []
        self.gap = self.final = None
        if bound is not None:
            self.e, self.beta, self.M, self.gap, hidden = bound
            self.clean = hidden == "clean"

    def run(self, steps, h):
        for step in steps:
            if self.trace:
                step.in_shape = tuple(h.shape[1:])
            out = step.forward(h, self)
            if self.gap is not None:
                g = step.propagate(self.gap, self)
                if self.clean:
                    g = Gap(g.delta, torch.minimum(g.H, out.flatten(1).abs().amax(dim=1) + g.delta))
                self.gap = g
            h = out
        return h


def _mlp_steps(weights, activation):
    act = get_activation(activation)
    steps = []
    for l, w in enumerate(weights):
        a = Affine(w)
        a.index = l
        steps += [a, Activation(act)] if l < len(weights) - 1 else [a]
    return steps


def layer_loop(weights, x: Tensor, activation="relu", add=None, bound=None, trace: bool = False):
    """[h⁰ = x, h¹, …, hᵈ⁻¹, f(x)]: the one pass through the layers every forward variant uses.

    ``weights`` is a list of weight matrices (an MLP with ``activation``) or a :class:`Network`
    (its own activations; then hˡ is the input of weighted layer l).  ``add(l, h)`` (optional)
    returns a term added to weighted layer l's pre-activation ``Wˡ h`` (a bias, a weight
    perturbation's ``ΔWˡ h`` …) or ``None``.  ``bound = (ε, β, M, Gap(δ₀, H₀), hidden)`` also runs
    the bound recursion of :mod:`.layers` alongside (each step's rule) and returns
    ``(states, Gap at the last layer's input)``.  Cost: one pass, O(N Σ n_l n_{l-1}).
    """
    if isinstance(weights, Network):
        steps, depth = weights.steps, weights.depth
    else:
        steps, depth = _mlp_steps(weights, activation), len(weights)
    loop = _Loop(add, depth, bound, trace)
    out = loop.run(steps, x)
    hs = loop.records + [out]
    return hs if bound is None else (hs, loop.final)


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


def forward_perturbed(weights: Sequence[Tensor], deltas: Sequence, x: Tensor, activation="relu",
                      bias_deltas: Sequence | None = None) -> Tensor:
    """Logits of the perturbed network Ŵˡ = Wˡ + ΔWˡ (and b̂ˡ = bˡ + Δbˡ).

    ``deltas[l]`` is ``None`` (layer not perturbed), a tensor shaped like ``weights[l]`` (one
    perturbation shared by the whole batch; a convolution's kernel for a :class:`Network`) or a
    stack (N, *weights[l].shape) (one per input).  ``bias_deltas[l]``: ``None``, (n_l,) or (N, n_l).
    """
    if isinstance(weights, Network):
        aff = weights.affines

        def add(l, h):
            t = None if deltas[l] is None else aff[l].linear(deltas[l], h)
            if bias_deltas is not None and bias_deltas[l] is not None:
                b = aff[l].bias_term(bias_deltas[l])
                t = b if t is None else t + b
            return t

        return layer_loop(weights, x, activation, add)[-1]

    def add(l, h):
        t = perturbation_term(deltas[l], h)
        if bias_deltas is not None and bias_deltas[l] is not None:
            t = bias_deltas[l] if t is None else t + bias_deltas[l]
        return t

    return layer_loop(weights, x, activation, add)[-1]


def margins(logits: Tensor, y: Tensor) -> Tensor:
    """Pairwise margins m_{y_j i} = f_{y_j} − f_i, shape (N, K) (0 where i = y_j)."""
    return logits.gather(1, y[:, None]) - logits


_STRUCTURED = (nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.MaxPool2d,
               nn.AdaptiveMaxPool2d, nn.AvgPool1d, nn.MaxPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)


def is_structured(model: nn.Module) -> bool:
    """Whether ``model`` has convolutions, BatchNorm, pooling or the CIFAR ResNet blocks (a :class:`Network`, not
    an MLP's weight matrices, for :func:`network_from_model`)."""
    return any(isinstance(m, _STRUCTURED) or type(m).__name__ in ("CifarResNet", "BasicBlock") for m in model.modules())


def network_from_model(model: nn.Module, allow_bias: bool = False, input_shape=None):
    """``(weights, biases, activation)`` of an ``nn.Sequential`` MLP inside the setting, else a :class:`Network`.

    An MLP (an optional leading ``nn.Flatten``, then Linear, activation, Linear, …, Linear, with
    one supported activation, the same everywhere) gives the live parameters (so gradients flow);
    ``biases`` is ``None`` for a bias-free network, and biases are refused unless ``allow_bias``.

    A model with convolutions, BatchNorm, pooling or the CIFAR ResNet blocks of
    :mod:`setsens.models.resnet` (or any model when ``input_shape`` is given) gives a
    :class:`Network` (:func:`setsens.weights.layers.build_network`): BatchNorm folded with its
    running statistics (eval mode), biases kept, ``input_shape`` one input's shape ((3, 32, 32) for a
    CIFAR ResNet by default).

    >>> model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False))
    >>> w, b, act = network_from_model(model)
    >>> [tuple(t.shape) for t in w], b, act
    ([(3, 4), (2, 3)], None, 'relu')
    >>> net = network_from_model(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)),
    ...                          input_shape=(1, 4, 4))
    >>> len(net), net.input_shape
    (2, (1, 4, 4))
    >>> network_from_model(nn.Sequential(nn.Conv2d(1, 2, 3)), input_shape=(1, 4, 4))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    setsens.models.mlp.UnsupportedNetworkError: the last layer must be a dense nn.Linear (the logits), got Conv2d...
    """
    if input_shape is not None or is_structured(model):
        net = build_network(model, input_shape)
        check_weights(net.detach())
        return net
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
