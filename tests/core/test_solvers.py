"""Solvers against NumPy's pseudo-inverse and eigendecomposition."""

import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from setsens.solvers import Spectrum, krylov_solve, top_eigenvalue


class MatrixOperator:
    """A dense symmetric matrix behind the Hessian interface (``__call__``, ``calls``, ``to_scipy``)."""

    def __init__(self, A):
        self.A, self.calls, self.shape, self.w = A, 0, A.shape, A[0]

    def __call__(self, v):
        self.calls += 1
        return self.A @ v

    def to_scipy(self):
        from setsens.operators import _scipy_operator

        return _scipy_operator(self, self.A.shape[0])


def singular_symmetric(p, rank, seed, indefinite=False):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    lam = torch.zeros(p, dtype=torch.float64)
    lam[:rank] = torch.rand(rank, generator=g, dtype=torch.float64) + 0.1
    if indefinite:
        lam[: rank // 2] *= -1
    return Q @ torch.diag(lam) @ Q.T, g


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), p=st.integers(4, 30), indefinite=st.booleans())
def test_dense_min_norm_equals_pinv(seed, p, indefinite):
    A, g = singular_symmetric(p, max(1, p // 2), seed, indefinite)
    b = torch.randn(p, generator=g, dtype=torch.float64)  # generally outside range(A)
    v = Spectrum.of(A).solve(b, tau=1e-8)
    ref = -np.linalg.pinv(A.numpy(), rcond=1e-8, hermitian=True) @ b.numpy()
    assert np.allclose(v.numpy(), ref, atol=1e-8)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), indefinite=st.booleans())
def test_minres_and_lsmr_reach_min_norm_on_consistent_singular_systems(seed, indefinite):
    A, g = singular_symmetric(25, 12, seed, indefinite)
    b = A @ torch.randn(25, generator=g, dtype=torch.float64)  # in range(A)
    ref = -np.linalg.pinv(A.numpy(), hermitian=True) @ b.numpy()
    for method in ("minres", "lsmr"):
        sol = krylov_solve(MatrixOperator(A), b, method=method, maxiter=500, rtol=1e-12)
        assert np.allclose(sol.v.numpy(), ref, atol=1e-7), method
        assert sol.hvp_count > 0


def test_lsmr_min_norm_least_squares_outside_range():
    A, g = singular_symmetric(20, 8, 3)
    b = torch.randn(20, generator=g, dtype=torch.float64)
    sol = krylov_solve(MatrixOperator(A), b, method="lsmr", maxiter=500, rtol=1e-14)
    ref = -np.linalg.pinv(A.numpy(), hermitian=True) @ b.numpy()
    assert np.allclose(sol.v.numpy(), ref, atol=1e-7)


def test_callback_stops_and_iterates_grow():
    A, g = singular_symmetric(30, 30, 5)
    b = torch.randn(30, generator=g, dtype=torch.float64)
    sol = krylov_solve(MatrixOperator(A), b, keep_iterates=True, callback=lambda k, v: k == 6)
    assert sol.iterations == 6 and sol.stopped_by == "callback"
    norms = [float(v.norm()) for v in sol.iterates]
    assert all(a <= b + 1e-12 for a, b in zip(norms, norms[1:]))  # MINRES on SPD: ‖v_k‖ grows


def test_top_eigenvalue():
    """Power iteration against eigvalsh, on a spectrum with a gap (|λ₂/λ₁| ≤ 0.5)."""
    A, _ = singular_symmetric(15, 15, 2, indefinite=True)
    Q = torch.linalg.eigh(A).eigenvectors
    lam = torch.linalg.eigvalsh(A)
    lam[lam.abs().argmax()] = -2.0
    A = Q @ torch.diag(lam) @ Q.T
    assert abs(top_eigenvalue(MatrixOperator(A), iterations=100) - 2.0) < 1e-9


@settings(max_examples=15, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), p=st.integers(5, 200), indefinite=st.booleans(), null_share=st.sampled_from([1e-6, 1e-2, 1.0]))
def test_min_norm_minres_equals_pinv_on_inconsistent_singular_systems(seed, p, indefinite, null_share):
    """Plain MINRES keeps b's null-space part and can blow up; the two consistent solves do not."""
    from setsens.solvers import minres_min_norm

    A, g = singular_symmetric(p, max(1, p // 2), seed, indefinite)
    lam, U = torch.linalg.eigh(A)
    null = U[:, lam.abs() < 1e-12]
    b = torch.randn(p, generator=g, dtype=torch.float64)
    b = b - null @ (null.T @ b) + null_share * null @ torch.randn(null.shape[1], generator=g, dtype=torch.float64)
    ref = -np.linalg.pinv(A.numpy(), hermitian=True) @ b.numpy()
    v = minres_min_norm(MatrixOperator(A), b, maxiter=4 * p, rtol=1e-14).v.numpy()
    assert np.linalg.norm(v - ref) <= 1e-6 * np.linalg.norm(ref)


def test_plain_minres_is_not_minimum_norm_on_inconsistent_systems():
    """Why minres_min_norm exists: on a singular system whose right-hand side leaves range(A), plain
    MINRES keeps b's null-space part and its iterates blow up along it."""
    for seed in range(3):
        A, g = singular_symmetric(60, 30, seed, indefinite=True)
        b = torch.randn(60, generator=g, dtype=torch.float64)
        ref = np.linalg.norm(np.linalg.pinv(A.numpy(), hermitian=True) @ b.numpy())
        plain = float(krylov_solve(MatrixOperator(A), b, maxiter=240, rtol=1e-14).v.norm())
        assert plain > 100 * ref
