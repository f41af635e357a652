"""Margin bounds beyond bias-free MLPs: each layer kind's norm against its materialised matrix, BatchNorm
folding, the MLP case equal to Theorem 2, and soundness against random and PGD weight attacks."""

import pytest
import torch
from torch import nn
from torch.func import jacrev

from setsens.models.resnet import BasicBlock, cifar_resnet
from setsens.weights import (
    forward,
    forward_perturbed,
    margin_change_bound,
    margin_change_bound_with_bias,
    margins,
    network_from_model,
    random_boundary_perturbation,
    relative_budget,
    runner_up,
    weight_attack,
)
from setsens.weights.certify import certify, max_certified_budget
from setsens.weights.layers import (
    Affine,
    AvgPool,
    ChannelAffine,
    MaxPool,
    Network,
    ShortcutA,
    build_network,
)
from setsens.weights.network import UnsupportedNetworkError, layer_loop

D = torch.float64


def dense(fn, in_shape):
    """The matrix of a linear map on one input of ``in_shape`` (flattened), by reverse-mode AD."""
    n = int(torch.tensor(in_shape).prod())
    return jacrev(lambda v: fn(v.reshape(1, *in_shape)).flatten())(torch.zeros(n, dtype=D))


def inf_norm(A):
    return float(A.abs().sum(dim=1).max())


# ---------------------------------------------------------------- norms, layer by layer


@pytest.mark.parametrize(
    "C, O, k, hw, conv",
    [
        (2, 3, 3, (5, 5), dict(stride=1, padding=1)),
        (2, 3, 3, (6, 5), dict(stride=2, padding=1)),
        (2, 2, (3, 2), (5, 4), dict(stride=(1, 2), padding=(1, 0))),
        (2, 3, 3, (7, 7), dict(stride=1, padding=2, dilation=2)),
        (4, 4, 3, (4, 4), dict(stride=1, padding=1, groups=2)),
        (2, 3, 3, (2, 2), dict(stride=1, padding=1)),  # no interior position: every row loses kernel entries
        (1, 2, 3, (3, 3), dict(stride=2, padding=1)),  # strided outputs all at the border
    ],
)
def test_conv_norm_is_the_matrix_inf_norm(C, O, k, hw, conv):
    g = torch.Generator().manual_seed(hash((C, O, hw)) % 1000)
    ks = (k, k) if isinstance(k, int) else k
    full = dict(stride=1, padding=0, dilation=1, groups=1) | conv
    w = torch.randn(O, C // full["groups"], *ks, generator=g, dtype=D)
    a = Affine(w, torch.randn(O, generator=g, dtype=D), full)
    a.in_shape = (C, *hw)
    A = dense(lambda h: a.linear(w, h), a.in_shape)
    assert float(a.norm()) == pytest.approx(inf_norm(A), rel=1e-12)
    interior = float(w.abs().flatten(1).sum(1).max())
    assert float(a.norm()) <= interior + 1e-12
    if hw == (2, 2) or hw == (3, 3):
        assert float(a.norm()) < interior - 1e-6  # padding lowers the norm; the kernel's ℓ1 would overstate it


def test_dense_norm_and_per_input_operator():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 6, generator=g, dtype=D)
    a = Affine(w)
    assert float(a.norm()) == pytest.approx(inf_norm(w), rel=1e-14)
    # a stack of per-input convolution kernels acts input by input
    wc = torch.randn(3, 2, 3, 3, generator=g, dtype=D)
    c = Affine(wc, None, dict(stride=2, padding=1, dilation=1, groups=1))
    h = torch.randn(5, 2, 6, 6, generator=g, dtype=D)
    stack = torch.randn(5, *wc.shape, generator=g, dtype=D)
    per = c.linear(stack, h)
    for n in range(5):
        torch.testing.assert_close(per[n : n + 1], c.linear(stack[n], h[n : n + 1]))


@pytest.mark.parametrize(
    "pool, in_shape",
    [
        (nn.AvgPool2d(3, 2, 1), (2, 5, 5)),  # count_include_pad: rows at the border sum to < 1
        (nn.AvgPool2d(3, 2, 1), (1, 2, 2)),  # every window at the border: 4/9
        (nn.AvgPool2d(3, 2, 1, count_include_pad=False), (2, 5, 5)),
        (nn.AvgPool2d(2), (2, 4, 6)),
        (nn.AdaptiveAvgPool2d(1), (3, 4, 4)),
        (nn.AdaptiveAvgPool2d((2, 3)), (1, 5, 7)),
    ],
)
def test_avg_pool_norm_is_the_matrix_inf_norm(pool, in_shape):
    step = AvgPool(pool, "avg")
    step.in_shape = in_shape
    A = dense(pool, in_shape)
    assert (A >= 0).all()
    assert step.norm(None) == pytest.approx(inf_norm(A), rel=1e-12)
    if in_shape == (1, 2, 2):
        assert step.norm(None) == pytest.approx(4 / 9)


@pytest.mark.parametrize("pool", [nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(2), nn.AdaptiveMaxPool2d(2)])
def test_max_pool_is_one_lipschitz_in_inf_norm_with_equality(pool):
    """|max a − max b| ≤ max |a − b| (the rule δ' = δ, H' = H), attained by a constant shift."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(200, 2, 6, 6, generator=g, dtype=D)
    b = a + torch.randn(200, 2, 6, 6, generator=g, dtype=D) * torch.rand(200, 1, 1, 1, generator=g, dtype=D)
    lhs = (pool(a) - pool(b)).flatten(1).abs().amax(1)
    assert (lhs <= (a - b).flatten(1).abs().amax(1) + 1e-12).all()
    assert (pool(a).flatten(1).abs().amax(1) <= a.flatten(1).abs().amax(1) + 1e-12).all()
    torch.testing.assert_close((pool(a + 0.7) - pool(a)).flatten(1).abs().amax(1), torch.full((200,), 0.7, dtype=D))
    model = nn.Sequential(nn.Conv2d(2, 2, 1), pool, nn.Flatten(), nn.Linear(pool(a[:1]).numel(), 2))
    assert isinstance(build_network(model, (2, 6, 6)).steps[1], MaxPool)


def test_shortcut_a_and_channel_affine_norms():
    S = dense(lambda h: ShortcutA(1).forward(h, None), (2, 4, 4))
    assert S.shape == (4 * 2 * 2, 2 * 4 * 4)
    assert inf_norm(S) == 1.0 and set(S.unique().tolist()) == {0.0, 1.0}
    s, t = torch.tensor([0.5, -3.0, 2.0], dtype=D), torch.tensor([1.0, 0.25, -2.5], dtype=D)
    step = ChannelAffine(s, t)
    A = dense(lambda h: step.forward(h, None) - step.forward(torch.zeros_like(h), None), (3, 2, 2))
    assert inf_norm(A) == pytest.approx(3.0)
    from setsens.weights.layers import Gap

    g = step.propagate(Gap(torch.tensor([1.0], dtype=D), torch.tensor([2.0], dtype=D)), None)
    assert float(g.delta) == pytest.approx(3.0) and float(g.H) == pytest.approx(3.0 * 2 + 2.5)


# ---------------------------------------------------------------- networks and BatchNorm folding


def _randomise_bn(model, g):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.3)
    return model


def conv_bn_net(seed):
    """Conv + BN + max pool + conv (bias) + avg pool + Linear + BN1d + ReLU + Linear, all with biases."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, stride=1, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4),
    )
    return _randomise_bn(model, g).double().eval(), (1, 8, 8)


def residual_net(seed):
    """Conv+BN stem, an identity block and an option-A block (BasicBlock of models.resnet), global pool, Linear."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        BasicBlock(4, 4, 1), BasicBlock(4, 8, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )
    return _randomise_bn(model, g).double().eval(), (1, 8, 8)


NETS = {"conv_bn": conv_bn_net, "residual": residual_net}


@pytest.mark.parametrize("make", NETS.values(), ids=NETS.keys())
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_folded_network_equals_the_model_in_eval_mode(make, dtype, tol):
    model, shape = make(0)
    model = model.to(dtype)
    net = network_from_model(model, input_shape=shape)
    assert isinstance(net, Network)
    x = torch.rand(6, *shape, dtype=dtype)
    with torch.no_grad():
        ref = model(x)
        out = forward(net, x)
    assert (out - ref).abs().max() <= tol * max(1.0, float(ref.abs().max()))
    # the weights are the live (folded) parameters: gradients reach the model
    forward(net, x).sum().backward()
    assert model[0].weight.grad is not None and model[1].weight.grad is not None


def test_cifar_resnet_network_equals_the_model():
    torch.manual_seed(0)
    model = _randomise_bn(cifar_resnet(8), torch.Generator().manual_seed(0)).double().eval()
    net = network_from_model(model).detach()
    assert net.input_shape == (3, 32, 32) and len(net) == 1 + 3 * 2 + 1
    x = torch.rand(2, 3, 32, 32, dtype=D)
    with torch.no_grad():
        torch.testing.assert_close(forward(net, x), model(x), rtol=1e-10, atol=1e-10)
    hs = layer_loop(net, x)
    assert len(hs) == len(net) + 1 and hs[0].shape == (2, 3, 32, 32)  # the input of each weighted layer, then f


@pytest.mark.parametrize(
    "model, shape, match",
    [
        (nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2)), (1, 4, 4), "directly"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 2)), (1, 4, 4), "negative"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.LayerNorm(2), nn.Flatten(), nn.Linear(8, 2)), (1, 4, 4), "LayerNorm"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2)), None, "input_shape"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(7, 2)), (1, 4, 4), "do not chain"),
        (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"), nn.Flatten(), nn.Linear(32, 2)),
         (1, 4, 4), "circular"),
    ],
)
def test_unsupported_structures(model, shape, match):
    with pytest.raises(UnsupportedNetworkError, match=match):
        network_from_model(model, input_shape=shape)


# ---------------------------------------------------------------- the MLP case is Theorem 2


@pytest.mark.parametrize("seed", range(4))
def test_mlp_network_equals_theorem2_and_the_bias_recursion(seed):
    g = torch.Generator().manual_seed(seed)
    widths = [5, 7, 6, 4]
    W = [torch.randn(widths[i + 1], widths[i], generator=g, dtype=D) for i in range(3)]
    b = [torch.randn(widths[i + 1], generator=g, dtype=D) for i in range(3)]
    x = torch.randn(9, 5, generator=g, dtype=D)
    y = torch.randint(0, 4, (9,), generator=g)
    e = relative_budget(W, 0.03)
    for layers in (None, [0], [1, 2], [2]):
        ref = margin_change_bound(W, x, y, e, layers)
        torch.testing.assert_close(margin_change_bound(Network.from_mlp(W), x, y, e, layers), ref, rtol=1e-12, atol=0)
    beta = [0.01, 0.02, 0.03]
    ref = margin_change_bound_with_bias(W, b, x, y, e, beta)
    net = Network.from_mlp(W, b)
    torch.testing.assert_close(margin_change_bound_with_bias(net, None, x, y, e, beta), ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(forward(net, x), forward(W, x, biases=b))
    # the clean-activation variant is never looser
    assert (margin_change_bound(W, x, y, e, hidden="clean") <= margin_change_bound(W, x, y, e) + 1e-12).all()


# ---------------------------------------------------------------- soundness and non-vacuity


def _check_sound(net, x, y, e, eta, m, cert, deltas, bias_deltas=None):
    """|m̂ − m| ≤ η for every pair and certified points keep their label, for shared or per-input ΔW."""
    with torch.no_grad():
        mh = margins(forward_perturbed(net, deltas, x, bias_deltas=bias_deltas), y)
    assert ((mh - m).abs() <= eta + 1e-10 * (1 + eta)).all(), float(((mh - m).abs() - eta).max())
    assert (mh[cert] + torch.eye(m.shape[1], dtype=D)[y[cert]] > 0).all()
    return mh


@pytest.mark.parametrize("make", NETS.values(), ids=NETS.keys())
@pytest.mark.parametrize("hidden", ["paper", "clean"])
def test_soundness_and_non_vacuity(make, hidden):
    model, shape = make(3)
    net = network_from_model(model, input_shape=shape).detach()
    g = torch.Generator().manual_seed(4)
    x = torch.rand(24, *shape, generator=g, dtype=D)
    with torch.no_grad():
        logits = forward(net, x)
    y = logits.argmax(1)
    m = margins(logits, y)
    # small ε: about half the points certified by the paper's bound (the clean variant certifies at least those)
    frac = float(max_certified_budget(net, x, y).median())
    e = relative_budget(net, frac)
    eta = margin_change_bound(net, x, y, e, hidden=hidden)
    cert = certify(net, x, y, e) if hidden == "paper" else ((m - eta).masked_fill(m == 0, 1) > 0).all(1)
    assert cert.any() and cert.float().mean() >= 0.4
    for _ in range(10):
        _check_sound(net, x, y, e, eta, m, cert, random_boundary_perturbation(net, e, generator=g))
    target = runner_up(logits, y)
    deltas, change = weight_attack(net, x, y, target, e, steps=30, generator=g)
    assert (change <= eta.gather(1, target[:, None]).squeeze(1) + 1e-10).all()
    _check_sound(net, x, y, e, eta, m, cert, deltas)
    # larger ε: the attack flips points, none of them certified
    flipped_any = False
    for scale in (30, 300, 3000):
        e_big = relative_budget(net, min(frac * scale, 0.5))
        eta_big = margin_change_bound(net, x, y, e_big, hidden=hidden)
        cert_big = ((m - eta_big).masked_fill(m == 0, 1) > 0).all(1)
        _, change = weight_attack(net, x, y, target, e_big, steps=30, generator=g)
        flipped = m.gather(1, target[:, None]).squeeze(1) - change <= 0
        assert not (flipped & cert_big).any()
        flipped_any |= bool(flipped.any())
        if flipped_any:
            break
    assert flipped_any, "the attack never flips a point: the check could not fail"


def test_bias_perturbations_sound():
    model, shape = conv_bn_net(5)
    net = network_from_model(model, input_shape=shape).detach()
    g = torch.Generator().manual_seed(6)
    x = torch.rand(16, *shape, generator=g, dtype=D)
    with torch.no_grad():
        logits = forward(net, x)
    y = logits.argmax(1)
    m = margins(logits, y)
    e = relative_budget(net, 1e-3)
    beta = 1e-3 * torch.stack([b.abs().max() for b in net.biases])
    eta = margin_change_bound_with_bias(net, None, x, y, e, beta)
    assert (eta > margin_change_bound(net, x, y, e) + 1e-12).any()
    cert = ((m - eta).masked_fill(m == 0, 1) > 0).all(1)
    for _ in range(10):
        deltas = random_boundary_perturbation(net, e, generator=g)
        bd = [bt * (torch.randint(0, 2, b.shape, generator=g).to(D) * 2 - 1) for bt, b in zip(beta, net.biases)]
        _check_sound(net, x, y, e, eta, m, cert, deltas, bd)


def test_conv_attack_stays_in_the_budget_set():
    model, shape = residual_net(7)
    net = network_from_model(model, input_shape=shape).detach()
    g = torch.Generator().manual_seed(8)
    x = torch.rand(4, *shape, generator=g, dtype=D)
    y = forward(net, x).argmax(1)
    e = relative_budget(net, 0.05)
    deltas, _ = weight_attack(net, x, y, runner_up(forward(net, x), y), e, steps=5, generator=g)
    for l, (a, dl) in enumerate(zip(net.affines, deltas)):
        for n in range(4):
            op = Affine(dl[n], None, a.conv)
            op.in_shape = a.in_shape
            assert float(op.norm()) <= float(e[l]) * (1 + 1e-9)


@pytest.mark.parametrize("shortcut", ["identity", "option-A"])
def test_residual_rule_is_nearly_attained_through_the_shortcut(shortcut):
    """Only the stem moves and the branch is small: the gap passes through the shortcut, and the attack
    reaches ≥ 90 % of η — a rule that dropped the shortcut's δ would be beaten by a factor ~1/‖branch‖.

    1×1 images: a 3×3 convolution with padding 1 sees only its centre tap (its norm is that tap's row
    ℓ1, the padding rule at work), so a structured kernel perturbation can realise the worst case."""
    from setsens.weights.layers import Activation, Flatten, Residual

    g = torch.Generator().manual_seed(9)
    relu = Activation(torch.relu)
    pad1 = dict(stride=1, padding=1, dilation=1, groups=1)
    stem = Affine(torch.rand(6, 4, 3, 3, generator=g, dtype=D), torch.full((6,), 0.1, dtype=D), pad1)
    c_out, stride = (6, 1) if shortcut == "identity" else (10, 2)
    branch = [Affine(1e-3 * torch.randn(c_out, 6, 3, 3, generator=g, dtype=D), None, pad1 | dict(stride=stride))]
    sc = [] if shortcut == "identity" else [ShortcutA(2)]
    head = Affine(torch.randn(3, c_out, generator=g, dtype=D), torch.zeros(3, dtype=D))
    if shortcut == "option-A":
        head.weight[:, [0, 1, 8, 9]] = 0  # the zero-padded channels carry no gap through the shortcut
    net = Network([stem, relu, Residual(branch, sc), relu, Flatten(), head], (4, 1, 1))
    assert float(net.norms()[0]) == pytest.approx(float(stem.weight[:, :, 1, 1].abs().sum(1).max()))
    x = torch.rand(16, 4, 1, 1, generator=g, dtype=D)
    with torch.no_grad():
        logits = forward(net, x)
    y = logits.argmax(1)
    target = runner_up(logits, y)
    e = relative_budget(net, 1e-3)
    eta = margin_change_bound(net, x, y, e, layers=[0]).gather(1, target[:, None]).squeeze(1)
    _, change = weight_attack(net, x, y, target, e, layers=[0], steps=60, generator=g)
    assert (change <= eta + 1e-12).all()
    assert float((change / eta).max()) >= 0.9


def test_attacked_robust_and_random_accuracy_take_a_network():
    from setsens.weights import attacked_robust, random_perturbation_accuracy

    model, shape = conv_bn_net(11)
    net = network_from_model(model, input_shape=shape).detach()
    g = torch.Generator().manual_seed(12)
    x = torch.rand(10, *shape, generator=g, dtype=D)
    y = forward(net, x).argmax(1)
    e = relative_budget(net, float(max_certified_budget(net, x, y).median()))
    robust = attacked_robust(net, x, y, e, n_targets=2, steps=10, generator=g)
    assert (certify(net, x, y, e) <= robust).all() and robust.any()
    assert random_perturbation_accuracy(net, x, y, e, samples=3, generator=g).shape == (3,)
