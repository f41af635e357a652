"""Certificates by bound propagation: interval bounds and a linear relaxation of the perturbed network.

The set.  Per weighted layer l (an :class:`~setsens.weights.layers.Affine`), ‖ΔWˡ‖_∞ ≤ ε_l (the layer
operator's max row ℓ1 norm) and ‖Δbˡ‖_∞ ≤ β_l.  Given the perturbed layer input ĥ, the term ΔWˡ ĥ ranges
*exactly* over the box |e_j| ≤ ε_l ‖ĥ‖_∞, each output j on its own (each row of ΔWˡ chosen on its own; a
convolution's operator is any linear map of that norm).  So the perturbed network is the clean one with an
additive noise e_l, |e_l| ≤ r_l = ε_l U_{l-1} + β_l elementwise, at every weighted layer, where
U_{l-1} ≥ ‖ĥ_{l-1}‖_∞ comes from bounds on the layer's input.  ``budget="entrywise"`` (dense layers only:
|ΔW_jk| ≤ ε_l, the weight set of auto_LiRPA) gives |e_j| ≤ ε_l ‖ĥ‖_1 instead; the back-substitution keeps
that term linear in ĥ (|ĥ_k| ≤ its chord over the interval) and carries it to earlier layers.

:func:`interval_margin_bound` (IBP).  Per-neuron intervals ∋ ĥ are pushed through the steps (x fixed), kept as
the change ĥ − h ∈ [dlo, dup] from the clean state h, so that rounding is at the scale of the change (absolute
intervals of width 1e-18 around values of size 1 lose their centre to rounding and a deep network amplifies the
drift: an early version "certified" misclassified ResNet-56 images at ρ = 3e-20).  Affine — centre W c, radius
|W| (r + n u |c|) + r_l (a convolution applies |kernel|; n u |c| covers the rounding of W c); activations (ReLU,
ReLU6, Hardtanh(0, c)) — σ(h + d) − σ(h), monotone in d; max pooling — [d at the argmax of h, max d]; average
pooling, shortcut A, Flatten — linear with entries ≥ 0; :class:`ChannelAffine` — the radius times |s|; a
residual block adds its two branches.  After every step the change is intersected with [−δ, δ], (δ, H) the norm
recursion of :mod:`.layers` (``hidden="clean"`` form), and (δ, H) are tightened back from the interval: both are
sound, so the intersection is.  The margin m̂_{yi} = m_{yi} + (W_y − W_i)(ĥ − h) + e_y − e_i (+ Δb) is bounded
from the change at the last layer's input.  Cost: about two forward passes.

:func:`linear_relaxation_margin_bound` (CROWN-style back-substitution).  Rows Λ (one per sample and class
i ≠ y, chunked) start at the margins and walk back through the step tree, keeping Λ·ĥ + c ≤ m̂ valid:

* Affine: the noise adds −Σ_j |Λ_j| r_l, the bias Λ·b, and Λ ← Λ W (a vector–Jacobian product of the
  step's linear map, so convolutions need no hand-written transpose);
* activation σ = clamp(·, 0, c) (c = ∞: ReLU) from the pre-activation interval: σ(z) = relu(z) − relu(z − c),
  each ReLU relaxed as usual (stable: exact; unstable: upper chord, lower slope 1 if up > −lo else 0), Λ⁺
  takes the lower relaxation and Λ⁻ the upper;
* max pooling: lower y ≥ x_k* (k* the element with the largest lower bound, routed by the pool's own
  gradient); upper y = x_k* when lo_k* ≥ up_j for every other j of a non-overlapping window, else y ≤ max up;
* parameter-free affine steps (pooling, shortcut A, Flatten, ChannelAffine): Λ ← vjp, c += Λ·f(0);
* residual block: Λ goes into the branch and the shortcut, the two results are added at the block input;
* at the input Λ·x is a number.

Pre-activation intervals (for the activations and max pools): ``intermediate="ibp"`` uses the intervals
above (two forward passes: scales to ResNet-56, no per-neuron matrix is formed); ``"crown"`` back-substitutes
one row per neuron of every pre-activation layer (intersected with the interval; cost one backward pass per
neuron: MLPs and small CNNs); ``"auto"`` takes crown when every pre-activation layer (input of an activation
or max pool) has at most :data:`AUTO_CROWN_NEURONS` (4096) neurons per input, else ibp throughout.

Both functions return LOWER bounds on every perturbed margin over the whole budget set; the linear one returns
the larger of its relaxation and the interval bound (both sound), and the interval bound is never below the
clean form of the norm bound, m − η_clean: paper ⊆ clean ⊆ interval ⊆ linear as certified sets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vjp

from .bounds import layer_budgets
from .layers import Activation, Affine, ChannelAffine, Gap, MaxPool, Network, Residual, _walk_steps as _walk
from .network import UnsupportedNetworkError, check_inputs, check_labels, check_weights

__all__ = ["interval_margin_bound", "linear_relaxation_margin_bound", "AUTO_CROWN_NEURONS"]

#: ``intermediate="auto"``: crown when no pre-activation layer has more neurons than this per input
AUTO_CROWN_NEURONS = 4096


# ---------------------------------------------------------------- the forward pass: intervals and radii


@dataclass
class _Bounds:
    """What the forward pass leaves for the back-substitution (per input of the batch)."""

    x: Tensor
    radius: dict = field(default_factory=dict)  # Affine index → r_l, shape (N,)
    pre: dict = field(default_factory=dict)  # id(Activation or MaxPool step) → (lo, up) of its input
    last: tuple | None = None  # (h, dlo, dup) at the last layer's input: ĥ − h ∈ [dlo, dup]
    # entrywise budget: Affine index → (ε_l a, ε_l Σ_k b_k + β_l), |e_j| ≤ ε_l Σ_k (a_k ĥ_k + b_k) + β_l
    linear_noise: dict = field(default_factory=dict)


class _Ctx:
    """The attributes :meth:`Step.propagate` reads (the norm recursion of :mod:`.layers`)."""

    def __init__(self, e, beta, M, depth):
        self.e, self.beta, self.M, self.depth, self.final = e, beta, M, depth, None


def _fixed(step):
    return lambda h: step.forward(h, None)


def _clamp_top(step: Activation, like: Tensor) -> float:
    """c with σ = clamp(·, 0, c) (∞ for ReLU), checked numerically; anything else is refused."""
    t = torch.tensor([-2.0, -0.5, 0.0, 0.3, 0.7, 1.0, 2.0, 5.0, 6.0, 7.0, 1e6], dtype=like.dtype)
    s = step.act(t)
    c = float(step.act(torch.tensor([1e30], dtype=like.dtype)))
    c = float("inf") if c >= 1e30 else c
    if not torch.equal(s, t.clamp(0.0, c)):
        raise UnsupportedNetworkError(f"the linear relaxation supports clamp(·, 0, c) activations only "
                                      f"(ReLU, ReLU6, Hardtanh(0, c)), got {step.name}")
    return c


def _activation_change(h: Tensor, d: Tensor, c: float) -> Tensor:
    """σ(h + d) − σ(h) for σ = clamp(·, 0, c), computed at the scale of d (monotone in d)."""
    inside = torch.clamp(d, min=-h, max=c - h)
    below = torch.clamp(h + d, 0.0, c)
    above = torch.clamp(d + (h - c), -c, 0.0) if c != float("inf") else d
    return torch.where(h < 0, below, torch.where(h > c, above, inside))


def _forward(net: Network, out: _Bounds, e: Tensor, beta: Tensor, budget: str, crown=None) -> _Bounds:
    """Fill ``out``: the radii r_l, the pre-activation intervals, the last layer's input interval.

    The intervals are kept as the change ĥ − h ∈ [dlo, dup] from the clean state h (so that their width, not
    h's size, sets the rounding), each step's IBP ∩ [−δ, δ] of the norm recursion; ``crown(frames, shape)``
    gives the back-substituted (lo, up) of the state at ``frames`` (from what ``out`` holds so far) or ``None``."""
    x = out.x
    # the norm recursion's budget: ‖ΔW‖_∞ ≤ ε · fan-in under the entrywise budget (dense layers)
    e_op = e if budget == "operator" else e * torch.tensor([a.weight[0].numel() for a in net.affines], dtype=e.dtype)
    ctx = _Ctx(e_op, beta, net.norms().to(x.dtype), net.depth)
    B = x.flatten(1).abs().amax(1)
    u = torch.finfo(x.dtype).eps

    def tighten(h, dlo, dup, g):
        delta = _b(g.delta, h)
        dlo, dup = torch.maximum(dlo, -delta), torch.minimum(dup, delta)
        mag = torch.maximum((h + dlo).abs(), (h + dup).abs()).flatten(1).amax(1)
        H = torch.minimum(torch.minimum(g.H, mag), h.flatten(1).abs().amax(1) + g.delta)
        delta = torch.minimum(g.delta, torch.maximum(dup, -dlo).flatten(1).amax(1))
        return dlo, dup, Gap(delta, H)

    def run(steps, h, dlo, dup, g, frames):
        for i, step in enumerate(steps):
            here = frames + [(steps, i)]
            if isinstance(step, Residual):
                hb, lb, ub, gb = run(step.branch, h, dlo, dup, g, here)
                hs, ls, us, gs = run(step.shortcut, h, dlo, dup, g, here)
                h, dlo, dup, g = hb + hs, lb + ls, ub + us, Gap(gb.delta + gs.delta, gb.H + gs.H)
                dlo, dup, g = tighten(h, dlo, dup, g)
                continue
            if isinstance(step, (Activation, MaxPool)):
                # back-substitution gains only past a nonlinearity and not right after one (whose interval
                # image of the previous interval is already exact)
                useful = out.pre and not (i > 0 and isinstance(steps[i - 1], (Activation, MaxPool)))
                got = crown(here, h.shape[1:]) if crown is not None and useful else None
                if got is not None:  # absolute bounds: a rounding allowance at the scale of h
                    tol = 1e-12 * (h.abs() + got[0].abs() + got[1].abs())
                    dlo = torch.maximum(dlo, got[0] - h - tol)
                    dup = torch.maximum(torch.minimum(dup, got[1] - h + tol), dlo)
                out.pre[id(step)] = (h + dlo, h + dup)
            if isinstance(step, Affine):
                if budget == "entrywise" and step.conv is not None and float(e[step.index]) > 0:
                    raise ValueError("budget='entrywise' (|ΔW_jk| ≤ ε) is for dense layers only; layer "
                                     f"{step.index} ({step.name}) is a convolution: use budget='operator'")
                mag = torch.maximum((h + dlo).abs(), (h + dup).abs()).flatten(1)
                U = mag.sum(1) if budget == "entrywise" else torch.minimum(mag.amax(1), g.H)
                r = e[step.index] * U + beta[step.index]
                out.radius[step.index] = r
                if budget == "entrywise" and step.conv is None:
                    out.linear_noise[step.index] = _abs_chord(h, dlo, dup, e[step.index], beta[step.index])
                if step.index == net.depth - 1:
                    out.last = (h, dlo, dup)
                c0, rad = (dlo + dup) / 2, (dup - dlo) / 2
                hn, c = _affine(step, h), step.linear(step.weight, c0)
                # the rounding of W c0, |fl(W c0) − W c0| ≤ n u |W| |c0|, goes into the radius
                rad = step.linear(step.weight.abs(), rad + step.weight[0].numel() * u * c0.abs()) + _b(r, c)
                dlo, dup = c - rad, c + rad
            elif isinstance(step, Activation):
                top = _clamp_top(step, h)
                hn, dlo, dup = step.forward(h, None), _activation_change(h, dlo, top), _activation_change(h, dup, top)
            elif isinstance(step, MaxPool):  # max(h + d) − max h ∈ [d at the argmax of h, max d]
                hn, dlo_at = torch.func.jvp(step.fn, (h,), (dlo,))
                dlo, dup = dlo_at, step.fn(dup)
            elif isinstance(step, ChannelAffine):
                hn = step.forward(h, None)
                s = step._view(step.scale, h)
                c, rad = (dlo + dup) / 2 * s, (dup - dlo) / 2 * s.abs()
                dlo, dup = c - rad, c + rad
            else:  # pooling, shortcut A, Flatten: linear, entries ≥ 0, no offset, so monotone
                hn, dlo, dup = step.forward(h, None), step.forward(dlo, None), step.forward(dup, None)
            g = step.propagate(g, ctx)
            h = hn
            dlo, dup, g = tighten(h, dlo, dup, g)
        return h, dlo, dup, g

    zero = torch.zeros_like(x)
    run(net.steps, x, zero, zero, Gap(torch.zeros_like(B), B), [])
    return out


def _abs_chord(h: Tensor, dlo: Tensor, dup: Tensor, e: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """(ε a, ε Σ_k b_k + β) with |ĥ_k| ≤ a_k ĥ_k + b_k on ĥ_k ∈ [lo_k, up_k] (the chord of |·|; the
    identity where lo ≥ 0): the entrywise noise bound Σ_k |ĥ_k| kept linear in ĥ, so the back-substitution
    carries it to earlier layers instead of concretising it at the interval (never looser)."""
    lo, up = (h + dlo).flatten(1), (h + dup).flatten(1)
    width = up - lo
    a = torch.where(width > 0, (up.abs() - lo.abs()) / torch.where(width > 0, width, torch.ones_like(width)),
                    torch.sign(lo))
    return e * a.reshape(h.shape), e * (lo.abs() - a * lo).sum(1) + beta


def _affine(step: Affine, h: Tensor) -> Tensor:
    z = step.linear(step.weight, h)
    return z if step.bias is None else z + step.bias_term(step.bias)


def _b(v: Tensor, like: Tensor) -> Tensor:
    """A per-input vector (N,) or per-row vector broadcast against ``like`` (N, …)."""
    return v.view(-1, *[1] * (like.ndim - 1))


# ---------------------------------------------------------------- back-substitution


def _relu_relax(lo: Tensor, up: Tensor):
    """(a_l, a_u, b_u): a_l z ≤ relu(z) ≤ a_u z + b_u on [lo, up] (lower intercept 0)."""
    unstable = (lo < 0) & (up > 0)
    a_u = torch.where(unstable, up / (up - lo).clamp_min(1e-300), (lo >= 0).to(lo.dtype))
    b_u = torch.where(unstable, -a_u * lo, torch.zeros_like(lo))
    a_l = torch.where(unstable, (up > -lo).to(lo.dtype), (lo >= 0).to(lo.dtype))
    return a_l, a_u, b_u


def _activation_relax(lo, up, c):
    """(a_l, b_l, a_u, b_u) for clamp(z, 0, c) = relu(z) − relu(z − c)."""
    a1l, a1u, b1u = _relu_relax(lo, up)
    if c == float("inf"):
        return a1l, torch.zeros_like(lo), a1u, b1u
    a2l, a2u, b2u = _relu_relax(lo - c, up - c)
    # relu(z − c) relaxed in z: a2 (z − c) + b2
    return a1l - a2u, -(b2u - a2u * c), a1u - a2l, b1u + a2l * c


def _pullback(fn, lam: Tensor, primal: Tensor) -> Tensor:
    """Λ ∘ (Jacobian of ``fn`` at ``primal``): the vector–Jacobian product, one per row."""
    _, back = vjp(fn, primal)
    return back(lam)[0]


def _non_overlapping(fn, shape) -> bool:
    if isinstance(fn, nn.MaxPool2d):
        pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
        return pair(fn.kernel_size) == pair(fn.stride or fn.kernel_size) and pair(fn.dilation) == (1, 1) \
            and pair(fn.padding) == (0, 0)
    if isinstance(fn, nn.AdaptiveMaxPool2d):
        out = fn.output_size if isinstance(fn.output_size, (tuple, list)) else (fn.output_size,) * 2
        return all(o is None or s % o == 0 for o, s in zip(out, shape[-2:]))
    return False


def _back(steps, lam: Tensor, const: Tensor, rows: Tensor, bd: _Bounds):
    """Back-substitute Λ (R, *output shape) through ``steps``: (Λ at their input, const)."""
    for step in reversed(steps):
        if isinstance(step, Residual):
            lb, cb = _back(step.branch, lam, const, rows, bd)
            ls, cs = _back(step.shortcut, lam, torch.zeros_like(const), rows, bd)
            lam, const = lb + ls, cb + cs
        elif isinstance(step, Affine):
            norm1 = lam.flatten(1).abs().sum(1)
            noise = bd.linear_noise.get(step.index)
            const = const - norm1 * (bd.radius[step.index] if noise is None else noise[1])[rows]
            if step.bias is not None:
                const = const + (lam * step.bias_term(step.bias)).flatten(1).sum(1)
            if step.conv is None:
                lam = lam @ step.weight
            else:
                zero = torch.zeros((lam.shape[0], *step.in_shape), dtype=lam.dtype, device=lam.device)
                lam = _pullback(lambda h: step.linear(step.weight, h), lam, zero)
            if noise is not None:
                lam = lam - norm1.view(-1, *[1] * (lam.ndim - 1)) * noise[0][rows]
        elif isinstance(step, Activation):
            lo, up = (t[rows] for t in bd.pre[id(step)])
            a_l, b_l, a_u, b_u = _activation_relax(lo, up, _clamp_top(step, lam))
            pos, neg = lam.clamp(min=0), lam.clamp(max=0)
            const = const + (pos * b_l + neg * b_u).flatten(1).sum(1)
            lam = pos * a_l + neg * a_u
        elif isinstance(step, MaxPool):
            lo, up = (t[rows] for t in bd.pre[id(step)])
            lo_k = step.fn(lo)  # the largest lower bound of each window
            pos, neg = lam.clamp(min=0), lam.clamp(max=0)
            if _non_overlapping(step.fn, lo.shape):
                _, back = vjp(step.fn, lo)
                # the others' upper bounds: the pool of up with each window's k* removed
                chosen = back(torch.ones_like(lo_k))[0] > 0
                others = step.fn(up.masked_fill(chosen, float("-inf")))
                dom = (lo_k >= others).to(lam.dtype)
            else:
                dom = torch.zeros_like(lo_k)
            const = const + (neg * (1 - dom) * step.fn(up)).flatten(1).sum(1)
            lam = _pullback(step.fn, pos + neg * dom, lo)
        else:  # parameter-free affine: pooling, shortcut A, Flatten, ChannelAffine
            fn = _fixed(step)
            zero = torch.zeros((1, *step.in_shape), dtype=lam.dtype, device=lam.device)
            const = const + (lam * fn(zero)).flatten(1).sum(1)
            lam = _pullback(fn, lam, zero.expand(lam.shape[0], *step.in_shape).contiguous())
    return lam, const


def _back_frames(frames, lam, const, rows, bd):
    """Back-substitute from a position inside the step tree (the frames of its forward walk) to the input."""
    for frame in reversed(frames):
        steps, i = frame
        lam, const = _back(steps[:i], lam, const, rows, bd)
    return const + (lam * bd.x[rows]).flatten(1).sum(1)


def _crown_intermediate(bd: _Bounds, batch_size: int):
    """The ``crown`` hook of :func:`_forward`: (lo, up) of the state at ``frames`` by back-substitution."""

    def crown(frames, shape):
        n_neurons = int(torch.tensor(shape).prod())
        n_rows = bd.x.shape[0] * n_neurons
        lows, ups = [], []
        for s in range(0, n_rows, batch_size):
            k = torch.arange(s, min(s + batch_size, n_rows), device=bd.x.device)
            rows = k // n_neurons
            lam = F.one_hot(k % n_neurons, n_neurons).to(bd.x.dtype).reshape(len(k), *shape)
            zero = torch.zeros(len(k), dtype=lam.dtype, device=lam.device)
            lows.append(_back_frames(frames, lam, zero, rows, bd))
            ups.append(-_back_frames(frames, -lam, zero, rows, bd))
        N = bd.x.shape[0]
        return torch.cat(lows).reshape(N, *shape), torch.cat(ups).reshape(N, *shape)

    return crown


# ---------------------------------------------------------------- the public bounds


def _setup(net, x, y, eps, beta, budget, activation):
    if budget not in ("operator", "entrywise"):
        raise ValueError(f"budget must be 'operator' (‖ΔW‖_∞ ≤ ε) or 'entrywise' (|ΔW_jk| ≤ ε), got {budget!r}")
    if not isinstance(net, Network):
        net = Network.from_mlp(check_weights(net), activation=activation)
    net = check_weights(net).detach()
    x = check_inputs(net, x)
    y = check_labels(y, x.shape[0], net[-1].shape[0])
    d = len(net)
    if isinstance(eps, (int, float)) or (isinstance(eps, Tensor) and eps.ndim == 0):
        eps = [float(eps)] * d
    e, _ = layer_budgets(eps, None, net)
    if beta is None:
        b = torch.zeros_like(e)
    else:
        if isinstance(beta, (int, float)) or (isinstance(beta, Tensor) and beta.ndim == 0):
            beta = [float(beta)] * d
        b, _ = layer_budgets(beta, None, net, "beta")
    return net, x, y, e.detach(), b.detach()


def _spec(y: Tensor, K: int) -> tuple[Tensor, Tensor, Tensor]:
    """(C, rows, others): one row e_y − e_i per input and class i ≠ y, the input of each row, the i's."""
    N = y.shape[0]
    others = torch.arange(K, device=y.device).repeat(N, 1)
    others = others[others != y[:, None]].reshape(N, K - 1)
    rows = torch.arange(N, device=y.device).repeat_interleave(K - 1)
    C = F.one_hot(y[rows], K) - F.one_hot(others.flatten(), K)
    return C, rows, others


def _assemble(values: Tensor, others: Tensor, y: Tensor, K: int) -> Tensor:
    out = torch.full((y.shape[0], K), float("inf"), dtype=values.dtype, device=values.device)
    return out.scatter(1, others, values.reshape(others.shape))


def _interval_lower(net: Network, bd: _Bounds, y: Tensor) -> Tensor:
    """(N, K) lower bounds of m̂_{yi} from the interval of the last layer's input: m_{yi} + Λ (ĥ − h) − 2 r_d."""
    last = net.affines[-1]
    K = last.weight.shape[0]
    C, rows, others = _spec(y, K)
    C = C.to(last.weight.dtype)
    h, dlo, dup = bd.last
    lam = C @ last.weight
    c, r = (dlo + dup) / 2, (dup - dlo) / 2
    m = (C * _affine(last, h)[rows]).sum(1)
    val = m + (lam * c[rows]).sum(1) - (lam.abs() * r[rows]).sum(1) - 2 * bd.radius[last.index][rows]
    return _assemble(val, others, y, K)


@torch.no_grad()
def interval_margin_bound(net, x: Tensor, y: Tensor, eps, beta=None, budget: str = "operator",
                          activation="relu") -> Tensor:
    """(N, K) LOWER bounds on the perturbed margins m̂_{y_j i}(x_j) over the whole budget set (column y: +inf).

    The budget set: ‖ΔWˡ‖_∞ ≤ ε_l (``budget="operator"``, the operator's max row ℓ1 norm, as
    :func:`~setsens.weights.bounds.margin_change_bound`) or |ΔWˡ_jk| ≤ ε_l (``"entrywise"``, dense layers
    only), and ‖Δbˡ‖_∞ ≤ β_l (``beta``, default none).  ``net``: a :class:`Network` or a list of bias-free MLP
    weight matrices (with ``activation``); ``eps``/``beta``: one value or one per weighted layer (e.g.
    :func:`~setsens.weights.relative_budget`).  Interval bound propagation intersected with the norm
    recursion's h ± δ (module docstring); never below m − η of ``hidden="clean"``.  Cost: about two forward
    passes of the batch.  Use float64 for deep networks.
    """
    net, x, y, e, b = _setup(net, x, y, eps, beta, budget, activation)
    bd = _forward(net, _Bounds(x), e, b, budget)
    return _interval_lower(net, bd, y)


@torch.no_grad()
def linear_relaxation_margin_bound(net, x: Tensor, y: Tensor, eps, beta=None, budget: str = "operator",
                                   intermediate: str = "auto", batch_size: int = 4096,
                                   activation="relu") -> Tensor:
    """(N, K) LOWER bounds on the perturbed margins m̂_{y_j i}(x_j) over the whole budget set (column y: +inf).

    The set and the arguments as :func:`interval_margin_bound`.  The margins are back-substituted through
    the network's steps with the linear relaxation of the module docstring (noise −|Λ| r_l per weighted
    layer), from pre-activation intervals chosen by ``intermediate``: ``"ibp"`` (the interval pass),
    ``"crown"`` (each pre-activation layer back-substituted too, one row per neuron, intersected with the
    interval) or ``"auto"`` (crown when no pre-activation layer has more than :data:`AUTO_CROWN_NEURONS`
    neurons per input, else ibp).  Returns the larger of the relaxation and :func:`interval_margin_bound` (both sound).
    ``batch_size``: rows Λ per back-substitution chunk.  Cost: the interval pass, plus N (K−1) backward
    rows through the network, plus (crown) 2 × neurons × N backward rows through each layer's prefix.
    """
    if intermediate not in ("auto", "ibp", "crown"):
        raise ValueError(f"intermediate must be 'auto', 'ibp' or 'crown', got {intermediate!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    net, x, y, e, b = _setup(net, x, y, eps, beta, budget, activation)
    bd = _Bounds(x)
    if intermediate == "auto":
        widest = max((math.prod(s.in_shape) for s in _walk(net.steps) if isinstance(s, (Activation, MaxPool))),
                     default=0)
        intermediate = "crown" if widest <= AUTO_CROWN_NEURONS else "ibp"
    crown = None if intermediate == "ibp" else _crown_intermediate(bd, batch_size)
    _forward(net, bd, e, b, budget, crown)
    K = net[-1].shape[0]
    C, rows, others = _spec(y, K)
    C = C.to(x.dtype)
    vals = []
    for s in range(0, len(rows), batch_size):
        r = rows[s : s + batch_size]
        zero = torch.zeros(len(r), dtype=x.dtype, device=x.device)
        vals.append(_back_frames([(net.steps, len(net.steps))], C[s : s + batch_size], zero, r, bd))
    lin = _assemble(torch.cat(vals), others, y, K)
    return torch.maximum(lin, _interval_lower(net, bd, y))
