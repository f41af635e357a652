"""Bias-free feed-forward networks as pure functions of their weight matrices.

A network is a list ``weights = [W¹, …, Wᵈ]`` (first layer first, ``Wˡ`` of shape
``(n_l, n_{l-1})``) and an activation σ from the ReLU family (element-wise, 1-Lipschitz,
non-negative, monotone, σ(0) = 0):  f(x|W) = Wᵈ σ(Wᵈ⁻¹ ··· σ(W¹ x)).  Layer indices in this
package are 0-based (``weights[0]`` is W¹ of the notes).

:func:`network_from_model` turns an ``nn.Sequential`` into that form and refuses, with a clear
message, anything outside the setting (convolutions, biases where not allowed, Tanh, Sigmoid …).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "UnsupportedNetworkError",
    "ACTIVATIONS",
    "get_activation",
    "check_activation",
    "check_weights",
    "check_inputs",
    "check_labels",
    "check_eps",
    "layer_norms",
    "forward",
    "hidden_states",
    "forward_perturbed",
    "margins",
    "make_mlp",
    "network_from_model",
]


class UnsupportedNetworkError(ValueError):
    """The network (a layer, an activation or a bias) is outside the setting of the bounds."""


def _clip1(t: Tensor) -> Tensor:
    return t.clamp(0.0, 1.0)


#: Activations of the ReLU family, by name: 1-Lipschitz, non-negative, monotone, σ(0) = 0.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "relu6": nn.functional.relu6,
    "clip1": _clip1,  # min(max(t, 0), 1), i.e. Hardtanh(0, 1)
}


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


def check_activation(module: nn.Module) -> str:
    """Name of a supported activation module; raise :class:`UnsupportedNetworkError` otherwise.

    >>> check_activation(nn.ReLU())
    'relu'
    >>> check_activation(nn.Tanh())
    Traceback (most recent call last):
    ...
    setsens.weights.network.UnsupportedNetworkError: activation Tanh is outside the setting: it takes negative values (σ must be non-negative, monotone, 1-Lipschitz with σ(0) = 0: ReLU, ReLU6, Hardtanh(0, c))
    """
    why = None
    if type(module) is nn.ReLU:
        return "relu"
    if type(module) is nn.ReLU6:
        return "relu6"
    if type(module) is nn.Hardtanh:
        if module.min_val == 0.0 and module.max_val > 0.0:
            return "relu6" if module.max_val == 6.0 else ("clip1" if module.max_val == 1.0 else "hardtanh")
        why = "Hardtanh is supported only with min_val = 0 and max_val > 0"
    elif isinstance(module, (nn.Tanh, nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                             nn.Mish, nn.PReLU, nn.RReLU, nn.Identity, nn.Softsign, nn.Tanhshrink,
                             nn.Hardswish)):
        why = "it takes negative values"
    elif isinstance(module, (nn.Sigmoid, nn.Softplus, nn.Hardsigmoid)):
        why = "σ(0) ≠ 0"
    elif isinstance(module, (nn.Softmax, nn.LogSoftmax)):
        why = "it is not element-wise"
    else:
        why = "it is not a known member of the ReLU family"
    raise UnsupportedNetworkError(
        f"activation {type(module).__name__} is outside the setting: {why} (σ must be non-negative, "
        "monotone, 1-Lipschitz with σ(0) = 0: ReLU, ReLU6, Hardtanh(0, c))"
    )


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


def hidden_states(weights: Sequence[Tensor], x: Tensor, activation="relu", biases=None) -> list[Tensor]:
    """[h⁰ = x, h¹, …, hᵈ⁻¹, f(x)]: the inputs of every layer, then the logits."""
    act = get_activation(activation)
    hs = [x]
    h = x
    d = len(weights)
    for l, w in enumerate(weights):
        z = h @ w.T
        if biases is not None and biases[l] is not None:
            z = z + biases[l]
        h = act(z) if l < d - 1 else z
        hs.append(h)
    return hs


def forward(weights: Sequence[Tensor], x: Tensor, activation="relu", biases=None) -> Tensor:
    """Logits f(x|W), shape (N, K).  Cost: one pass, O(N Σ n_l n_{l-1})."""
    return hidden_states(weights, x, activation, biases)[-1]


def forward_perturbed(weights: Sequence[Tensor], deltas: Sequence, x: Tensor, activation="relu") -> Tensor:
    """Logits of the perturbed network Ŵˡ = Wˡ + ΔWˡ.

    ``deltas[l]`` is ``None`` (layer not perturbed), a matrix shaped like ``weights[l]`` (one
    perturbation shared by the whole batch) or a stack (N, n_l, n_{l-1}) (one per input).
    """
    act = get_activation(activation)
    h = x
    d = len(weights)
    for l, w in enumerate(weights):
        z = h @ w.T
        dl = deltas[l]
        if dl is not None:
            z = z + (h @ dl.T if dl.ndim == 2 else torch.einsum("njk,nk->nj", dl, h))
        h = act(z) if l < d - 1 else z
    return h


def margins(logits: Tensor, y: Tensor) -> Tensor:
    """Pairwise margins m_{y_j i} = f_{y_j} − f_i, shape (N, K) (0 where i = y_j)."""
    return logits.gather(1, y[:, None]) - logits


def make_mlp(sizes: Sequence[int], activation: str = "relu", generator: torch.Generator | None = None,
             dtype=torch.float32) -> nn.Sequential:
    """A bias-free MLP ``sizes = [n0, n1, …, K]`` with Kaiming-uniform weights drawn from ``generator``."""
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"sizes must list at least an input and an output width, all ≥ 1, got {sizes}")
    act_cls = {"relu": nn.ReLU, "relu6": nn.ReLU6, "clip1": lambda: nn.Hardtanh(0.0, 1.0)}
    if activation not in act_cls:
        raise UnsupportedNetworkError(f"unknown activation {activation!r}; supported: {sorted(act_cls)}")
    layers: list[nn.Module] = []
    for l in range(len(sizes) - 1):
        lin = nn.Linear(int(sizes[l]), int(sizes[l + 1]), bias=False, dtype=dtype)
        bound = math.sqrt(6.0 / sizes[l])  # Kaiming-uniform for ReLU
        with torch.no_grad():
            lin.weight.copy_((torch.rand(lin.weight.shape, generator=generator, dtype=dtype) * 2 - 1) * bound)
        layers.append(lin)
        if l < len(sizes) - 2:
            layers.append(act_cls[activation]())
    return nn.Sequential(*layers)


def network_from_model(model: nn.Module, allow_bias: bool = False):
    """``(weights, biases, activation)`` of an ``nn.Sequential`` MLP inside the setting.

    Accepts an optional leading ``nn.Flatten``, then Linear, activation, Linear, …, Linear, with
    one supported activation (the same everywhere).  ``weights`` are the live parameters (so
    gradients flow); ``biases`` is ``None`` for a bias-free network.

    >>> w, b, act = network_from_model(nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False)))
    >>> [tuple(t.shape) for t in w], b, act
    ([(3, 4), (2, 3)], None, 'relu')
    >>> network_from_model(nn.Sequential(nn.Conv2d(1, 2, 3)))
    Traceback (most recent call last):
    ...
    setsens.weights.network.UnsupportedNetworkError: module 0 (Conv2d) is outside the setting: only nn.Linear layers separated by a ReLU-family activation are supported
    """
    if not isinstance(model, nn.Sequential):
        raise UnsupportedNetworkError(f"expected an nn.Sequential MLP, got {type(model).__name__}")
    mods = list(model)
    if mods and isinstance(mods[0], nn.Flatten):
        mods = mods[1:]
        offset = 1
    else:
        offset = 0
    weights, biases, names = [], [], set()
    act_module = None
    for i, m in enumerate(mods):
        pos = i + offset
        expect_linear = i % 2 == 0
        if expect_linear:
            if not isinstance(m, nn.Linear):
                if next(m.parameters(), None) is None and i > 0:
                    raise UnsupportedNetworkError(
                        f"module {pos} ({type(m).__name__}): expected an nn.Linear after each activation "
                        "(one activation between consecutive layers)"
                    )
                raise UnsupportedNetworkError(
                    f"module {pos} ({type(m).__name__}) is outside the setting: only nn.Linear layers "
                    "separated by a ReLU-family activation are supported"
                )
            weights.append(m.weight)
            biases.append(m.bias)
        else:
            if isinstance(m, nn.Linear):
                raise UnsupportedNetworkError(
                    f"module {pos}: two consecutive nn.Linear layers without an activation in between"
                )
            names.add(check_activation(m))
            act_module = m
    if not weights or len(mods) % 2 == 0:
        raise UnsupportedNetworkError("the network must start and end with an nn.Linear layer")
    if len(names) > 1:
        raise UnsupportedNetworkError(f"all activations must be the same, got {sorted(names)}")
    has_bias = any(b is not None for b in biases)
    if has_bias and not allow_bias:
        raise UnsupportedNetworkError(
            "the network has biases; the bias-free bounds do not apply (use bias=False, or "
            "margin_change_bound_with_bias with allow_bias=True)"
        )
    check_weights([w.detach() for w in weights])
    if not names:
        activation = "relu"  # a single linear layer: no activation is applied
    else:
        name = names.pop()
        activation = name if name in ACTIVATIONS else act_module
    return weights, (biases if has_bias else None), activation
