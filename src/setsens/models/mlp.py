"""Fully connected networks: the paper's bias-free ReLU DFCNN (eq. 8) and its ReLU-family kin.

:func:`mlp` builds them; :func:`mlp_layers` reads one back (an ``nn.Sequential`` of Linear layers
separated by one activation of the ReLU family) and refuses, with a clear message, anything else.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["UnsupportedNetworkError", "ACTIVATIONS", "mlp", "check_activation", "mlp_layers"]


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
_MODULES = {"relu": nn.ReLU, "relu6": nn.ReLU6, "clip1": lambda: nn.Hardtanh(0.0, 1.0)}


def mlp(widths, bias: bool = False, activation=nn.ReLU, generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None) -> nn.Sequential:
    """``Linear → act → … → Linear`` with layer widths ``widths = [d, m_1, …, K]``.

    With ``bias=False`` and ReLU this is the DFCNN of the paper (eq. 8; a K-dimensional output
    layer generalises its scalar ``a``).  ``activation`` is a module class or a name in
    :data:`ACTIVATIONS`.  With ``generator`` the weight matrices are redrawn Kaiming-uniform from it
    (reproducible whatever the global seed).

    >>> mlp([64, 32, 10])
    Sequential(
      (0): Linear(in_features=64, out_features=32, bias=False)
      (1): ReLU()
      (2): Linear(in_features=32, out_features=10, bias=False)
    )
    """
    if len(widths) < 2 or any(int(s) < 1 for s in widths):
        raise ValueError(f"an MLP needs at least input and output widths, all ≥ 1, got {list(widths)}")
    if isinstance(activation, str):
        if activation not in _MODULES:
            raise UnsupportedNetworkError(f"unknown activation {activation!r}; supported: {sorted(_MODULES)}")
        activation = _MODULES[activation]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(int(a), int(b), bias=bias, dtype=dtype)
        if generator is not None:
            bound = math.sqrt(6.0 / a)  # Kaiming-uniform for ReLU
            with torch.no_grad():
                w = torch.rand(lin.weight.shape, generator=generator, dtype=lin.weight.dtype)
                lin.weight.copy_((w * 2 - 1) * bound)
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def check_activation(module: nn.Module) -> str:
    """Name of a supported activation module; raise :class:`UnsupportedNetworkError` otherwise.

    >>> check_activation(nn.ReLU())
    'relu'
    >>> check_activation(nn.Tanh())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    setsens.models.mlp.UnsupportedNetworkError: activation Tanh is outside the setting: it takes negative values ...
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


def mlp_layers(model: nn.Module, flatten: bool = True) -> tuple[list[nn.Linear], str | nn.Module]:
    """``(linears, activation)`` of an ``nn.Sequential`` MLP: Linear, σ, Linear, …, Linear.

    One σ of the ReLU family throughout (its name in :data:`ACTIVATIONS`, else the module, e.g.
    ``Hardtanh(0, 2)``; ``"relu"`` for a single layer); a leading ``nn.Flatten`` is allowed when
    ``flatten``.  Biases are returned with the layers: whether they are allowed is the caller's call.

    >>> linears, act = mlp_layers(mlp([4, 3, 2]))
    >>> [tuple(m.weight.shape) for m in linears], act
    ([(3, 4), (2, 3)], 'relu')
    """
    if not isinstance(model, nn.Sequential):
        raise UnsupportedNetworkError(f"expected an nn.Sequential MLP, got {type(model).__name__}")
    mods = list(model)
    offset = 1 if flatten and mods and isinstance(mods[0], nn.Flatten) else 0
    mods = mods[offset:]
    linears, names = [], set()
    act_module = None
    for i, m in enumerate(mods):
        pos = i + offset
        if i % 2 == 0:
            if not isinstance(m, nn.Linear):
                if next(m.parameters(), None) is None and i > 0:
                    raise UnsupportedNetworkError(
                        f"module {pos} ({type(m).__name__}): expected an nn.Linear after each activation "
                        "(one activation between consecutive layers)"
                    )
                raise UnsupportedNetworkError(
                    f"module {pos} ({type(m).__name__}) is outside the setting: "
                    "the network alternates Linear and ReLU-family layers"
                )
            linears.append(m)
        else:
            if isinstance(m, nn.Linear):
                raise UnsupportedNetworkError(
                    f"module {pos}: two consecutive nn.Linear layers without an activation in between"
                )
            names.add(check_activation(m))
            act_module = m
    if not linears or len(mods) % 2 == 0:
        raise UnsupportedNetworkError("the network must start and end with a Linear layer (nn.Linear)")
    if len(names) > 1:
        raise UnsupportedNetworkError(f"all activations must be the same, got {sorted(names)}")
    if not names:
        return linears, "relu"  # a single linear layer: no activation is applied
    name = names.pop()
    return linears, (name if name in ACTIVATIONS else act_module)
