"""Secant derivatives of piecewise-linear units: what a finite move does to a ReLU, in forward mode.

The gradient of a ReLU network is a step function of its weights (the mask ``1[z > 0]``), so one step of
gradient descent jumps wherever a unit changes sides, and the number of units that change sides grows with
the move: the jumps add up to a term *first order* in the move that no derivative sees.  Within
:class:`Secant`, every ReLU (and leaky ReLU) keeps its values but its forward-mode derivative along ``z′``
becomes the secant over ``z′``:

* forward: ``φ(z + z′) − φ(z)`` instead of ``φ′(z) z′``;
* in its gradient ``g·φ′(z)``: ``g′·φ′(z) + g·(φ′(z + z′) − φ′(z))`` — the mask's change over ``z′``.

A secant derivative is not linear in ``z′``: a tangent computed under it holds for the move it was computed at
only.  It equals the derivative wherever no unit changes sides (on a smooth network it *is* the derivative).
Other piecewise-linear units (max-pooling, hardtanh, ReLU6, …) are not replaced; :attr:`Secant.uncovered`
names the ones a run called.  Cost: one comparison more per unit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["Secant"]


def _slope(z: Tensor, negative_slope: float) -> Tensor:
    """``φ′(z)`` of a leaky ReLU (ReLU: ``negative_slope`` 0), taken as ``negative_slope`` at ``z = 0``."""
    positive = (z > 0).to(z.dtype)
    return positive if negative_slope == 0 else negative_slope + (1 - negative_slope) * positive


class _SecantMask(torch.autograd.Function):
    """``g·φ′(z)`` (the unit's backward), whose forward-mode derivative sees the mask change over ``z′``."""

    @staticmethod
    def forward(g, z, negative_slope):
        return g * _slope(z, negative_slope).to(g.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, z, ctx.negative_slope = inputs
        ctx.save_for_forward(g, z)
        ctx.save_for_backward(z)

    @staticmethod
    def jvp(ctx, gt, zt, _):
        g, z = ctx.saved_tensors
        a = ctx.negative_slope
        mask = _slope(z, a).to(g.dtype)
        out = gt * mask if gt is not None else torch.zeros_like(g)
        return out if zt is None else out + g * (_slope(z + zt, a).to(g.dtype) - mask)

    @staticmethod
    def backward(ctx, grad):
        z, = ctx.saved_tensors
        return grad * _slope(z, ctx.negative_slope).to(grad.dtype), None, None


class _SecantUnit(torch.autograd.Function):
    """A leaky ReLU (ReLU: slope 0) whose forward-mode derivative is its secant ``φ(z + z′) − φ(z)``."""

    @staticmethod
    def forward(z, negative_slope):
        return F.leaky_relu(z, negative_slope) if negative_slope else z.clamp_min(0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, ctx.negative_slope = inputs
        ctx.save_for_forward(z)
        ctx.save_for_backward(z)

    @staticmethod
    def jvp(ctx, zt, _):
        z, = ctx.saved_tensors
        a = ctx.negative_slope
        return _SecantUnit.forward(z + zt, a) - _SecantUnit.forward(z, a)

    @staticmethod
    def backward(ctx, grad):
        z, = ctx.saved_tensors
        return _SecantMask.apply(grad, z, ctx.negative_slope), None


_RELUS = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}
_LEAKY = {F.leaky_relu, F.leaky_relu_}
#: piecewise-linear functions left as they are (their derivative, not a secant): named in ``Secant.uncovered``
_UNCOVERED = ("max_pool", "hardtanh", "relu6", "threshold", "prelu", "rrelu", "hardswish", "hardsigmoid")


class Secant(TorchFunctionMode):
    """Within it, every ReLU and leaky ReLU call (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``Tensor.relu`` and
    their in-place forms, ``F.leaky_relu``) is a unit with the same values and a secant forward-mode derivative.
    ``uncovered``: the other piecewise-linear functions called within it (left as they are)."""

    def __init__(self):
        super().__init__()
        self.uncovered: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELUS:
            return _SecantUnit.apply(args[0], 0.0)
        if func in _LEAKY:
            slope = args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01)
            return _SecantUnit.apply(args[0], float(slope))
        name = getattr(func, "__name__", "")
        if any(u in name for u in _UNCOVERED):
            self.uncovered.add(name.strip("_"))
        return func(*args, **kwargs)
