"""setsens.Audit: the owner of a problem and its factor gives what the module functions give."""

import pytest
import torch
from problems import dfcnn_problem, fitted_problem

import setsens
from setsens import audit as audit_module
from setsens.audit import Audit, GramFactor, answer_queries, group_modulus, scan
from setsens.certificate import first_order_certificate, poisoning_certificate
from setsens.poisoning import AttackOptions, input_gradient, margin, poison, set_shift
from setsens.problem import Perturbation, cross_entropy


def _perturbations(problem, count=3):
    g = torch.Generator().manual_seed(5)
    return [Perturbation(torch.tensor([i]), 0.01 * torch.randn(1, 3, generator=g, dtype=torch.float64))
            for i in range(count)]


def test_audit_is_exported():
    assert setsens.Audit is Audit and "Audit" in setsens.__all__


def test_factor_is_built_once_and_shared(monkeypatch):
    problem = fitted_problem()
    built = []

    class Counting(GramFactor):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(audit_module, "GramFactor", Counting)
    audit = Audit(problem)
    assert not built  # lazy
    factor = audit.factor
    audit.scan(), audit.group_modulus([0, 1]), audit.queries(_perturbations(problem))
    audit.shift(_perturbations(problem)[0]), audit.input_gradient(margin(problem, torch.zeros(3)))
    assert len(built) == 1 and audit.factor is factor
    assert audit.scan() is audit.scan()
    given = GramFactor(fitted_problem())
    with pytest.raises(ValueError, match="another problem"):
        Audit(problem, given)


@pytest.mark.parametrize("loss", ["se", "ce"])
def test_methods_equal_the_functions(loss):
    problem = fitted_problem() if loss == "se" else fitted_problem(cross_entropy, k=3)
    factor = GramFactor(problem)
    audit = Audit(problem, factor)
    assert audit.factor is factor
    ref = scan(problem, factor)
    got = audit.scan()
    assert torch.equal(got.kappa, ref.kappa) and torch.equal(got.direction, ref.direction)
    assert torch.equal(got.ranking, ref.ranking)
    kappa, worst = audit.group_modulus([0, 2])
    kappa_ref, worst_ref = group_modulus(problem, [0, 2], factor)
    assert kappa == kappa_ref and torch.equal(worst, worst_ref)
    perts = _perturbations(problem)
    assert torch.equal(audit.queries(perts), answer_queries(problem, perts, factor))
    assert torch.equal(audit.shift(perts[1]), set_shift(problem, perts[1], factor))
    phi = margin(problem, torch.ones(3, dtype=torch.float64))
    assert torch.equal(audit.input_gradient(phi), input_gradient(problem, phi, None, factor))
    assert torch.equal(audit.input_gradient(phi, perts[0]), input_gradient(problem, phi, perts[0], factor))
    options = AttackOptions(points=2, steps=3)
    attack, attack_ref = audit.attack(phi, options), poison(problem, phi, options)
    assert torch.equal(attack.perturbation.indices, attack_ref.perturbation.indices)
    assert torch.allclose(attack.perturbation.delta, attack_ref.perturbation.delta, rtol=0, atol=1e-12)
    assert attack.predicted == pytest.approx(attack_ref.predicted, abs=1e-12)
    cgls = AttackOptions(points=2, steps=2, solver="cgls")
    assert audit.attack(phi, cgls).predicted == poison(problem, phi, cgls).predicted
    with pytest.raises(ValueError, match="solver='factor'"):
        poison(problem, phi, cgls, factor=factor)


def test_certificates_as_the_cli_computes_them():
    x_eval = torch.randn(6, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    problem = fitted_problem()  # tanh with biases: first order only, with the reason
    certs = Audit(problem).certificates(x_eval, [0.0, 1e-3], 2)
    ref = first_order_certificate(problem, x_eval, [0.0, 1e-3], 2)
    assert torch.equal(certs.first_order.radius, ref.radius) and torch.equal(certs.first_order.certified,
                                                                              ref.certified)
    assert certs.margin_bounds is None and certs.skipped and list(certs.kinds()) == ["first order"]

    problem = dfcnn_problem([4, 12, 3], 6, seed=1, interpolating=True)  # bias-free ReLU: both certificates
    x_eval = torch.rand(20, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.1
    audit = Audit(problem)
    certs = audit.certificates(x_eval, [0.0, 1e-3], 2)
    margin_ref = poisoning_certificate(problem, scan(problem), x_eval, [0.0, 1e-3], 2)
    assert certs.skipped is None and list(certs.kinds()) == ["first order", "margin bounds"]
    assert certs.margin_bounds.kappa == pytest.approx(margin_ref.kappa, rel=1e-12)
    assert torch.equal(certs.margin_bounds.certified, margin_ref.certified)
    assert torch.equal(certs.first_order.radius, first_order_certificate(problem, x_eval, [0.0, 1e-3], 2).radius)
