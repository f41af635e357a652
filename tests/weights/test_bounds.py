"""Soundness, tightness and consistency of the margin-change bounds (Theorems 1–3, biases)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from problems import weight_net
from setsens.weights.attacks import box_attack, random_boundary_perturbation, weight_attack
from setsens.weights.bounds import (
    margin_change_bound,
    margin_change_bound_all_pairs,
    margin_change_bound_with_bias,
    product_gap,
    relative_budget,
    single_layer_bound,
)
from setsens.weights.network import (
    forward,
    forward_perturbed,
    layer_norms,
    margins,
)

D = torch.float64
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_net(seed, depth, widths, n0, K, N):
    return weight_net(seed, [n0, *widths[: depth - 1], K], N, x_scale=2, labels="random")


def nonneg_equal_rows(g, rows, cols, norm):
    w = torch.rand(rows, cols, generator=g, dtype=D) + 0.1
    return w / w.sum(1, keepdim=True) * norm


def near_tight_net(seed, depth, widths, n0, K, N):
    """Non-negative equal-row-sum hidden layers, x ≈ B·1, a dominant label row: the bound is nearly attained."""
    g = torch.Generator().manual_seed(seed)
    sizes = [n0, *widths[: depth - 1], K]
    W = [nonneg_equal_rows(g, sizes[l + 1], sizes[l], 1 + float(torch.rand(1, generator=g))) for l in range(depth - 1)]
    last = torch.rand(K, sizes[-2], generator=g, dtype=D)
    y = torch.randint(0, K, (N,), generator=g)
    last[int(y[0])] += 2.0
    W.append(last)
    x = 1.0 + 0.01 * torch.rand(N, n0, generator=g, dtype=D)
    y = torch.full((N,), int(y[0]))
    return W, x, y, g


def assert_sound(W, x, y, eps, layers, deltas, act):
    """|m̂_{yi} − m_{yi}| ≤ η_{yi} for all inputs and classes, for the perturbation ``deltas``."""
    m = margins(forward(W, x, act), y)
    mh = margins(forward_perturbed(W, deltas, x, act), y)
    eta = margin_change_bound(W, x, y, eps, layers)
    excess = (m - mh).abs() - eta
    assert float(excess.max()) <= 1e-9 * (1 + float(eta.abs().max())), float(excess.max())


@settings(max_examples=60, **SETTINGS)
@given(
    seed=st.integers(0, 10**6),
    depth=st.integers(2, 5),
    widths=st.lists(st.integers(1, 6), min_size=4, max_size=4),
    n0=st.integers(1, 5),
    K=st.integers(2, 4),
    frac=st.floats(0.0, 0.5),
    act=st.sampled_from(["relu", "relu6", "clip1"]),
    subset=st.booleans(),
    tight=st.booleans(),
)
def test_soundness_random_and_adversarial(seed, depth, widths, n0, K, frac, act, subset, tight):
    """No perturbation found (random on the boundary, box / PGD / Frank–Wolfe attacks) exceeds η.

    Half of the networks are random Gaussian, half are near-tight (the attacks then reach ≈ η, so
    a bound that were 3 % too small would be caught: see test_attacks_reach_bound_on_near_tight_nets).
    """
    W, x, y, g = (near_tight_net if tight else random_net)(seed, depth, widths, n0, K, N=6)
    layers = None
    if subset:
        layers = sorted({int(torch.randint(0, depth, (1,), generator=g)) for _ in range(2)})
    eps = relative_budget(W, frac)
    # random perturbations on the boundary: shared and per input, simplex and vertex rows
    for kind in ("simplex", "vertex"):
        assert_sound(W, x, y, eps, layers, random_boundary_perturbation(W, eps, layers, kind=kind, generator=g), act)
        assert_sound(W, x, y, eps, layers, random_boundary_perturbation(W, eps, layers, n=6, kind=kind, generator=g), act)
    # adversarial perturbations for both orders of every class pair: (lab, target) pushes m_{lab,target}
    # down, (target, lab) pushes it up; η is symmetric in the pair
    for shift in range(1, K):
        other = (y + shift) % K
        for lab, target in ((y, other), (other, y)):
            eta = margin_change_bound(W, x, lab, eps, layers).gather(1, target[:, None]).squeeze(1)
            _, change = box_attack(W, x, lab, target, eps, layers, act, steps=8, restarts=2, generator=g)
            assert (change <= eta * (1 + 1e-9) + 1e-12).all()
            for method in ("pgd", "fw"):
                deltas, change = weight_attack(W, x, lab, target, eps, layers, act, method=method, steps=8,
                                               generator=g)
                assert (change <= eta * (1 + 1e-9) + 1e-12).all()
                assert_sound(W, x, lab, eps, layers, deltas, act)
                for l, dl in enumerate(deltas):  # the attack stays in the budget set
                    if dl is not None:
                        assert float(dl.abs().sum(-1).max()) <= float(eps[l]) * (1 + 1e-9) + 1e-15




@settings(max_examples=25, **SETTINGS)
@given(seed=st.integers(0, 10**6), depth=st.integers(1, 5), width=st.integers(1, 6), k_frac=st.floats(0, 1),
       e=st.floats(0.0, 1.0), Bv=st.floats(0.1, 3.0))
def test_single_and_all_layer_bounds_attained(seed, depth, width, k_frac, e, Bv):
    """Theorem 1 and Theorem 2 hold with equality on non-negative equal-row-sum networks, x = B·1."""
    g = torch.Generator().manual_seed(seed)
    K, n0 = 3, 4
    sizes = [n0] + [width] * (depth - 1) + [K]
    norms = torch.rand(depth, generator=g, dtype=D) * 2 + 0.5
    W = [nonneg_equal_rows(g, sizes[l + 1], sizes[l], float(norms[l])) for l in range(depth - 1)]
    last = torch.rand(K, sizes[-2], generator=g, dtype=D)
    last[0] += 2.0  # row y = 0 dominates every other row entry-wise: a_{0i} = Σ (W_0 − W_i)
    W.append(last)
    x = torch.full((1, n0), Bv, dtype=D)
    y = torch.tensor([0])
    d = depth
    k = min(int(k_frac * d), d - 1)
    eps = torch.full((d,), e, dtype=D)

    def attained(layers):
        # every entry of a perturbed hidden layer grows by ε_l/n_{l-1} (every unit stays active and grows
        # by the most the budget allows); the last layer moves row y up and the other rows down: the
        # margin grows by exactly η
        deltas = []
        for l in range(d):
            if l not in layers:
                deltas.append(None)
            elif l < d - 1:
                deltas.append(torch.full_like(W[l], e / W[l].shape[1]))
            else:
                dl = torch.full_like(W[l], -e / W[l].shape[1])
                dl[0] = e / W[l].shape[1]
                deltas.append(dl)
        m = margins(forward(W, x), y)
        mh = margins(forward_perturbed(W, deltas, x), y)
        return (mh - m)[0, 1:]

    eta1 = single_layer_bound(W, x, y, e, k)[0, 1:]
    torch.testing.assert_close(attained([k]), eta1, rtol=1e-10, atol=1e-12)
    eta3 = margin_change_bound(W, x, y, eps, layers=[k])[0, 1:]
    torch.testing.assert_close(eta3, eta1, rtol=1e-12, atol=1e-12)
    eta2 = margin_change_bound(W, x, y, eps)[0, 1:]
    torch.testing.assert_close(attained(list(range(d))), eta2, rtol=1e-10, atol=1e-12)


@settings(max_examples=15, **SETTINGS)
@given(seed=st.integers(0, 10**6), depth=st.integers(2, 5), widths=st.lists(st.integers(1, 6), min_size=4, max_size=4),
       frac=st.floats(0.001, 0.3))
def test_attacks_reach_bound_on_near_tight_nets(seed, depth, widths, frac):
    """On near-tight networks the attacks find ≥ 97 % of η (so the soundness test has teeth)."""
    W, x, y, g = near_tight_net(seed, depth, widths, 3, 3, N=4)
    eps = relative_budget(W, frac)
    other = (y + 1) % 3
    eta = margin_change_bound(W, x, y, eps).gather(1, other[:, None]).squeeze(1)
    # push the margin m_{y,other} up (= push m_{other,y} down): the direction in which η is attained
    _, change = box_attack(W, x, other, y, eps, steps=20, generator=g)
    assert (change >= 0.97 * eta).all() and (change <= eta * (1 + 1e-9)).all()
    _, change = weight_attack(W, x, other, y, eps, method="fw", steps=30, generator=g)
    assert (change >= 0.9 * eta).all() and (change <= eta * (1 + 1e-9)).all()


def test_theorem2_by_hand():
    W = [torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=D), torch.tensor([[1.0, -1.0], [0.0, 1.0]], dtype=D)]
    x = torch.tensor([[1.0, -3.0]], dtype=D)
    # M = (2, 2), B = 3, a_01 = |1 − 0| + |−1 − 1| = 3, P = 2, P_ε = 2.1
    eta = margin_change_bound(W, x, torch.tensor([0]), [0.1, 0.2])
    assert eta[0, 0] == 0
    assert math.isclose(float(eta[0, 1]), 3 * 0.1 * 3 + 2 * 0.2 * 2.1 * 3, rel_tol=1e-12)


@settings(max_examples=30, **SETTINGS)
@given(seed=st.integers(0, 10**6), depth=st.integers(1, 5), frac=st.floats(0, 2))
def test_closed_form_matches_recursion_and_pairs(seed, depth, frac):
    W, x, y, g = random_net(seed, depth, [3, 4, 2, 5], 3, 4, N=5)
    eps = relative_budget(W, frac) * torch.rand(depth, generator=g, dtype=D)
    eta = margin_change_bound(W, x, y, eps)
    torch.testing.assert_close(margin_change_bound_with_bias(W, None, x, y, eps), eta, rtol=1e-10, atol=1e-12)
    zeros = [torch.zeros(w.shape[0], dtype=D) for w in W]
    torch.testing.assert_close(margin_change_bound_with_bias(W, zeros, x, y, eps, [0.0] * depth), eta,
                               rtol=1e-10, atol=1e-12)
    allp = margin_change_bound_all_pairs(W, x, eps)
    torch.testing.assert_close(allp[torch.arange(5), y], eta)
    M = layer_norms(W)
    torch.testing.assert_close(product_gap(M[:-1], eps[:-1]), torch.prod(M[:-1] + eps[:-1]) - torch.prod(M[:-1]),
                               rtol=1e-10, atol=1e-12)


def test_product_gap_no_cancellation():
    M = torch.tensor([3.0, 5.0, 7.0], dtype=torch.float32)
    gap = product_gap(M, torch.full((3,), 1e-7))
    assert math.isclose(float(gap), 1e-7 * (35 + 21 + 15), rel_tol=1e-4)


@settings(max_examples=25, **SETTINGS)
@given(seed=st.integers(0, 10**6), depth=st.integers(1, 4), frac=st.floats(0, 0.5), beta=st.floats(0, 0.5))
def test_bias_bound_sound(seed, depth, frac, beta):
    W, x, y, g = random_net(seed, depth, [4, 3, 5], 3, 3, N=6)
    b = [torch.randn(w.shape[0], generator=g, dtype=D) for w in W]
    eps = relative_budget(W, frac)
    betas = [beta] * depth
    eta = margin_change_bound_with_bias(W, b, x, y, eps, betas)

    def run(Ws, bs):
        h = x
        for l, w in enumerate(Ws):
            z = h @ w.T + bs[l]
            h = torch.relu(z) if l < depth - 1 else z
        return margins(h, y)

    m = run(W, b)
    for _ in range(5):
        dW = random_boundary_perturbation(W, eps, generator=g)
        db = [beta * (torch.randint(0, 2, bb.shape, generator=g).to(D) * 2 - 1) for bb in b]
        mh = run([w + dw for w, dw in zip(W, dW)], [bb + d for bb, d in zip(b, db)])
        assert ((m - mh).abs() <= eta * (1 + 1e-9) + 1e-12).all()


def test_bound_is_differentiable():
    W, x, y, _ = random_net(3, 3, [4, 3], 3, 3, N=4)
    W = [w.requires_grad_(True) for w in W]
    eta = margin_change_bound(W, x, y, relative_budget(W, 0.1))
    grads = torch.autograd.grad(eta.sum(), W)
    assert all(torch.isfinite(gr).all() and gr.abs().sum() > 0 for gr in grads)
    Wd = [w.detach().requires_grad_(True) for w in W]
    # smooth almost everywhere: gradcheck of η in the weights at a generic point
    assert torch.autograd.gradcheck(lambda *ws: margin_change_bound(list(ws), x, y, [0.1, 0.2, 0.3]), tuple(Wd))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda W, x, y: margin_change_bound(W, x, y, [-0.1, 0.1]), "non-negative"),
        (lambda W, x, y: margin_change_bound(W, x, y, [0.1]), "one budget per layer"),
        (lambda W, x, y: margin_change_bound(W, x, y, [0.1, float("nan")]), "NaN"),
        (lambda W, x, y: margin_change_bound(W, x * float("inf"), y, [0.1, 0.1]), "NaN or Inf"),
        (lambda W, x, y: margin_change_bound(W, x, y + 5, [0.1, 0.1]), r"labels must lie in \[0, 3\)"),
        (lambda W, x, y: margin_change_bound(W, x, y.float(), [0.1, 0.1]), "integer"),
        (lambda W, x, y: margin_change_bound(W, x[:, :2], y, [0.1, 0.1]), "features"),
        (lambda W, x, y: margin_change_bound(W, x[0], y, [0.1, 0.1]), "batch"),
        (lambda W, x, y: margin_change_bound(W, x, y[:2], [0.1, 0.1]), "shape"),
        (lambda W, x, y: margin_change_bound(W, x, y, [0.1, 0.1], layers=[2]), "out of range"),
        (lambda W, x, y: margin_change_bound(W, x, y, [0.1, 0.1], layers=[]), "at least one"),
        (lambda W, x, y: margin_change_bound([W[0], W[1].T], x, y, [0.1, 0.1]), "inputs"),
        (lambda W, x, y: margin_change_bound([W[0], W[1][:1]], x, y[:0], [0.1, 0.1]), "at least 2 outputs"),
        (lambda W, x, y: margin_change_bound(W[0], x, y, [0.1]), "list"),
    ],
)
def test_bad_input_raises(call, match):
    W, x, y, _ = random_net(0, 2, [4], 3, 3, N=4)
    with pytest.raises(ValueError, match=match):
        call(W, x, y)
