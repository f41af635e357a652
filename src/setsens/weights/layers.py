"""Layer kinds beyond the bias-free MLP: the steps of :class:`Network` and their bound rules.

A :class:`Network` is a list of steps.  The *weighted* steps are :class:`Affine` (a dense matrix or
a convolution, with its bias, BatchNorm in eval mode folded in); they are the layers a weight
perturbation moves, numbered 0 … d−1 in the order a forward pass meets them (inside a residual
block: the branch, then the shortcut).  ``net[l]`` is weighted layer l's (folded) weight tensor,
``len(net)`` is d, so code written for a list of weight matrices reads a network the same way.

The perturbation set is B_ε = {ΔW : ‖ΔWˡ‖_∞ ≤ ε_l, ‖Δbˡ‖_∞ ≤ β_l}, ‖A‖_∞ = max_j Σ_k |A_jk| the
ℓ∞-induced norm of the *linear operator* of the layer (for a convolution: of its matrix on the
flattened input, every linear ΔW of that norm is allowed, structured or not).

Bound recursion (one pass of :func:`setsens.weights.network.layer_loop`).  Each step maps a pair
(δ, H), δ ≥ ‖ĥ − h‖_∞ (perturbed minus clean state) and H ≥ ‖ĥ‖_∞, from its input to its output;
the start is (0, ‖x‖_∞).  Per step, with the inequality used:

* :class:`Affine` z = W h + b (dense, conv, conv/linear + folded BN), M = ‖W‖_∞:
  ẑ − z = W(ĥ − h) + ΔW ĥ + Δb, and ‖A v‖_∞ ≤ ‖A‖_∞ ‖v‖_∞ gives
  δ' = M δ + ε H + β,  H' = (M + ε) H + ‖b‖_∞ + β.
  A dense M is the max row ℓ1 norm; a convolution's is the max over output channels *and
  positions* of the |kernel| entries that hit in-bounds inputs (zero padding lowers it at the
  borders), computed exactly as max(conv(1, |K|)) — one convolution of an all-ones image, the
  matrix never formed.  BatchNorm (eval) is folded first: W ← s ⊙ W, b ← s (b − μ) + β_bn,
  s = γ / √(σ² + eps) per output channel; the budget is on the folded operator.
* :class:`Activation` σ (ReLU family): |σ(a) − σ(b)| ≤ |a − b|, |σ(a)| ≤ |a| elementwise:
  δ' = δ, H' = H.
* :class:`AvgPool` (fixed, linear, entries ≥ 0): ‖A‖_∞ = max(A 1) exactly (pool an all-ones
  image: < 1 at borders with ``count_include_pad``), δ' = ‖A‖ δ, H' = ‖A‖ H.
* :class:`MaxPool`: |max_i a_i − max_i b_i| ≤ max_i |a_i − b_i| (1-Lipschitz in ℓ∞), |max a| ≤
  max |a|: δ' = δ, H' = H.
* :class:`ChannelAffine` h s + t per channel, fixed (an input normalisation, a BatchNorm with
  nothing to fold into): M = max |s|, δ' = M δ, H' = M H + max |t|.
* :class:`ShortcutA` (option A: stride-2 subsampling, zero-padded channels): each output entry
  is one input entry or 0, so ‖S‖_∞ = 1: δ' = δ, H' = H.
* :class:`Flatten`: the ∞-norm is that of the entries: unchanged.
* :class:`Residual` y = F(x) + S(x) (F the branch, S the shortcut, both step lists, S = [] the
  identity): F̂(x̂) + S(x̂) − F(x) − S(x) = [F̂(x̂) − F(x)] + S(x̂ − x), triangle inequality:
  δ_out = δ_F + δ_S,  H_out = H_F + H_S, where (δ_F, H_F) and (δ_S, H_S) are the two step lists
  run from the block's input (δ, H).  For the basic block F = A₂ σ A₁ (A the folded conv+BN):
  δ_F = M₂(M₁ δ + ε₁ H + β₁) + ε₂ H₁ + β₂, H₁ = (M₁ + ε₁) H + ‖b₁‖ + β₁, so
  δ_out = (1 + M₁M₂) δ + [M₂(ε₁ H + β₁) + ε₂ H₁ + β₂]: the branch's Lipschitz growth of the
  incoming gap plus its own perturbation, the identity passing δ on unchanged.
* The last step is a dense :class:`Affine` (the logits); for a pair (y, i)
  |m̂_{yi} − m_{yi}| ≤ a_{yi} δ + 2 ε_d H + 2 β_d (Hölder, a_{yi} = ‖W_y − W_i‖_1),
  (δ, H) at its input.  On an MLP this is Theorem 2 (with biases: ``margin_change_bound_with_bias``).

``hidden="clean"`` also uses the clean pass: H ← min(H, ‖h‖_∞ + δ) after every step (sound,
‖ĥ‖ ≤ ‖h‖ + ‖ĥ − h‖; tighter than the product of norms, not the paper's form).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.mlp import ACTIVATIONS, UnsupportedNetworkError, check_activation

__all__ = [
    "Step",
    "Affine",
    "Activation",
    "AvgPool",
    "MaxPool",
    "ChannelAffine",
    "ShortcutA",
    "Flatten",
    "Residual",
    "Network",
    "Gap",
    "fold_batchnorm",
    "build_network",
]


@dataclass
class Gap:
    """(δ, H) per input: δ ≥ ‖ĥ − h‖_∞, H ≥ ‖ĥ‖_∞ (tensors broadcasting over the batch)."""

    delta: Tensor
    H: Tensor


class Step:
    """One step of a network: ``forward(h, ctx)`` and the bound rule ``propagate(gap, ctx)``."""

    in_shape: tuple = ()

    def forward(self, h: Tensor, ctx) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def propagate(self, g: Gap, ctx) -> Gap:
        return g

    def children(self) -> list["Step"]:
        return []


class Affine(Step):
    """z = W h + b: ``conv`` None (dense, W of shape (out, in)) or the ``F.conv2d`` keyword arguments."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, conv: dict | None = None, name: str = ""):
        self.weight, self.bias, self.conv, self.name = weight, bias, conv, name
        self.index = -1

    def linear(self, w: Tensor, h: Tensor) -> Tensor:
        """The operator of a weight w (shared, w.ndim = weight.ndim, or one per input) applied to h."""
        if w.ndim == self.weight.ndim:
            return h @ w.T if self.conv is None else F.conv2d(h, w, None, **self.conv)
        if self.conv is None:
            return torch.einsum("njk,nk->nj", w, h)
        n = h.shape[0]
        c = dict(self.conv)
        groups = c.pop("groups", 1)
        out = F.conv2d(h.reshape(1, -1, *h.shape[2:]), w.reshape(-1, *w.shape[2:]), None, groups=n * groups, **c)
        return out.reshape(n, -1, *out.shape[2:])

    def bias_term(self, b: Tensor) -> Tensor:
        return b if self.conv is None else b.view(-1, 1, 1) if b.ndim == 1 else b.view(*b.shape, 1, 1)

    def forward(self, h, ctx):
        ctx.records.append(h)
        z = self.linear(self.weight, h)
        if self.bias is not None:
            z = z + self.bias_term(self.bias)
        if ctx.add is not None:
            extra = ctx.add(self.index, h)
            if extra is not None:
                z = z + extra
        return z

    def norm(self) -> Tensor:
        """‖W‖_∞ of the layer's operator, exact and differentiable (see the module docstring)."""
        if self.conv is None:
            return self.weight.abs().sum(dim=1).max()
        ones = torch.ones((1, *self.in_shape), dtype=self.weight.dtype, device=self.weight.device)
        return F.conv2d(ones, self.weight.abs(), None, **self.conv).max()

    def bias_norm(self):
        return self.bias.abs().max() if self.bias is not None else 0.0

    def propagate(self, g, ctx):
        l = self.index
        if l == ctx.depth - 1:
            ctx.final = g
        e, b = ctx.e[..., l], ctx.beta[..., l]
        M = ctx.M[l]
        return Gap(M * g.delta + e * g.H + b, (M + e) * g.H + self.bias_norm() + b)


class Activation(Step):
    def __init__(self, act: Callable[[Tensor], Tensor], name: str = "relu"):
        self.act, self.name = act, name

    def forward(self, h, ctx):
        return self.act(h)


class _FixedLinear(Step):
    """A parameter-free linear step with entries ≥ 0 (``fn``); its ∞-norm is max fn(1), computed once."""

    def __init__(self, fn: Callable[[Tensor], Tensor], name: str):
        self.fn, self.name = fn, name
        self._norm = None

    def forward(self, h, ctx):
        return self.fn(h)

    def norm(self, like: Tensor) -> Tensor:
        if self._norm is None:
            self._norm = float(self.fn(torch.ones((1, *self.in_shape), dtype=torch.float64)).max())
        return self._norm

    def propagate(self, g, ctx):
        a = self.norm(g.H)
        return Gap(a * g.delta, a * g.H)


class AvgPool(_FixedLinear):
    """Average pooling (any ``nn.AvgPool2d`` / ``nn.AdaptiveAvgPool2d`` / callable): a fixed map A ≥ 0."""


class MaxPool(Step):
    """Max pooling: 1-Lipschitz in ℓ∞ and norm-non-increasing (padding is −∞ in PyTorch)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], name: str = "maxpool"):
        self.fn, self.name = fn, name

    def forward(self, h, ctx):
        return self.fn(h)


class Flatten(Step):
    def forward(self, h, ctx):
        return h.flatten(1)


class ShortcutA(Step):
    """Option-A shortcut: ``x[:, :, ::2, ::2]`` zero-padded by ``pad`` channels on each side; ‖S‖_∞ = 1."""

    def __init__(self, pad: int):
        self.pad = pad

    def forward(self, h, ctx):
        return F.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class ChannelAffine(Step):
    """A fixed per-channel affine map h s + t (input normalisation; unperturbed)."""

    def __init__(self, scale: Tensor, shift: Tensor):
        self.scale, self.shift = scale, shift

    def _view(self, t, h):
        return t.view(1, -1, *([1] * (h.ndim - 2))).to(h.dtype)

    def forward(self, h, ctx):
        return h * self._view(self.scale, h) + self._view(self.shift, h)

    def propagate(self, g, ctx):
        a = float(self.scale.abs().max())
        return Gap(a * g.delta, a * g.H + float(self.shift.abs().max()))


class Residual(Step):
    """y = F(x) + S(x): ``branch`` and ``shortcut`` are step lists (``shortcut=[]``: the identity)."""

    def __init__(self, branch: list[Step], shortcut: list[Step] | None = None):
        self.branch, self.shortcut = list(branch), list(shortcut or [])

    def children(self):
        return self.branch + self.shortcut

    def forward(self, h, ctx):
        if ctx.gap is None:
            return ctx.run(self.branch, h) + ctx.run(self.shortcut, h)
        g = ctx.gap
        yb = ctx.run(self.branch, h)
        gb, ctx.gap = ctx.gap, g
        ys = ctx.run(self.shortcut, h)
        gs = ctx.gap
        ctx.gap = Gap(gb.delta + gs.delta, gb.H + gs.H)  # propagate (the identity) then keeps it
        return yb + ys


def _describe(step) -> str:
    if isinstance(step, Affine):
        return ("Linear" if step.conv is None else "Conv2d") + (f" {step.name}" if step.name else "")
    return type(step).__name__ if step is not None else "nothing"


def _check_last(steps):
    last = steps[-1] if steps else None
    if not isinstance(last, Affine) or last.conv is not None:
        raise UnsupportedNetworkError(f"the last layer must be a dense nn.Linear (the logits), got {_describe(last)}")


def _walk_steps(steps):
    for s in steps:
        yield s
        yield from _walk_steps(s.children())


@dataclass
class Network:
    """A network as its steps; ``input_shape`` the shape of one input (without the batch)."""

    steps: list[Step]
    input_shape: tuple
    affines: list[Affine] = field(init=False)

    def __post_init__(self):
        self.input_shape = tuple(int(s) for s in self.input_shape)
        self.affines = [s for s in _walk_steps(self.steps) if isinstance(s, Affine)]
        for i, a in enumerate(self.affines):
            a.index = i
        _check_last(self.steps)
        K = self.affines[-1].weight.shape[0]
        if K < 2:
            raise ValueError(f"the last layer must have at least 2 outputs (classes), got {K}")
        from .network import layer_loop  # the trace records every step's input shape and checks the chain

        w = self.affines[0].weight
        try:
            with torch.no_grad():
                layer_loop(self, torch.zeros((1, *self.input_shape), dtype=w.dtype, device=w.device), trace=True)
        except RuntimeError as err:
            raise UnsupportedNetworkError(
                f"the layers do not chain on inputs of shape {self.input_shape}: {str(err).splitlines()[0]}"
            ) from None

    # a network reads like the list of its (folded) weight tensors
    def __len__(self):
        return len(self.affines)

    def __getitem__(self, l):
        if isinstance(l, slice):
            return [a.weight for a in self.affines[l]]
        return self.affines[l].weight

    def __iter__(self):
        return (a.weight for a in self.affines)

    @property
    def depth(self) -> int:
        return len(self.affines)

    @property
    def biases(self) -> list[Tensor | None]:
        return [a.bias for a in self.affines]

    def norms(self) -> Tensor:
        """M_l = ‖Wˡ‖_∞ of every weighted layer's operator (exact; differentiable)."""
        return torch.stack([torch.as_tensor(a.norm(), dtype=a.weight.dtype) for a in self.affines])

    def map(self, fn: Callable[[Tensor], Tensor]) -> "Network":
        """A copy with every weight and bias replaced by ``fn`` of it (``detach``, ``double`` …)."""
        import copy

        net = copy.copy(self)
        memo = {}

        def clone(steps):
            out = []
            for s in steps:
                c = copy.copy(s)
                if isinstance(s, Affine):
                    c.weight = fn(s.weight)
                    c.bias = None if s.bias is None else fn(s.bias)
                if isinstance(s, Residual):
                    c.branch, c.shortcut = clone(s.branch), clone(s.shortcut)
                memo[id(s)] = c
                out.append(c)
            return out

        net.steps = clone(self.steps)
        net.affines = [memo[id(a)] for a in self.affines]
        return net

    def detach(self) -> "Network":
        return self.map(lambda t: t.detach())

    def to(self, dtype) -> "Network":
        return self.map(lambda t: t.to(dtype))

    @classmethod
    def from_mlp(cls, weights, biases=None, activation="relu") -> "Network":
        """The network of an MLP ``(weights, biases, activation)`` (the form of :func:`network_from_model`)."""
        from .network import get_activation

        act = get_activation(activation)
        d = len(weights)
        steps: list[Step] = []
        for l, w in enumerate(weights):
            steps.append(Affine(w, None if biases is None else biases[l], None, f"layer {l}"))
            if l < d - 1:
                steps.append(Activation(act, str(activation)))
        return cls(steps, (weights[0].shape[1],))


def fold_batchnorm(weight: Tensor, bias: Tensor | None, bn: nn.modules.batchnorm._BatchNorm):
    """(W', b') with W' h + b' = BN(W h + b) in eval mode (running statistics), per output channel."""
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedNetworkError(f"{type(bn).__name__} without running statistics cannot be folded (eval mode)")
    s = torch.rsqrt(bn.running_var.to(weight.dtype) + bn.eps)
    if bn.weight is not None:
        s = bn.weight * s
    mean = bn.running_mean.to(weight.dtype)
    b = -mean if bias is None else bias - mean
    b = s * b + (bn.bias if bn.bias is not None else 0.0)
    return weight * s.view(-1, *([1] * (weight.ndim - 1))), b


def _conv_args(m: nn.Conv2d) -> dict:
    if m.padding_mode != "zeros":
        raise UnsupportedNetworkError(f"Conv2d with padding_mode={m.padding_mode!r} is outside the setting (zeros)")
    return dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)


_POOLS_AVG = (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AdaptiveAvgPool1d)
_POOLS_MAX = (nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool1d, nn.AdaptiveMaxPool1d)


def _steps_of(module: nn.Module, name: str) -> list[Step]:
    from ..models.resnet import BasicBlock, CifarResNet, _ShortcutA

    if isinstance(module, CifarResNet):
        steps: list[Step] = []
        if module.normalize:
            std, mean = module.input_std.flatten(), module.input_mean.flatten()
            steps.append(ChannelAffine(1 / std, -mean / std))
        steps += _sequence([("conv1", module.conv1), ("bn1", module.bn1)], name)
        steps.append(Activation(ACTIVATIONS["relu"], "relu"))
        for stage in ("layer1", "layer2", "layer3"):
            steps += _steps_of(getattr(module, stage), f"{name}{stage}")
        steps += [AvgPool(lambda h: F.adaptive_avg_pool2d(h, 1), "global average pool"), Flatten()]
        steps += _steps_of(module.linear, f"{name}linear")
        return steps
    if isinstance(module, BasicBlock):
        branch = _sequence([("conv1", module.conv1), ("bn1", module.bn1), ("relu", nn.ReLU()),
                            ("conv2", module.conv2), ("bn2", module.bn2)], name + ".")
        sc = module.shortcut
        if isinstance(sc, _ShortcutA):
            shortcut: list[Step] = [ShortcutA(sc.pad)]
        else:
            shortcut = _sequence(list(sc.named_children()), name + ".shortcut.")
        return [Residual(branch, shortcut), Activation(ACTIVATIONS["relu"], "relu")]
    if isinstance(module, nn.Sequential):
        return _sequence(list(module.named_children()), name + ("." if name else ""))
    return _sequence([("", module)], name)


def _sequence(children, prefix: str) -> list[Step]:
    steps: list[Step] = []
    for i, (cname, m) in enumerate(children):
        label = f"module {prefix}{cname or i} ({type(m).__name__})"
        if isinstance(m, nn.Linear):
            steps.append(Affine(m.weight, m.bias, None, f"{prefix}{cname}"))
        elif isinstance(m, nn.Conv2d):
            steps.append(Affine(m.weight, m.bias, _conv_args(m), f"{prefix}{cname}"))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            prev = steps[-1] if steps else None
            if not isinstance(prev, Affine) or getattr(prev, "_folded", False):
                raise UnsupportedNetworkError(f"{label}: BatchNorm must directly follow a Conv2d or Linear (folded)")
            prev.weight, prev.bias = fold_batchnorm(prev.weight, prev.bias, m)
            prev._folded = True
            prev.name += f"+{cname}"
        elif isinstance(m, nn.Flatten):
            steps.append(Flatten())
        elif isinstance(m, _POOLS_AVG):
            steps.append(AvgPool(m, type(m).__name__))
        elif isinstance(m, _POOLS_MAX):
            if getattr(m, "return_indices", False):
                raise UnsupportedNetworkError(f"{label}: return_indices is not supported")
            steps.append(MaxPool(m, type(m).__name__))
        elif isinstance(m, (nn.Identity, nn.Dropout)):
            continue
        elif isinstance(m, nn.Sequential) or type(m).__name__ in ("CifarResNet", "BasicBlock"):
            steps += _steps_of(m, f"{prefix}{cname}")
        elif next(m.parameters(), None) is None and not list(m.children()):
            name = check_activation(m)  # refuses Tanh, Sigmoid … with the setting's message
            steps.append(Activation(ACTIVATIONS.get(name, m), name))
        else:
            raise UnsupportedNetworkError(
                f"{label} is outside the setting: supported are Linear, Conv2d, BatchNorm (folded), "
                "ReLU-family activations, average/max pooling, Flatten, Dropout/Identity, nn.Sequential "
                "and the CIFAR ResNet blocks of setsens.models.resnet"
            )
    return steps


def build_network(model: nn.Module, input_shape=None) -> Network:
    """The :class:`Network` of a model (eval-mode semantics: BatchNorm folded with its running statistics)."""
    from ..models.resnet import CifarResNet

    steps = _steps_of(model, "")
    _check_last(steps)
    if input_shape is None:
        if isinstance(model, CifarResNet):
            input_shape = (3, 32, 32)
        else:
            first = next((s for s in steps if not isinstance(s, (Flatten, Activation))), None)
            if isinstance(first, Affine) and first.conv is None and not isinstance(steps[0], Flatten):
                input_shape = (first.weight.shape[1],)
            else:
                raise UnsupportedNetworkError(
                    "input_shape (one input's shape, e.g. (3, 32, 32)) is needed for a network that does not "
                    "start with nn.Linear: the norms of convolutions and pooling depend on it"
                )
    return Network(steps, tuple(input_shape))
