"""Theorem 2/3 closed form: against autograd, against the block-restricted numerical modulus."""

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

from setsens.lipschitz import DenseModulus, closed_form_modulus, parse_dfcnn, theorem3_modulus
from setsens.models.mlp import mlp
from setsens.problem import Problem, cross_entropy, squared_error


def _jacobians(problem, k):
    """∇_x f(x_k) (c × d) and, per weight matrix, ∇_{w^{(h)}} f(x_k) (c × p_h), by autograd."""
    x, _ = problem.points([k])
    w = problem.params

    def f(w, x):
        return problem.outputs(w, x[None])[0]

    A = torch.func.jacrev(f, argnums=1)(w, x[0])
    G = torch.func.jacrev(f, argnums=0)(w, x[0])
    return A, [G[:, sl] for _, sl in problem.blocks()]


def _lemma6_reference(A, G):
    """sup ‖Aᵀv‖ / ‖Gᵀv‖ by SciPy's generalized symmetric eigensolver."""
    a, g = (A @ A.T).numpy(), (G @ G.T).numpy()
    s = np.linalg.eigvalsh(g)
    if s.min() <= 1e-10 * s.max():
        return None  # ∇_w f rank deficient (dead units): Lemma 6 does not apply
    return float(np.sqrt(scipy.linalg.eigh(a, g, eigvals_only=True).max()))


def test_closed_form_matches_autograd(make_random):
    pb = make_random([5, 12, 10, 3], n=6, seed=1)
    cf = closed_form_modulus(pb)
    assert cf.labels == ["W1", "W2", "a (output)"]
    checked = checked_inf = 0
    for k in range(pb.n):
        A, Gs = _jacobians(pb, k)
        for h, G in enumerate(Gs):
            ref = _lemma6_reference(A, G)
            if ref is None:
                checked_inf += not np.isfinite(cf.kappa[k, h].item())
                continue
            checked += 1
            assert cf.kappa[k, h].item() == pytest.approx(ref, rel=1e-8)
            printed = A.norm(dim=1) / G.norm(dim=1)  # the printed scalar formula, per output
            assert torch.allclose(cf.printed[k, h], printed, rtol=1e-10)
        Gall = torch.cat(Gs, dim=1)
        assert cf.network[k].item() == pytest.approx(_lemma6_reference(A, Gall), rel=1e-8)
    assert checked >= pb.n * 2, (checked, checked_inf)


def test_scalar_output_is_the_printed_formula(make_random):
    """For the paper's scalar output a ∈ R^m, κ_h = ‖∇_x f‖ / ‖∇_{W^{(h)}} f‖_F exactly."""
    pb = make_random([4, 6, 5, 1], n=5, seed=2)
    cf = closed_form_modulus(pb)
    assert torch.allclose(cf.kappa, cf.printed[..., 0], rtol=1e-12)


def test_orderings_between_forms(make_random):
    """max_j printed_j ≤ κ_h (vector Lemma 6) and the joint-network κ ≤ min_h κ_h."""
    pb = make_random([5, 8, 8, 3], n=8, seed=3)
    cf = closed_form_modulus(pb)
    finite = torch.isfinite(cf.kappa)
    assert (cf.printed.amax(-1)[finite] <= cf.kappa[finite] * (1 + 1e-10)).all()
    assert (cf.network <= cf.kappa.amin(1) * (1 + 1e-10)).all()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    hidden=st.lists(st.integers(3, 7), min_size=1, max_size=2),
    c=st.integers(1, 2),
    seed=st.integers(0, 10_000),
)
def test_R1_equals_block_modulus_of_the_one_point_problem(make_interpolating, hidden, c, seed):
    """(R1) Theorem 2's κ_h,k is the layer-h numerical modulus of the problem {x_k} alone."""
    pb = make_interpolating([4, *hidden, c], n=1, seed=seed)
    cf = closed_form_modulus(pb)
    dm = DenseModulus(pb, tau=1e-9)
    for h, (name, _) in enumerate(pb.blocks()):
        kc = cf.kappa[0, h].item()
        if not np.isfinite(kc) or kc == 0:
            continue  # dead units: Lemma 6's surjectivity fails (reported as inf)
        res = dm.modulus(name, tau=1e-9, stability=False)
        assert res.aubin_residual < 1e-8
        assert res.kappa == pytest.approx(kc, rel=1e-7)


def test_R2_overparameterised_block_closed_form_is_a_lower_bound(make_interpolating):
    """(R2) n points, block with p_h ≥ n·c: κ_num,h({k}) = ‖A_kᵀG_kM⁺‖ ≥ κ_h,k, equality iff orthogonal."""
    pb = make_interpolating([6, 12, 2], n=4, seed=5)  # W1: 72 ≥ 8 residuals, a: 24 ≥ 8
    cf = closed_form_modulus(pb)
    dm = DenseModulus(pb, per_point=True, tau=1e-9)
    for h, (name, sl) in enumerate(pb.blocks()):
        jac = [_jacobians(pb, k) for k in range(pb.n)]
        M = sum(G[h].T @ G[h] for _, G in jac)
        Mp = torch.linalg.pinv(M, hermitian=True, rtol=1e-10)
        for k in range(pb.n):
            A, G = jac[k][0], jac[k][1][h]
            design = torch.linalg.matrix_norm(A.T @ G @ Mp, ord=2).item()
            num = dm.point_kappa[name][k].item()
            assert num == pytest.approx(design, rel=1e-6)
            assert num >= cf.kappa[k, h].item() * (1 - 1e-9)
        # not all equal: the other points' constraints are not orthogonal to point k's
        assert (dm.point_kappa[name] > cf.kappa[:, h] * 1.01).any()


def test_theorem3_combination():
    k = torch.tensor([[1.0, 2.0], [2.0, 0.0], [2.0, 1.0]])
    assert torch.allclose(theorem3_modulus(k), torch.tensor([3.0, 5.0**0.5]))


def _pb(net, loss=squared_error, y=None):
    x = torch.rand(4, 3, dtype=torch.float64)
    y = torch.zeros(4, 2, dtype=torch.float64) if y is None else y
    return Problem(net.double(), loss, (x, y))


@pytest.mark.parametrize(
    "net, message",
    [
        (mlp([3, 4, 2], bias=True), "bias"),
        (mlp([3, 4, 2], activation=nn.Tanh), "ReLU"),
        (mlp([3, 4, 2], activation=nn.LeakyReLU), "ReLU"),
        (nn.Sequential(nn.Linear(3, 4, bias=False), nn.Dropout(), nn.Linear(4, 2, bias=False)), "ReLU"),
        (nn.Sequential(nn.Linear(3, 2, bias=False), nn.ReLU()), "end with a Linear"),
        (nn.Sequential(nn.Linear(3, 2, bias=False), nn.LayerNorm(2), nn.Linear(2, 2, bias=False)), "ReLU"),
        (nn.Sequential(nn.Flatten(), nn.Linear(3, 2, bias=False)), "alternates Linear and ReLU"),
    ],
)
def test_rejects_non_dfcnn(net, message):
    with pytest.raises(ValueError, match=message):
        closed_form_modulus(_pb(net))


def test_rejects_non_squared_loss():
    pb = _pb(mlp([3, 4, 2]), loss=cross_entropy, y=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="squared loss"):
        parse_dfcnn(pb)


def test_rejects_non_sequential():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 2, bias=False)

        def forward(self, x):
            return self.l(x)

    with pytest.raises(ValueError, match="Sequential"):
        parse_dfcnn(_pb(Net()))
