"""Attacks on the weights inside the budget set B_ε(W) = {Ŵ : ‖Ŵˡ − Wˡ‖_∞ ≤ ε_l}.

Every attack returns perturbations that lie in B_ε (each row of ΔWˡ in the ℓ1 ball of radius
ε_l), so the margin change it finds is a *lower* bound on the worst case, to be compared with the
certified *upper* bound η (soundness: change ≤ η, always; tightness: change / η).

* :func:`random_boundary_perturbation` — every row of ΔWˡ on the ℓ1 sphere of radius ε_l
  (uniform direction on the simplex with random signs, or a random vertex).
* :func:`weight_attack` — projected gradient descent (exact Euclidean projection of each row onto
  its ℓ1 ball, :func:`project_rows_l1`) or Frank–Wolfe (vertex oracle) on per-input weight
  perturbations; cost O(N Σ n_l n_{l-1} log n_{l-1}) memory-bound per step.
  For a :class:`~setsens.weights.layers.Network` a convolution's "row" is one output channel's
  kernel (all its entries): every row in the ℓ1 ball of radius ε_l makes the operator's ‖ΔWˡ‖_∞ ≤
  ε_l (each output entry sees a subset of the kernel), so these attacks stay inside B_ε there too.
* :func:`box_attack` — the same problem in exact reduced form: for one input x, the set
  {ΔWˡ ĥ : every row of ΔWˡ in the ℓ1 ball of radius ε_l} is exactly the box of half-width
  ε_l‖ĥ‖_∞, attained by rank-one ΔWˡ = t ⊗ sign(ĥ_k*) e_k* (k* = argmax |ĥ_k|).  Sign-gradient
  ascent on t ∈ [−ε_l, ε_l]^{n_l} therefore attacks the weights at the cost of a forward pass;
  :func:`materialize_box_perturbation` rebuilds the actual ΔWˡ.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .bounds import layer_budgets
from .layers import Network
from .network import (
    check_batch,
    check_labels,
    check_weights,
    forward,
    forward_perturbed,
    get_activation,
    layer_loop,
    margins,
    perturbation_term,
)

__all__ = [
    "project_rows_l1",
    "random_boundary_perturbation",
    "weight_attack",
    "box_attack",
    "box_forward",
    "materialize_box_perturbation",
    "runner_up",
    "attacked_robust",
    "random_perturbation_accuracy",
]


def project_rows_l1(v: Tensor, radius) -> Tensor:
    """Euclidean projection of every row (last dimension) of ``v`` onto the ℓ1 ball of ``radius``.

    Exact, sort-based (Duchi et al., 2008): p = sign(v) max(|v| − θ, 0) with the threshold θ ≥ 0
    that makes ‖p‖_1 = radius when ‖v‖_1 > radius.  ``radius`` is a scalar or broadcasts to
    ``v.shape[:-1]``.  Cost O(n log n) per row.

    >>> project_rows_l1(torch.tensor([[3., -2., 0.5], [0.5, 0.25, 0.]]), 2.0)
    tensor([[ 1.5000, -0.5000,  0.0000],
            [ 0.5000,  0.2500,  0.0000]])
    """
    if not torch.isfinite(v).all():
        raise ValueError("v contains NaN or Inf")
    r = torch.as_tensor(radius, dtype=v.dtype, device=v.device)
    if not torch.isfinite(r).all() or (r < 0).any():
        raise ValueError("radius must be finite and non-negative")
    r = r.expand(v.shape[:-1])
    a = v.abs()
    n = v.shape[-1]
    u, _ = torch.sort(a, dim=-1, descending=True)
    css = torch.cumsum(u, dim=-1)
    j = torch.arange(1, n + 1, dtype=v.dtype, device=v.device)
    cond = u - (css - r[..., None]) / j > 0
    rho = (cond * j).amax(dim=-1).clamp(min=1).long()  # number of kept entries
    theta = ((css.gather(-1, (rho - 1)[..., None]).squeeze(-1) - r) / rho).clamp(min=0)
    p = v.sign() * (a - theta[..., None]).clamp(min=0)
    inside = a.sum(dim=-1) <= r
    p = torch.where(inside[..., None], v, p)
    return torch.where((r == 0)[..., None], torch.zeros_like(v), p)


def _checked(weights, x, y):
    weights, x, y = check_batch(weights, x, y)
    return _detached(weights), x, y


def _detached(weights):
    return weights.detach() if isinstance(weights, Network) else [w.detach() for w in weights]


def _rows(t: Tensor, w: Tensor) -> Tensor:
    """The view of a perturbation ``t`` (shaped like ``w``, or a stack of them) as rows: (…, n_l, rest)."""
    return t.reshape(*t.shape[: t.ndim - w.ndim], w.shape[0], -1)


def _attack_setup(weights, x, y, target, eps, layers, activation):
    """Checked inputs, the target classes, the activation and the clean margins m_{y,target}."""
    weights, x, y = _checked(weights, x, y)
    e, mask = layer_budgets(eps, layers, weights)
    target = _check_target(target, y, weights[-1].shape[0])
    act = get_activation(activation)
    with torch.no_grad():
        m0 = _pair_margin(forward(weights, x, act), y, target)
    return weights, x, y, target, e, mask, act, m0


def random_boundary_perturbation(
    weights: Sequence[Tensor],
    eps,
    layers=None,
    n: int | None = None,
    kind: str = "simplex",
    generator: torch.Generator | None = None,
) -> list[Tensor | None]:
    """Random ΔW with *every* row of ΔWˡ on the ℓ1 sphere of radius ε_l (so ‖ΔWˡ‖_∞ = ε_l).

    ``kind="simplex"``: magnitudes uniform on the simplex (normalised Exp(1) draws) with random
    signs; ``kind="vertex"``: all of a row's budget on one random entry.  ``n=None`` gives one
    shared perturbation (shaped like the weights), ``n`` a stack of n independent ones.
    Unperturbed layers get ``None``.
    """
    weights = check_weights(weights)
    e, mask = layer_budgets(eps, layers, weights)
    if isinstance(weights, Network):
        weights = list(weights)
    if kind not in ("simplex", "vertex"):
        raise ValueError(f"kind must be 'simplex' or 'vertex', got {kind!r}")
    out: list[Tensor | None] = []
    for l, w in enumerate(weights):
        if not mask[l]:
            out.append(None)
            continue
        full = tuple(w.shape) if n is None else (n, *w.shape)
        shape = full[: len(full) - w.ndim + 1] + (w[0].numel(),)
        if kind == "simplex":
            mag = -torch.log(torch.rand(shape, generator=generator, dtype=w.dtype).clamp_min(1e-30))
            mag = mag / mag.sum(dim=-1, keepdim=True)
        else:
            idx = torch.randint(0, shape[-1], shape[:-1], generator=generator)
            mag = torch.nn.functional.one_hot(idx, shape[-1]).to(w.dtype)
        sign = torch.randint(0, 2, shape, generator=generator).to(w.dtype) * 2 - 1
        out.append((e[l] * mag * sign).reshape(full))
    return out


def runner_up(logits: Tensor, y: Tensor) -> Tensor:
    """The class i ≠ y with the smallest clean margin m_{yi}, shape (N,)."""
    m = margins(logits, y).masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(), float("inf"))
    return m.argmin(dim=1)


def _pair_margin(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    return logits.gather(1, y[:, None]).squeeze(1) - logits.gather(1, target[:, None]).squeeze(1)


def _check_target(target, y, K):
    target = check_labels(target, y.shape[0], K)
    if (target == y).any():
        raise ValueError("target classes must differ from the labels")
    return target


def _keep_best(obj: Tensor, best_m: Tensor, current: Sequence, best: list) -> Tensor:
    """Per input, keep the iterate whose margin ``obj`` beats ``best_m``: updates ``best`` in place.

    Returns the new best margins; layers whose iterate is ``None`` are skipped.
    """
    better = obj < best_m
    for l, c in enumerate(current):
        if c is not None:
            best[l] = torch.where(better.view(-1, *[1] * (c.ndim - 1)), c, best[l])
    return torch.where(better, obj, best_m)


def weight_attack(
    weights: Sequence[Tensor],
    x: Tensor,
    y: Tensor,
    target: Tensor,
    eps,
    layers=None,
    activation="relu",
    method: str = "pgd",
    steps: int = 50,
    init: str = "random",
    generator: torch.Generator | None = None,
):
    """Per-input attack on the weights: minimise m̂_{y,target}(x_j) over ΔW ∈ B_ε, separately per input.

    ``method="pgd"``: step of size α_t ε_l along the row-wise ℓ∞-normalised gradient, then the
    exact projection of each row onto its ℓ1 ball (α_t cosine-decayed from 1 to 0.01);
    ``method="fw"``: Frank–Wolfe with the ℓ1-ball vertex oracle and step 2/(t+2).
    Returns ``(deltas, change)``: the best per-input perturbations (N, n_l, n_{l-1}) found and
    the margin decrease m_{y,target} − m̂_{y,target} they cause (evaluated by a plain forward pass
    of the perturbed weights).  Memory O(N Σ n_l n_{l-1}): chunk large batches.
    """
    weights, x, y, target, e, mask, act, m0 = _attack_setup(weights, x, y, target, eps, layers, activation)
    if method not in ("pgd", "fw"):
        raise ValueError(f"method must be 'pgd' or 'fw', got {method!r}")
    if init not in ("random", "zero"):
        raise ValueError(f"init must be 'random' or 'zero', got {init!r}")
    N = x.shape[0]
    if init == "random":
        start = random_boundary_perturbation(weights, e, layers, n=N, generator=generator)
    else:
        start = [torch.zeros((N, *w.shape), dtype=w.dtype) if mask[l] else None for l, w in enumerate(weights)]
    deltas = [s.clone().requires_grad_(True) if s is not None else None for s in start]
    best = [s.clone() if s is not None else None for s in start]
    with torch.no_grad():
        best_m = _pair_margin(forward_perturbed(weights, best, x, act), y, target)
    for t in range(steps):
        obj = _pair_margin(forward_perturbed(weights, deltas, x, act), y, target)
        grads = torch.autograd.grad(obj.sum(), [dl for dl in deltas if dl is not None])
        with torch.no_grad():
            gi = iter(grads)
            for l, dl in enumerate(deltas):
                if dl is None:
                    continue
                g = _rows(next(gi), weights[l])
                d = _rows(dl, weights[l])
                if method == "pgd":
                    alpha = 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t / max(steps, 1)))
                    scale = g.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
                    dl.copy_(project_rows_l1(d - alpha * e[l] * g / scale, e[l]).reshape(dl.shape))
                else:
                    k = g.abs().argmax(dim=-1, keepdim=True)
                    vertex = torch.zeros_like(d).scatter_(-1, k, -e[l] * g.gather(-1, k).sign())
                    gamma = 2.0 / (t + 2.0)
                    dl.mul_(1 - gamma).add_(gamma * vertex.reshape(dl.shape))
            cur = _pair_margin(forward_perturbed(weights, deltas, x, act), y, target)
            best_m = _keep_best(cur, best_m, deltas, best)
    return best, m0 - best_m


def box_forward(weights: Sequence[Tensor], ts: Sequence, x: Tensor, activation="relu") -> Tensor:
    """Logits under the reduced perturbation: z̃ˡ = Wˡĥ + tˡ ‖ĥ‖_∞ (tˡ of shape (N, n_l) or None)."""

    def add(l, h):
        return None if ts[l] is None else ts[l] * h.abs().amax(dim=1, keepdim=True)

    return layer_loop(weights, x, activation, add)[-1]


def _box_delta(t: Tensor, h: Tensor) -> Tensor:
    """The per-input ΔW = t ⊗ sign(h_k*) e_k* (k* = argmax |h_k|), shape (N, n_l, n_{l-1})."""
    k = h.abs().argmax(dim=1)
    s = h.gather(1, k[:, None]).squeeze(1).sign()
    s = torch.where(s == 0, torch.ones_like(s), s)
    col = torch.nn.functional.one_hot(k, h.shape[1]).to(h.dtype) * s[:, None]
    return t[:, :, None] * col[:, None, :]


@torch.no_grad()
def materialize_box_perturbation(weights: Sequence[Tensor], ts: Sequence, x: Tensor, activation="relu"):
    """The per-input weight perturbations ΔWˡ = tˡ ⊗ sign(ĥ_k*) e_k* realising :func:`box_forward`.

    Each row of ΔWˡ has ℓ1 norm |tˡ_j| ≤ ε_l, so they lie in B_ε; shape (N, n_l, n_{l-1}).
    """
    out = []

    def add(l, h):
        out.append(None if ts[l] is None else _box_delta(ts[l], h))
        return perturbation_term(out[-1], h)

    layer_loop(weights, x, activation, add)
    return out


def box_attack(
    weights: Sequence[Tensor],
    x: Tensor,
    y: Tensor,
    target: Tensor,
    eps,
    layers=None,
    activation="relu",
    steps: int = 40,
    restarts: int = 1,
    generator: torch.Generator | None = None,
):
    """Per-input attack in exact reduced form: minimise m̂_{y,target} over tˡ ∈ [−ε_l, ε_l]^{n_l}.

    Sign-gradient descent with a cosine-decayed step (from ε_l to 0.01 ε_l), first from the
    vertex given by the gradient sign at t = 0, then from ``restarts − 1`` random vertices; the
    best iterate per input is kept.  Returns ``(ts, change)`` with change = m − m̂ ≥ 0 for the
    pair (y, target).  Cost: ``steps × restarts`` forward/backward passes.
    """
    if isinstance(weights, Network):
        raise ValueError("box_attack is the exact reduced form for MLPs; use weight_attack on a Network")
    weights, x, y, target, e, mask, act, m0 = _attack_setup(weights, x, y, target, eps, layers, activation)
    if steps < 1 or restarts < 1:
        raise ValueError("steps and restarts must be ≥ 1")
    N = x.shape[0]
    idx = [l for l in range(len(weights)) if mask[l]]
    best_m = m0.clone()
    best = [torch.zeros((N, w.shape[0]), dtype=w.dtype) if mask[l] else None for l, w in enumerate(weights)]

    def objective(ts):
        return _pair_margin(box_forward(weights, ts, x, act), y, target)

    for r in range(restarts):
        ts = [torch.zeros((N, w.shape[0]), dtype=w.dtype) if mask[l] else None for l, w in enumerate(weights)]
        for l in idx:
            ts[l].requires_grad_(True)
        if r == 0:
            g = torch.autograd.grad(objective(ts).sum(), [ts[l] for l in idx])
            with torch.no_grad():
                for l, gl in zip(idx, g):
                    ts[l].copy_(-e[l] * torch.where(gl == 0, torch.ones_like(gl), gl.sign()))
        else:
            with torch.no_grad():
                for l in idx:
                    ts[l].copy_(e[l] * (torch.randint(0, 2, ts[l].shape, generator=generator).to(ts[l].dtype) * 2 - 1))
        for t in range(steps):
            obj = objective(ts)
            with torch.no_grad():
                best_m = _keep_best(obj, best_m, ts, best)
            g = torch.autograd.grad(obj.sum(), [ts[l] for l in idx])
            alpha = 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t / steps))
            with torch.no_grad():
                for l, gl in zip(idx, g):
                    ts[l].copy_(torch.maximum(torch.minimum(ts[l] - alpha * e[l] * gl.sign(), e[l]), -e[l]))
        with torch.no_grad():
            best_m = _keep_best(objective(ts), best_m, ts, best)
    return best, m0 - best_m


def attacked_robust(
    weights: Sequence[Tensor],
    x: Tensor,
    y: Tensor,
    eps,
    layers=None,
    activation="relu",
    n_targets: int | None = None,
    steps: int = 40,
    restarts: int = 1,
    generator: torch.Generator | None = None,
    batch_size: int = 1024,
) -> Tensor:
    """Boolean (N,): the input survives :func:`box_attack` towards its ``n_targets`` closest classes.

    An input counts as broken if it is misclassified clean or if any attacked margin
    m̂_{y,i} ≤ 0 (ties count as errors, as in the certificate).  ``n_targets=None`` = all K−1.
    Per-input worst case, so certified ⊆ robust-under-attack ⊆ clean-correct.  A :class:`Network`
    is attacked by :func:`weight_attack` (PGD on its kernels) instead.
    """
    weights, x, y = _checked(weights, x, y)
    K = weights[-1].shape[0]
    n_targets = K - 1 if n_targets is None else max(1, min(int(n_targets), K - 1))
    out = []
    for s in range(0, x.shape[0], batch_size):
        xb, yb = x[s : s + batch_size], y[s : s + batch_size]
        with torch.no_grad():
            logits = forward(weights, xb, activation)
        m = margins(logits, yb)
        correct = logits.argmax(dim=1) == yb
        order = m.masked_fill(torch.nn.functional.one_hot(yb, K).bool(), float("inf")).argsort(dim=1)[:, :n_targets]
        n = xb.shape[0]
        xr = xb.repeat(n_targets, *[1] * (xb.ndim - 1))
        yr = yb.repeat(n_targets)
        tr = order.T.reshape(-1)
        if isinstance(weights, Network):  # no exact reduced form: PGD on the kernels (restarts unused)
            _, change = weight_attack(weights, xr, yr, tr, eps, layers, activation, steps=steps, generator=generator)
        else:
            _, change = box_attack(weights, xr, yr, tr, eps, layers, activation, steps, restarts, generator)
        m_after = (m.gather(1, order).T.reshape(-1) - change).reshape(n_targets, n)
        out.append(correct & (m_after > 0).all(dim=0))
    return torch.cat(out)


@torch.no_grad()
def random_perturbation_accuracy(
    weights: Sequence[Tensor],
    x: Tensor,
    y: Tensor,
    eps,
    layers=None,
    activation="relu",
    samples: int = 20,
    kind: str = "simplex",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Accuracy of ``samples`` networks Ŵ drawn on the boundary of B_ε (one Ŵ for the whole set each).

    Returns a tensor (samples,) of accuracies.
    """
    weights, x, y = _checked(weights, x, y)
    accs = []
    for _ in range(samples):
        deltas = random_boundary_perturbation(weights, eps, layers, kind=kind, generator=generator)
        accs.append((forward_perturbed(weights, deltas, x, activation).argmax(dim=1) == y).to(torch.float64).mean())
    return torch.stack(accs)
