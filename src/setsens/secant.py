"""Secant derivatives of piecewise-linear units: what a finite move does to a ReLU, in forward mode.

The gradient of a ReLU network is a step function of its weights (the mask ``1[z > 0]``), so one step of
gradient descent jumps wherever a unit changes sides, and the number of units that change sides grows with
the move: the jumps add up to a term *first order* in the move that no derivative sees.  Within
:class:`Secant`, every ReLU (and leaky ReLU) keeps its values but its forward-mode derivative along ``z′``
becomes the secant over ``z′``:

* forward: ``φ(z + z′) − φ(z)`` instead of ``φ′(z) z′``;
* in its gradient ``g·φ′(z)``: ``g′·φ′(z) + g·(φ′(z + z′) − φ′(z))`` — the mask's change over ``z′``.

Max-pooling (``F.max_pool1d/2d/3d``, ``nn.MaxPool*d``) the same way: forward ``pool(z + z′) − pool(z)``, and
in its gradient (``g`` routed to each window's largest input) the change of the routing over ``z′``.

A secant derivative is not linear in ``z′``: a tangent computed under it holds for the move it was computed at
only.  It equals the derivative wherever no unit changes sides (on a smooth network it *is* the derivative).
Other piecewise-linear units (adaptive max-pooling, hardtanh, ReLU6, …) are not replaced;
:attr:`Secant.uncovered` names the ones a run called.  Cost: one comparison more per unit (one pooling more per
max-pooling).
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


def _route(g: Tensor, index: Tensor, z: Tensor, d: int) -> Tensor:
    """Max-pooling's backward over ``d`` spatial dimensions: each window's ``g`` added at its largest input
    (``index``: flat spatial positions, as ``return_indices`` gives them), in the shape of the input ``z``."""
    flat = z.new_zeros(z.flatten(-d).shape)
    return flat.scatter_add(-1, index.flatten(-d), g.flatten(-d).to(z.dtype)).reshape(z.shape)


class _SecantRoute(torch.autograd.Function):
    """``g`` routed to each window's largest input, whose forward-mode derivative sees the routing change over
    ``z′``."""

    @staticmethod
    def forward(g, z, pool, d):
        return _route(g, pool(z)[1], z, d)

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, z, ctx.pool, ctx.d = inputs
        ctx.save_for_forward(g, z)
        ctx.save_for_backward(z)

    @staticmethod
    def jvp(ctx, gt, zt, *_):
        g, z = ctx.saved_tensors
        index = ctx.pool(z)[1]
        out = _route(gt, index, z, ctx.d) if gt is not None else torch.zeros_like(z)
        return out if zt is None else out + _route(g, ctx.pool(z + zt)[1], z, ctx.d) - _route(g, index, z, ctx.d)

    @staticmethod
    def backward(ctx, grad):
        z, = ctx.saved_tensors
        index = ctx.pool(z)[1]
        return grad.flatten(-ctx.d).gather(-1, index.flatten(-ctx.d)).reshape(index.shape), None, None, None


class _SecantMaxPool(torch.autograd.Function):
    """Max-pooling whose forward-mode derivative is its secant ``pool(z + z′) − pool(z)``."""

    @staticmethod
    def forward(z, pool, d):
        return pool(z)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, ctx.pool, ctx.d = inputs
        ctx.save_for_forward(z)
        ctx.save_for_backward(z)

    @staticmethod
    def jvp(ctx, zt, *_):
        z, = ctx.saved_tensors
        return ctx.pool(z + zt)[0] - ctx.pool(z)[0]

    @staticmethod
    def backward(ctx, grad):
        z, = ctx.saved_tensors
        return _SecantRoute.apply(grad, z, ctx.pool, ctx.d), None, None


_POOLS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}
_RELUS = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}
_LEAKY = {F.leaky_relu, F.leaky_relu_}
#: piecewise-linear functions left as they are (their derivative, not a secant): named in ``Secant.uncovered``
_UNCOVERED = ("max_pool", "hardtanh", "relu6", "threshold", "prelu", "rrelu", "hardswish", "hardsigmoid")


class Secant(TorchFunctionMode):
    """Within it, every ReLU and leaky ReLU call (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``Tensor.relu`` and
    their in-place forms, ``F.leaky_relu``) and every max-pooling (``F.max_pool1d/2d/3d``, ``nn.MaxPool*d``, without
    ``return_indices``) has the same values and a secant forward-mode derivative.  ``uncovered``: the other
    piecewise-linear functions called within it (left as they are)."""

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
        if func in _POOLS and len(args) <= 6 and not kwargs.get("return_indices", False):
            rest, options = args[1:], {**kwargs, "return_indices": True}
            return _SecantMaxPool.apply(args[0], lambda z: func(z, *rest, **options), _POOLS[func])
        name = getattr(func, "__name__", "")
        if any(u in name for u in _UNCOVERED):
            self.uncovered.add(name.strip("_"))
        return func(*args, **kwargs)
