"""Krylov methods against SciPy, NumPy's pseudo-inverse and dense eigendecompositions."""

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch
from hypothesis import given, settings, strategies as st

from problems import graded, singular_symmetric
from setsens.krylov import Deflation, cgls, cgne, lanczos, minres, minres_min_norm, power_iteration


def krylov_minimiser(H, b, k):
    """argmin ‖H x − b‖ over the Krylov space K_k(H, b), by Arnoldi with full reorthogonalisation."""
    Hn, bn = H.numpy(), b.numpy()
    Q = [bn / np.linalg.norm(bn)]
    for _ in range(1, k):
        q = Hn @ Q[-1]
        for _ in range(2):
            for u in Q:
                q = q - (u @ q) * u
        Q.append(q / np.linalg.norm(q))
    Q = np.stack(Q, 1)
    return Q @ np.linalg.lstsq(Hn @ Q, bn, rcond=None)[0]


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), p=st.integers(4, 80), indefinite=st.booleans(), consistent=st.booleans(),
       rtol=st.sampled_from([0.0, 1e-8, 1e-12]))
def test_minres_is_scipys_to_the_bit(seed, p, indefinite, consistent, rtol):
    """The iterates, the stopping test and the solution of scipy.sparse.linalg.minres, bit for bit."""
    A, g = singular_symmetric(p, max(1, p // 2), seed, indefinite)
    b = torch.randn(p, generator=g, dtype=torch.float64)
    b = A @ b if consistent else b
    seen = []
    ours = minres(A, b, maxiter=2 * p, rtol=rtol, callback=lambda k, res, x: seen.append(x.clone()))
    op = spla.LinearOperator((p, p), matvec=lambda v: (A @ torch.from_numpy(v)).numpy(), dtype=np.float64)
    scipy_iterates = []
    x, info = spla.minres(op, b.numpy(), maxiter=2 * p, rtol=rtol, callback=lambda xk: scipy_iterates.append(xk.copy()))
    assert ours.iterations == len(scipy_iterates) == len(seen) == ours.products
    assert ours.converged == (info == 0)
    assert np.array_equal(ours.x.numpy(), x)
    assert all(np.array_equal(a.numpy(), c) for a, c in zip(seen, scipy_iterates))


def test_minres_is_the_krylov_space_minimiser_and_resumes(tmp_path):
    H, b = graded()
    r10 = minres(H, b, maxiter=10, rtol=0)
    ref = krylov_minimiser(H, b, 10)
    assert np.linalg.norm(r10.x.numpy() - ref) / np.linalg.norm(ref) < 1e-10
    r = minres(H, b, maxiter=25, rtol=0)
    assert r.residual == pytest.approx(float((H @ r.x - b).norm() / b.norm()), rel=1e-6)
    assert r.products == 25 and r.residuals == sorted(r.residuals, reverse=True)
    assert r.stopped_by == "maxiter" and not r.converged
    ck = str(tmp_path / "minres.pt")
    minres(H, b, maxiter=10, rtol=0, checkpoint=ck)  # "interrupted" after 10
    resumed = minres(H, b, maxiter=25, rtol=0, checkpoint=ck)
    assert resumed.resumed_from == 10 and resumed.products == 15
    assert torch.equal(resumed.x, r.x) and resumed.residuals == r.residuals
    other = minres(H, 2 * b, maxiter=25, rtol=0, checkpoint=ck)  # another key: starts afresh
    assert other.resumed_from == 0 and torch.allclose(other.x, 2 * r.x)


def test_callback_sees_every_iterate_and_stops():
    A, g = singular_symmetric(30, 30, 5)
    b = torch.randn(30, generator=g, dtype=torch.float64)
    norms = []
    sol = minres(A, b, callback=lambda k, res, x: norms.append(float(x.norm())) or k == 6)
    assert sol.iterations == 6 and sol.stopped_by == "callback" and not sol.converged
    assert all(a <= c + 1e-12 for a, c in zip(norms, norms[1:]))  # MINRES on SPD: ‖x_k‖ grows


@settings(max_examples=15, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), p=st.integers(5, 200), indefinite=st.booleans(),
       null_share=st.sampled_from([1e-6, 1e-2, 1.0]))
def test_min_norm_minres_equals_pinv_on_inconsistent_singular_systems(seed, p, indefinite, null_share):
    A, g = singular_symmetric(p, max(1, p // 2), seed, indefinite)
    lam, U = torch.linalg.eigh(A)
    null = U[:, lam.abs() < 1e-12]
    b = torch.randn(p, generator=g, dtype=torch.float64)
    b = b - null @ (null.T @ b) + null_share * null @ torch.randn(null.shape[1], generator=g, dtype=torch.float64)
    ref = np.linalg.pinv(A.numpy(), hermitian=True) @ b.numpy()
    x = minres_min_norm(A, b, maxiter=4 * p, rtol=1e-14).x.numpy()
    assert np.linalg.norm(x - ref) <= 1e-6 * np.linalg.norm(ref)


def test_plain_minres_is_not_minimum_norm_on_inconsistent_systems():
    """Why minres_min_norm exists: plain MINRES keeps b's null-space part and blows up along it."""
    for seed in range(3):
        A, g = singular_symmetric(60, 30, seed, indefinite=True)
        b = torch.randn(60, generator=g, dtype=torch.float64)
        ref = np.linalg.norm(np.linalg.pinv(A.numpy(), hermitian=True) @ b.numpy())
        assert float(minres(A, b, maxiter=240, rtol=1e-14).x.norm()) > 100 * ref


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(3, 40), p=st.integers(3, 40))
def test_cgls_reaches_the_minimum_norm_least_squares_solution(seed, m, p):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, min(m, p), generator=g, dtype=torch.float64) @ torch.randn(min(m, p), p, generator=g,
                                                                                    dtype=torch.float64)
    A[:, 0] = 0  # rank deficient
    b = torch.randn(m, generator=g, dtype=torch.float64)
    sol = cgls(A, b, maxiter=10 * p, rtol=1e-14)
    ref = np.linalg.pinv(A.numpy()) @ b.numpy()
    assert np.linalg.norm(sol.x.numpy() - ref) <= 1e-6 * max(np.linalg.norm(ref), 1)
    assert all(a >= c - 1e-12 for a, c in zip(sol.residuals, sol.residuals[1:]))  # monotone
    assert sol.products == 2 * sol.iterations + 1


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(3, 30), extra=st.integers(0, 30))
def test_cgne_is_minimum_norm_with_any_preconditioner(seed, m, extra):
    """Craig's method reaches A⁺b on a consistent system with and without a preconditioner in A's range,
    and a preconditioner that is the exact inverse of AAᵀ on its range takes one step."""
    g = torch.Generator().manual_seed(seed)
    p = m + extra
    A = torch.randn(m, p, generator=g, dtype=torch.float64) * torch.logspace(0, -2, p, dtype=torch.float64)
    b = A @ torch.randn(p, generator=g, dtype=torch.float64)  # consistent
    ref = np.linalg.pinv(A.numpy()) @ b.numpy()
    D = torch.diag(1 / torch.rand(m, generator=g, dtype=torch.float64))  # an SPD preconditioner
    exact = torch.linalg.pinv(A @ A.T)
    for M in (None, lambda r: D @ r, lambda r: exact @ r):
        sol = cgne(A, b, precondition=M, maxiter=20 * m, rtol=1e-13)
        assert np.linalg.norm(sol.x.numpy() - ref) <= 1e-7 * np.linalg.norm(ref)
        assert sol.products == 2 * sol.iterations + 1
    # one step to the rounding of the exact inverse, which grows with AAᵀ's condition (hypothesis found a
    # square A, m = 26, where 1e-10 needed two)
    rtol = max(1e-10, 100 * float(torch.linalg.cond(A @ A.T)) * torch.finfo(A.dtype).eps)
    assert cgne(A, b, precondition=lambda r: exact @ r, maxiter=5, rtol=rtol).iterations == 1
    # each step minimises the error over its Krylov space: the error falls monotonically
    errs = []
    cgne(A, b, maxiter=m, rtol=0, callback=lambda k, res, x: errs.append(np.linalg.norm(x.numpy() - ref)))
    assert all(a >= c * (1 - 1e-9) for a, c in zip(errs, errs[1:]))


def test_cgne_resumes(tmp_path):
    g = torch.Generator().manual_seed(3)
    A = torch.randn(20, 40, generator=g, dtype=torch.float64)
    b = torch.randn(20, generator=g, dtype=torch.float64)
    M = lambda r: r / (A * A).sum(1)  # noqa: E731  (Jacobi)
    full = cgne(A, b, precondition=M, maxiter=12, rtol=0)
    path = str(tmp_path / "cgne.pt")
    cgne(A, b, precondition=M, maxiter=5, rtol=0, checkpoint=path)
    resumed = cgne(A, b, precondition=M, maxiter=12, rtol=0, checkpoint=path)
    assert resumed.resumed_from == 5 and torch.equal(resumed.x, full.x) and resumed.residuals == full.residuals


def test_cgls_follows_lsqr_and_resumes(tmp_path):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(30, 50, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 50, dtype=torch.float64)
    b = torch.randn(30, generator=g, dtype=torch.float64)
    full = cgls(A, b, maxiter=12, rtol=0)
    # LSQR's iterates in exact arithmetic; rounding, amplified by κ(A) = 1e3, parts them later
    for k in (4, 8):
        lsqr = spla.lsqr(A.numpy(), b.numpy(), atol=0, btol=0, conlim=0, iter_lim=k)[0]
        assert np.linalg.norm(cgls(A, b, maxiter=k, rtol=0).x.numpy() - lsqr) < 1e-10 * np.linalg.norm(lsqr)
    path = str(tmp_path / "cgls.pt")
    cgls(A, b, maxiter=5, rtol=0, checkpoint=path)
    resumed = cgls(A, b, maxiter=12, rtol=0, checkpoint=path)
    assert resumed.resumed_from == 5 and resumed.products == 14
    assert torch.equal(resumed.x, full.x) and resumed.residuals == full.residuals


def test_lanczos_power_iteration_and_deflation():
    H, b = graded()
    top = torch.linalg.eigvalsh(H).abs().sort(descending=True).values
    ritz = lanczos(H, torch.randn(H.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64), 40)
    assert torch.allclose(ritz.values.abs().sort(descending=True).values[:3], top[:3], rtol=1e-8)
    assert ritz.products == 40 and abs(float(ritz.x @ H @ ritz.x)) == pytest.approx(float(top[0]), rel=1e-8)
    assert power_iteration(H, b, 200).values[0] == pytest.approx(float(top[0]), rel=1e-6)
    res = lambda x: float((H @ x - b).norm() / b.norm())  # noqa: E731
    plain = minres(H, b, maxiter=15, rtol=0)
    assert res(minres(H, b, maxiter=15, rtol=0, deflation=Deflation.from_krylov(ritz, 10)).x) < res(plain.x)
    # recycling: Ritz vectors from the Lanczos basis an earlier solve recorded
    start = torch.randn(b.shape, generator=torch.Generator().manual_seed(2), dtype=b.dtype)  # seeded: not the global RNG
    first = minres(H, start, maxiter=30, rtol=0, keep_basis=True)
    D = Deflation.from_krylov(first, 8)
    deflated = minres(H, b, maxiter=15, rtol=0, deflation=D, keep_basis=True)
    assert D.k == 8 and res(deflated.x) < res(plain.x)
    assert Deflation.from_krylov(deflated, 12).k == 12  # the deflated solve's basis plus its space
    with pytest.raises(ValueError, match="basis"):
        Deflation.from_krylov(plain, 4)


def test_deflated_solve_of_a_consistent_system_is_exact():
    A, g = singular_symmetric(40, 40, 7, indefinite=True)
    b = torch.randn(40, generator=g, dtype=torch.float64)
    D = Deflation.from_krylov(lanczos(A, torch.randn(40, generator=g, dtype=torch.float64), 40), 6)
    sol = minres(A, b, maxiter=200, rtol=1e-13, deflation=D)
    assert torch.allclose(A @ sol.x, b, atol=1e-9)
