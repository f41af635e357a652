import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch

from setsens.landscape import filter_normalized_direction, landscape, plane_directions
from setsens.models.mlp import mlp
from setsens.models.resnet import cifar_resnet
from setsens.operators import Hessian
from setsens.preconditioners import Deflation, FastHessian, lanczos, minres
from setsens.problem import Problem, cross_entropy


def _singular_matrix(p=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    lam = torch.cat([torch.logspace(2, -3, p - 40, dtype=torch.float64), torch.zeros(40, dtype=torch.float64)])
    lam[:3] *= -1  # indefinite
    return U @ torch.diag(lam) @ U.T, torch.randn(p, generator=g, dtype=torch.float64)


def test_fast_hessian_matches_reference_on_resnet():
    torch.manual_seed(0)
    model = cifar_resnet(8).double()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    x, y = torch.rand(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    prob = Problem(model, cross_entropy, (x, y), batch_size=2)
    v = torch.randn(prob.p, dtype=torch.float64)
    ref, fast = Hessian(prob)(v), FastHessian(prob)
    assert fast.method == "double_backward"  # "auto" on the CPU
    got = fast(v)
    assert fast.calls == 1
    assert float((got - ref).norm() / ref.norm()) < 1e-10
    other = FastHessian(prob, method="rev_over_fwd")  # the GPU choice, same numbers
    assert float((other(v) - ref).norm() / ref.norm()) < 1e-10


def _krylov_minimiser(H, b, k):
    """argmin ‖H x + b‖ over the Krylov space K_k(H, b), by Arnoldi with full reorthogonalisation."""
    Hn, bn = H.numpy(), b.numpy()
    Q = [bn / np.linalg.norm(bn)]
    for _ in range(1, k):
        q = Hn @ Q[-1]
        for _ in range(2):
            for u in Q:
                q = q - (u @ q) * u
        Q.append(q / np.linalg.norm(q))
    Q = np.stack(Q, 1)
    return Q @ np.linalg.lstsq(Hn @ Q, -bn, rcond=None)[0]


def test_minres_matches_scipy_and_resumes(tmp_path):
    H, b = _singular_matrix()
    # while the Lanczos vectors stay orthogonal, MINRES is the exact Krylov-space minimiser
    r10 = minres(lambda v: H @ v, b, maxiter=10, rtol=0).v.numpy()
    ref = _krylov_minimiser(H, b, 10)
    assert np.linalg.norm(r10 - ref) / np.linalg.norm(ref) < 1e-10
    assert np.linalg.norm(r10 - spla.minres(H.numpy(), -b.numpy(), maxiter=10, rtol=0)[0]) < 1e-10 * np.linalg.norm(ref)
    # later, finite-precision Lanczos (ours and SciPy's alike) loses orthogonality on this spectrum
    # (1e2 … 1e-3 and 40 zeros): the iterates differ by a few % (even between runs, as rounding is
    # amplified), the residuals agree to 1 % and neither beats the exact Krylov minimum
    r = minres(lambda v: H @ v, b, maxiter=25, rtol=0)
    xs = spla.minres(H.numpy(), -b.numpy(), maxiter=25, rtol=0)[0]
    res = lambda x: np.linalg.norm(H.numpy() @ x + b.numpy())  # noqa: E731
    assert res(r.v.numpy()) == pytest.approx(res(xs), rel=1e-2)
    assert res(r.v.numpy()) >= res(_krylov_minimiser(H, b, 25)) * (1 - 1e-12)
    true = float((H @ r.v + b).norm() / b.norm())
    assert r.residual == pytest.approx(true, rel=1e-6)
    assert r.hvp_count == 25 and r.residuals == sorted(r.residuals, reverse=True)
    ck = tmp_path / "state.pt"
    minres(lambda v: H @ v, b, maxiter=10, rtol=0, checkpoint=str(ck))  # "interrupted" after 10
    calls = []
    resumed = minres(lambda v: calls.append(1) or H @ v, b, maxiter=25, rtol=0, checkpoint=str(ck))
    assert resumed.resumed_from == 10 and len(calls) == 15
    assert torch.allclose(resumed.v, r.v, rtol=1e-12, atol=1e-14)


def test_lanczos_and_deflation():
    H, b = _singular_matrix()
    theta, Y, HY = lanczos(lambda v: H @ v, H.shape[0], 40, generator=torch.Generator().manual_seed(1))
    top = torch.linalg.eigvalsh(H).abs().sort(descending=True).values[:3]
    assert torch.allclose(theta.abs().sort(descending=True).values[:3], top, rtol=1e-8)
    D = Deflation.top(theta, Y, HY, 10)
    plain = minres(lambda v: H @ v, b, maxiter=15, rtol=0)
    defl = minres(lambda v: H @ v, b, maxiter=15, rtol=0, deflation=D)
    res = lambda v: float((H @ v + b).norm() / b.norm())  # noqa: E731
    assert res(defl.v) < res(plain.v)
    # recycling: Ritz vectors from a previous solve's Lanczos basis
    first = minres(lambda v: H @ v, torch.randn_like(b), maxiter=30, rtol=0, keep_basis=True)
    D2 = Deflation.from_krylov(first, 8)
    assert D2.k == 8 and res(minres(lambda v: H @ v, b, maxiter=15, rtol=0, deflation=D2).v) < res(plain.v)


def test_landscape_equals_direct_evaluations():
    torch.manual_seed(0)
    model = mlp([5, 7, 3], bias=True).double()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    prob = Problem(model, cross_entropy, (x, y))
    est = prob.params + 0.1 * torch.randn(prob.p, dtype=torch.float64)
    d1, d2 = plane_directions(prob, est, torch.Generator().manual_seed(0))
    assert abs(float(d1 @ d2)) < 1e-10 and float(d2.norm()) == pytest.approx(float(d1.norm()))
    ls = landscape(prob, d1, d2, [-1, 0, 1, 2], [0, 0.5], marks={"original": prob.params, "est": est})
    for i, b in enumerate([0, 0.5]):
        for j, a in enumerate([-1, 0, 1, 2]):
            assert ls.loss[i, j] == pytest.approx(prob.risk(prob.params + a * d1 + b * d2), rel=1e-12)
    a, b, off, loss = ls.marks["est"]
    assert (a, b) == pytest.approx((1.0, 0.0), abs=1e-10) and off < 1e-10 and loss == pytest.approx(ls.loss[0, 2])
    assert ls.marks["original"][:3] == pytest.approx((0.0, 0.0, 0.0), abs=1e-12)
    # filter normalisation: each row of each weight matrix has the norm of w̄'s row; biases get 0
    d = filter_normalized_direction(prob, torch.Generator().manual_seed(3))
    for (name, sl), shape in zip(prob.blocks(), prob.shapes):
        if len(shape) == 1:
            assert float(d[sl].abs().max()) == 0.0
        else:
            assert torch.allclose(d[sl].view(shape).norm(dim=1), prob.params[sl].view(shape).norm(dim=1))
    with pytest.raises(ValueError, match="plane kind"):
        plane_directions(prob, est, torch.Generator(), kind="bogus")
