"""setsens.linear: every linear operator of setsens held to one contract, ``⟨A v, u⟩ = ⟨v, Aᵀ u⟩``,
with consistent shapes and call counts, on small float64 problems — and the check can fail."""

import numpy as np
import pytest
import torch
from problems import fitted_problem, small_problem, smooth_mlp

from setsens.audit import GramFactor
from setsens.function_space import OutputJacobian
from setsens.linear import LinearOperator
from setsens.operators import Damped, DataJacobian, GaussNewtonMatrix, Hessian
from setsens.poisoning import _flat_adjoint
from setsens.problem import center_classes, cross_entropy, squared_error

RTOL = 1e-10


def check_adjoint(A: LinearOperator, v: torch.Tensor, u: torch.Tensor) -> None:
    """``⟨A v, u⟩ = ⟨v, Aᵀ u⟩`` to a relative 1e-10 (float64), through ``@``/``.T`` and through
    ``to_scipy()``; ``A.shape`` consistent with the products and with ``A.T``; one call per product."""
    assert isinstance(A, LinearOperator)
    m, n = A.shape
    assert A.T.shape == (n, m) and A.T.T.shape == (m, n)
    assert v.numel() == n and u.numel() == m
    calls = A.calls
    Av, ATu = A @ v, A.T @ u
    assert A.calls == calls + 2
    assert Av.numel() == m and ATu.numel() == n
    assert Av.dtype == ATu.dtype == A.dtype == torch.float64 and Av.device == A.device
    lhs, rhs = float((Av.reshape(-1) * u.reshape(-1)).sum()), float((v.reshape(-1) * ATu.reshape(-1)).sum())
    assert lhs != 0.0
    assert abs(lhs - rhs) <= RTOL * max(abs(lhs), abs(rhs)), f"⟨Av, u⟩ = {lhs!r}, ⟨v, Aᵀu⟩ = {rhs!r}"
    S = A.to_scipy()
    assert S.shape == (m, n)
    Sv, STu = S.matvec(v.reshape(-1).numpy()), S.rmatvec(u.reshape(-1).numpy())
    assert Sv.shape == (m,) and STu.shape == (n,)
    for scipy_out, out in ((Sv, Av), (STu, ATu)):
        out = out.reshape(-1).numpy()
        assert np.linalg.norm(scipy_out - out) <= RTOL * np.linalg.norm(out)
    assert abs(Sv @ u.reshape(-1).numpy() - v.reshape(-1).numpy() @ STu) <= RTOL * abs(lhs)


def _random(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _square(A, p):
    return A, _random(p, seed=1), _random(p, seed=2)


def _outputs(problem):
    x, _ = problem.points(torch.arange(1))
    return problem.n, problem.outputs(problem.params, x).numel()


def hessian():
    problem = small_problem(seed=0)
    return _square(Hessian(problem), problem.p)


def hessian_recomputed():
    problem, _ = smooth_mlp()
    return _square(Hessian(problem, mode="double_backward", cache="none"), problem.p)


def gauss_newton():
    problem, _ = smooth_mlp()
    return _square(GaussNewtonMatrix(problem), problem.p)


def gauss_newton_squared_error():
    problem, _ = smooth_mlp(loss="se")
    return _square(GaussNewtonMatrix(problem), problem.p)


def damped_hessian():
    problem = small_problem(seed=1)
    return _square(Damped(Hessian(problem), 0.3), problem.p)


def damped_gauss_newton():
    problem, _ = smooth_mlp()
    return _square(Damped(GaussNewtonMatrix(problem), 0.1), problem.p)


def data_jacobian(scale="exact"):
    problem = small_problem(seed=2)
    J = DataJacobian(problem, [0, 3, 7], scale=scale)
    return J, _random(3, *problem.input_shape, seed=1), _random(problem.p, seed=2)


def output_jacobian(loss=cross_entropy, centered=True):
    problem = fitted_problem(loss, k=3)
    G = OutputJacobian(problem, centered=centered)
    return G, _random(problem.p, seed=1), _random(*_outputs(problem), seed=2)


def output_jacobian_transposed():
    G, v, u = output_jacobian()
    return G.T, u, v


def gram_factor(loss=squared_error, path="dense"):
    problem = fitted_problem(loss, k=3)
    return GramFactor(problem, path=path), _random(*_outputs(problem), seed=1), _random(problem.p, seed=2)


def poisoning_adjoint():
    problem = fitted_problem(cross_entropy, k=3)
    n, k = _outputs(problem)
    return _flat_adjoint(problem), _random(n * k, seed=1), _random(problem.p, seed=2)


SYMMETRIC = {"hessian": hessian, "hessian-recomputed": hessian_recomputed, "gauss-newton": gauss_newton,
             "gauss-newton-se": gauss_newton_squared_error, "damped-hessian": damped_hessian,
             "damped-gauss-newton": damped_gauss_newton}
RECTANGULAR = {"data-jacobian": data_jacobian, "data-jacobian-paper": lambda: data_jacobian("paper"),
               "output-jacobian-centred": output_jacobian,
               "output-jacobian-se": lambda: output_jacobian(squared_error, centered=False),
               "output-jacobian-transposed": output_jacobian_transposed, "gram-factor-se": gram_factor,
               "gram-factor-ce": lambda: gram_factor(cross_entropy),
               "gram-factor-streamed": lambda: gram_factor(cross_entropy, "streamed"),
               "gram-factor-nystrom": lambda: gram_factor(cross_entropy, "nystrom"), "poisoning-adjoint": poisoning_adjoint}


@pytest.mark.parametrize("build", list(SYMMETRIC.values()) + list(RECTANGULAR.values()),
                         ids=list(SYMMETRIC) + list(RECTANGULAR))
def test_adjoint(build):
    check_adjoint(*build())


@pytest.mark.parametrize("build", list(SYMMETRIC.values()), ids=list(SYMMETRIC))
def test_symmetric_operators_are_their_own_transpose(build):
    A, v, u = build()
    assert A.symmetric and A.T is A
    assert torch.equal(A.T @ u, A @ u) and torch.equal(A(v), A @ v)


@pytest.mark.parametrize("build", list(RECTANGULAR.values()), ids=list(RECTANGULAR))
def test_rectangular_operators_have_a_transposed_view(build):
    A, _, u = build()
    assert not A.symmetric and A.T is not A
    assert torch.equal((A.T @ u).reshape(-1), A.T.flattened() @ u)


class _WrongScale(DataJacobian):
    def rmatvec(self, y):
        return super().rmatvec(y) * (1 + 1e-6)


class _Uncentred(OutputJacobian):
    def rmatvec(self, u):  # forgets that the centring is the operator's own
        centered, self.centered = self.centered, False
        try:
            return super().rmatvec(u)
        finally:
            self.centered = centered


def test_check_adjoint_fails_on_a_wrong_rmatvec():
    problem = small_problem(seed=2)
    J = _WrongScale(problem, [0, 3, 7])
    with pytest.raises(AssertionError, match="Aᵀu"):
        check_adjoint(J, _random(3, *problem.input_shape, seed=1), _random(problem.p, seed=2))
    problem = fitted_problem(cross_entropy, k=3)
    G = _Uncentred(problem, centered=True)
    u = _random(*_outputs(problem), seed=2)
    assert not torch.allclose(u, center_classes(u))
    with pytest.raises(AssertionError, match="Aᵀu"):
        check_adjoint(G, _random(problem.p, seed=1), u)
