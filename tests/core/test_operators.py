"""Operators against dense references, finite differences and closed forms."""

import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from setsens.models.resnet import cifar_resnet
from setsens.operators import (HVP_MODES, DataJacobian, Hessian, cache_budget, dense_data_jacobian,
                               dense_hessian, dense_output_jacobian, graph_bytes)
from setsens.problem import Perturbation, Problem, cross_entropy

from problems import small_problem


def test_hvp_matches_dense_and_finite_difference(problem):
    H = dense_hessian(problem)
    assert torch.allclose(H, H.T, atol=1e-10)
    v = torch.randn(problem.p, dtype=torch.float64)
    assert torch.allclose(Hessian(problem)(v), H @ v, atol=1e-10)
    eps = 1e-6
    fd = (problem.gradient(problem.params + eps * v) - problem.gradient(problem.params - eps * v)) / (2 * eps)
    assert torch.allclose(Hessian(problem)(v), fd, atol=1e-6)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 1000), k=st.integers(1, 4), batch=st.integers(1, 12))
def test_jacobian_matches_finite_difference_and_adjoint(seed, k, batch):
    problem = small_problem(seed=seed, batch_size=batch)
    idx = torch.randperm(problem.n, generator=torch.Generator().manual_seed(seed))[:k]
    J = DataJacobian(problem, idx)
    mu = torch.randn(k, 3, dtype=torch.float64)
    eps = 1e-6
    plus = problem.gradient(perturbation=Perturbation(idx, eps * mu))
    minus = problem.gradient(perturbation=Perturbation(idx, -eps * mu))
    assert torch.allclose(J @ mu, (plus - minus) / (2 * eps), atol=1e-6)
    y = torch.randn(problem.p, dtype=torch.float64)
    assert torch.allclose((J @ mu) @ y, (mu * (J.T @ y)).sum(), atol=1e-10)
    Jd = dense_data_jacobian(problem, idx)
    assert torch.allclose(Jd @ mu.reshape(-1), J @ mu, atol=1e-10)
    assert torch.allclose(Jd.T @ y, (J.T @ y).reshape(-1), atol=1e-10)


def test_batch_size_does_not_change_anything():
    a, b = small_problem(batch_size=1), small_problem(batch_size=12)
    v = torch.randn(a.p, dtype=torch.float64)
    assert torch.allclose(Hessian(a)(v), Hessian(b)(v), atol=1e-12)
    assert abs(a.risk() - b.risk()) < 1e-12


def test_dataloader_equals_tensors():
    a = small_problem()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(a.inputs, a.targets), batch_size=4)
    b = Problem(a.model, a.loss, loader, params=a.params)
    v = torch.randn(a.p, dtype=torch.float64)
    assert b.n == a.n
    assert torch.allclose(Hessian(a)(v), Hessian(b)(v), atol=1e-12)
    J1, J2 = DataJacobian(a, [3, 7]), DataJacobian(b, [3, 7])
    mu = torch.randn(2, 3, dtype=torch.float64)
    assert torch.allclose(J1 @ mu, J2 @ mu, atol=1e-12)


def test_linear_regression_closed_form():
    """ℓ = ½(wᵀx − y)²: H = XᵀX/n, Jμ = (1/n) Σ_K [(wᵀμ_i) x_i + (wᵀx_i − y_i) μ_i]."""
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(20, 4, generator=g, dtype=torch.float64), torch.randn(20, generator=g, dtype=torch.float64)
    model = nn.Linear(4, 1, bias=False).double()
    loss = lambda out, t: 0.5 * (out[:, 0] - t) ** 2  # noqa: E731
    problem = Problem(model, loss, (X, y))
    w = problem.params
    assert torch.allclose(dense_hessian(problem), X.T @ X / 20, atol=1e-12)
    K = torch.tensor([2, 5, 11])
    mu = torch.randn(3, 4, generator=g, dtype=torch.float64)
    expected = sum((w @ m) * X[i] + (w @ X[i] - y[i]) * m for i, m in zip(K, mu)) / 20
    assert torch.allclose(DataJacobian(problem, K) @ mu, expected, atol=1e-12)
    paper = DataJacobian(problem, K, scale="paper") @ mu
    assert torch.allclose(paper, expected * 20 / 3, atol=1e-12)


def test_float32_agrees_with_float64():
    p64 = small_problem()
    p32 = Problem(p64.model, p64.loss, (p64.inputs, p64.targets), params=p64.params, dtype=torch.float32)
    v = torch.randn(p64.p, dtype=torch.float64)
    assert torch.allclose(Hessian(p32)(v).double(), Hessian(p64)(v), rtol=1e-4, atol=1e-5)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 1000), batch=st.integers(1, 12))
def test_output_jacobian_is_the_gauss_newton_factor(seed, batch):
    """A model linear in w has a squared-error Hessian exactly c·JᵀJ (closed form), whatever
    the residual; and J v is the directional derivative of the outputs (finite difference)."""
    problem = small_problem(seed=seed, act=nn.Identity, loss="se", batch_size=batch)
    J = dense_output_jacobian(problem)
    assert J.shape == (problem.n * 2, problem.p)
    # f is bilinear in the two layers, so use the last layer alone: linear in its weights
    last = [s for name, s in problem.blocks() if name.startswith("2.")]
    cols = torch.cat([torch.arange(s.start, s.stop) for s in last])
    H = dense_hessian(problem)[cols][:, cols]
    assert torch.allclose(H, problem.weight * J[:, cols].T @ J[:, cols], atol=1e-10)
    v = torch.randn(problem.p, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    eps = 1e-6

    def outputs(w):
        return problem.outputs(w, problem.inputs).reshape(-1)

    fd = (outputs(problem.params + eps * v) - outputs(problem.params - eps * v)) / (2 * eps)
    assert torch.allclose(J @ v, fd, atol=1e-6)


def test_every_hvp_mode_gives_the_dense_product(problem):
    H = dense_hessian(problem)
    v = torch.randn(problem.p, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for mode in HVP_MODES:  # recomputed: a kept graph would answer whatever the mode
        assert torch.allclose(Hessian(problem, mode=mode, cache="none") @ v, H @ v, atol=1e-10), mode


def test_cached_hessian_gives_the_dense_product_and_keeps_to_its_budget(problem):
    """Batches of 5, 5, 2 points.  By default every batch keeps its gradient's graph at its first
    product; a budget of 7.5 points' worth keeps the first 5-point batch and not the second, one of
    a point's worth keeps no 5-point batch (its first build is used once), "none" keeps nothing; every
    product — building, through a kept graph, recomputed — equals the dense one."""
    H = dense_hessian(problem)
    g = torch.Generator().manual_seed(0)
    probe = Hessian(problem)
    assert torch.allclose(probe @ H[0], H @ H[0], atol=1e-10)
    per_point = probe._per_point
    assert per_point > 0 and sorted(probe._graphs) == [0, 1, 2]
    assert probe.cached_bytes == sum(graph_bytes(grad) for _, grad in probe._graphs.values())
    for mode in HVP_MODES:
        for cache, kept in (("none", False), (int(7.5 * per_point), True), (int(per_point), False)):
            op = Hessian(problem, mode=mode, cache=cache)
            for _ in range(3):
                v = torch.randn(problem.p, dtype=torch.float64, generator=g)
                assert torch.allclose(op @ v, H @ v, atol=1e-10), (mode, cache)
            assert (0 in op._graphs, 1 in op._graphs) == (kept, False)
            assert op.cached_bytes <= cache_budget(cache, problem.device)


def test_graph_bytes_counts_what_autograd_saves():
    """Against saved-tensor hooks (the reference: every tensor autograd saves passes through them)."""
    net = nn.Sequential(nn.Linear(3, 7), nn.Tanh(), nn.Linear(7, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(x).pow(2).sum()
    storages[out.untyped_storage().data_ptr()] = out.untyped_storage().nbytes()
    assert graph_bytes(out) == sum(storages.values()) > 4 * 7 * 8  # the hidden activations at least
    weight = net[2].weight  # saved for the gradient of the hidden activations
    assert graph_bytes(out, exclude=weight) == graph_bytes(out) - weight.untyped_storage().nbytes()


def test_hessian_modes_agree_on_resnet():
    torch.manual_seed(0)
    model = cifar_resnet(8).double()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    x, y = torch.rand(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    prob = Problem(model, cross_entropy, (x, y), batch_size=2)
    v = torch.randn(prob.p, dtype=torch.float64)
    ref, fast = Hessian(prob, cache="none")(v), Hessian(prob, mode="auto", cache="none")
    assert fast.mode == "double_backward"  # "auto" on the CPU
    got = fast @ v
    assert fast.calls == 1
    assert float((got - ref).norm() / ref.norm()) < 1e-10
    other = Hessian(prob, mode="rev_over_fwd", cache="none")  # the GPU choice, same numbers
    assert float((other(v) - ref).norm() / ref.norm()) < 1e-10
    kept = Hessian(prob)  # the default: each batch's gradient graph kept, BatchNorm included
    for _ in range(2):
        assert float((kept(v) - ref).norm() / ref.norm()) < 1e-10
    assert sorted(kept._graphs) == [0, 1]
