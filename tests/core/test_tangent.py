"""The training tangent: its replay is the user's ``torch.optim`` run, it is the derivative of the training map
(central differences of that run), its second derivative gives the validity range, and its reference measures
its own noise floor and divergence."""

import pytest
import torch
from torch import nn

from setsens.analysis import analyze, analyze_training, validity
from setsens.finetune import Training, fine_tune
from setsens.perturb import gradient_perturbation
from setsens.problem import Problem, cross_entropy
from setsens.retrain import training_response
from setsens.tangent import jump_ratio, output_derivatives, training_tangent
from setsens.verdict import PRECISION_THRESHOLD
from problems import smooth_mlp as smooth

TRAININGS = {
    "sgd-nesterov": Training(steps=25, lr=0.5),
    "sgd-heavy-ball-minibatch": Training(steps=25, lr=0.3, momentum=0.5, nesterov=False, batch_size=4,
                                         weight_decay=0.01),
    "adam": Training(optimizer="adam", lr=0.02, steps=25, weight_decay=0.01),
    "adamw": Training(optimizer="adamw", lr=0.02, steps=25, weight_decay=0.1),
}


@pytest.mark.parametrize("name", TRAININGS)
def test_the_replay_is_the_torch_optim_run_in_float32(name):
    problem, _ = smooth(torch.float32)
    pert = gradient_perturbation(problem, [1, 7], 0.01)
    tangent = training_tangent(problem, pert, TRAININGS[name])
    clean = fine_tune(problem, None, TRAININGS[name]).w
    assert float((clean - problem.params).norm()) > 0.1  # the run moves: a replay that stood still would fail
    assert float((tangent.base - clean).norm() / clean.norm()) <= 1e-4


@pytest.mark.parametrize("name", TRAININGS)
def test_the_tangent_is_the_derivative_of_the_training_map(name):
    problem, _ = smooth()
    training = TRAININGS[name]
    pert = gradient_perturbation(problem, [1, 7], 0.01)
    tangent = training_tangent(problem, pert, training, order=2)
    h = 1e-3
    plus, minus = (fine_tune(problem, pert.scaled(s), training).w for s in (h, -h))
    clean = fine_tune(problem, None, training).w
    fd, fd2 = (plus - minus) / (2 * h), (plus - 2 * clean + minus) / h**2
    assert float((tangent.shift - fd).norm() / fd.norm()) <= 1e-4
    assert float((tangent.second - fd2).norm() / fd2.norm()) <= 1e-3
    # the test can fail: the same derivative through a different optimiser, or a different T, is far from it
    other = Training(steps=training.steps, lr=training.lr, momentum=0.0) if training.optimizer == "sgd" else \
        Training(optimizer="adam", steps=training.steps, lr=training.lr, betas=(0.0, 0.999))
    for wrong in (other, Training(**{**training.__dict__, "steps": training.steps - 5})):
        assert float((training_tangent(problem, pert, wrong).shift - fd).norm() / fd.norm()) > 0.05


def test_a_tangent_taken_off_the_data_differentiates_there():
    problem, _ = smooth()
    training = TRAININGS["sgd-nesterov"]
    pert = gradient_perturbation(problem, [1, 7], 0.05)
    tangent = training_tangent(problem, pert, training, at=1.0)
    h = 1e-3
    plus, minus = (fine_tune(problem, pert.scaled(1 + s), training).w for s in (h, -h))
    assert torch.allclose(tangent.base, fine_tune(problem, pert, training).w, rtol=0, atol=1e-12)
    assert float((tangent.shift - (plus - minus) / (2 * h)).norm() / tangent.shift.norm()) <= 1e-4


def test_the_validity_ratio_is_the_second_order_term_over_the_first():
    problem, (x_eval, _) = smooth()
    training = TRAININGS["sgd-nesterov"]
    pert = gradient_perturbation(problem, [1, 7], 0.01)
    tangent = training_tangent(problem, pert, training, order=2)
    first, second = output_derivatives(problem, tangent.base, tangent.shift, x_eval, tangent.second)
    v = validity(tangent, x_eval)
    at = lambda w: problem.outputs(w, x_eval) - problem.outputs(w, x_eval).mean(1, keepdim=True)  # noqa: E731
    clean = at(tangent.base)
    for s in (3.0, 10.0):  # the measured remainder of a first-order answer at s times the step
        moved = at(fine_tune(problem, pert.scaled(s), training).w)
        remainder = float((moved - clean - s * first).norm() / (s * first).norm())
        assert remainder == pytest.approx(s * v["ratio"], rel=0.25)
    # the range is a property of the direction, not of the step it was measured at
    v2 = validity(tangent.scaled(4.0), x_eval)
    assert v2["ratio"] == pytest.approx(4 * v["ratio"], rel=1e-9)
    assert v2["step_max"] == pytest.approx(v["step_max"], rel=1e-6)
    # step_max: the largest graded step inside both thresholds, every larger one outside
    assert v["step_max"] > 0 and v["curve"][-1]["step"] == v["step_max"]
    for p in v["curve"]:
        assert p["ratio"] == pytest.approx(v["ratio"] * p["step"] / v["step_percent"])
        inside = (p["ratio"] <= v["threshold"] and p["jump"] is not None and p["jump"] <= v["check_threshold"]
                  and p["precision"] >= 1e3)
        assert inside == (p["step"] == v["step_max"])


def test_the_reference_measures_its_floor_and_its_divergence():
    problem, _ = smooth()
    pert = gradient_perturbation(problem, [1, 7], 0.01)
    ref = training_response(problem, pert, TRAININGS["adam"])
    assert not ref.diverged
    ratio = float(ref.shift.norm() / (ref.floor - ref.clean).norm())
    assert 250 < ratio < 350  # a smooth map: the change at a 300× smaller step is 300× smaller
    assert training_response(problem, pert, Training(steps=25, lr=500.0), floor_factor=0).diverged


@pytest.mark.parametrize("loss", ["ce", "se"])
def test_analyze_the_training_tangent_against_the_reference_it_predicts(loss):
    problem, test = smooth(loss=loss)
    pert = gradient_perturbation(problem, [1, 7], 0.01)
    a = analyze(problem, pert, "training-tangent", test=test, validate=True, training=TRAININGS["adam"])
    v, s = a.validation, a.summary()
    assert a.verdict.status == "pass" and v["reference"] == "training_response" and v["reference_stable"]
    assert v["pearson"] > 0.999 and v["relative_error"] < 0.05
    assert s["validity"]["step_max"] > 1 and s["estimate"]["method"] == "training-tangent"
    # far outside the range the verdict fails first, and retraining agrees that the answer misses
    far = analyze_training(problem, pert.scaled(3 * s["validity"]["threshold"] / s["validity"]["ratio"]),
                           TRAININGS["adam"], test=test, validate=True)
    assert {c.name: c.status for c in far.verdict.checks}["second_order"] == "fail"
    assert far.validation["relative_error"] > 5 * v["relative_error"]


def test_options_a_method_does_not_read_are_refused():
    problem, _ = smooth()
    pert = gradient_perturbation(problem, [1], 0.01)
    with pytest.raises(ValueError, match="steps does not apply"):
        analyze(problem, pert, "training-tangent", steps=50)
    with pytest.raises(ValueError, match="training applies to methods 'training-tangent' and 'training-secant' only"):
        analyze(problem, pert, "hessian", training=Training())
    with pytest.raises(ValueError, match="optimizer must be one of"):
        Training(optimizer="rmsprop")
    with pytest.raises(ValueError, match="batch_size"):
        Training(batch_size=0)


def test_the_jump_ratio_sees_units_that_change_sides():
    ratios = {}
    for act in (nn.Tanh, nn.ReLU):
        g = torch.Generator().manual_seed(1)
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(3, 32), act(), nn.Linear(32, 3)).double()
        x, y = torch.randn(40, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g)
        problem = Problem(model, cross_entropy, (x, y), batch_size=20)
        pert = gradient_perturbation(problem, [1, 7, 9], 0.03)
        ratios[act] = jump_ratio(training_tangent(problem, pert, TRAININGS["sgd-nesterov"], probes=5))["median"]
    assert ratios[nn.Tanh] < 0.05 and ratios[nn.ReLU] > 1.0  # measured: 0.005 and 2.7


def test_an_interrupted_tangent_resumes_from_its_checkpoint(tmp_path):
    problem, _ = smooth()
    pert = gradient_perturbation(problem, [1, 7], 0.01)
    training, ck = TRAININGS["adam"], str(tmp_path / "tangent.pt")
    whole = training_tangent(problem, pert, training, order=2, probes=5)

    def stop(event):
        if event.done == 13:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        training_tangent(problem, pert, training, order=2, probes=5, checkpoint=ck, progress=stop)
    steps = []
    resumed = training_tangent(problem, pert, training, order=2, probes=5, checkpoint=ck, progress=steps.append)
    assert (steps[0].stage, steps[0].done, steps[0].total) == ("tangent", 11, training.steps)  # saved at step 10, so 11 … 25 are run again
    for a, b in ((whole.base, resumed.base), (whole.shift, resumed.shift), (whole.second, resumed.second)):
        assert torch.equal(a, b)
    assert [p[0] for p in resumed.probes] == [p[0] for p in whole.probes]


def test_a_diverging_training_fails_the_verdict_and_is_no_stable_reference():
    """The flags come out false where they must: at lr 500 the replay diverges (replay_converging fails) and the
    reference's runs diverge (reference_stable is False)."""
    problem, test = smooth()
    pert = gradient_perturbation(problem, [1, 7], 0.01)
    a = analyze_training(problem, pert, Training(steps=10, lr=500.0), test=test, validate=True)
    checks = {c.name: c.status for c in a.verdict.checks}
    assert checks["replay_converging"] == "fail" and a.verdict.status == "fail"
    assert a.validation["reference_run"]["diverged"] and not a.validation["reference_stable"]


def test_a_range_the_grid_steps_over_is_found_between_its_bounds():
    problem, (x_eval, _) = smooth()
    tangent = training_tangent(problem, gradient_perturbation(problem, [1, 7], 0.01), TRAININGS["sgd-nesterov"],
                               order=2)
    v = validity(tangent, x_eval, steps=(1e3, 1e-15))  # one step above the range, one below the rounding
    top, bottom = v["curve"][0], v["curve"][-1]
    assert top["ratio"] > v["threshold"] and bottom["precision"] < PRECISION_THRESHOLD
    high = v["threshold"] * top["step"] / top["ratio"]  # both bounds are proportional to the step
    low = PRECISION_THRESHOLD * bottom["step"] / bottom["precision"]
    assert [p["step"] for p in v["curve"]] == [1e3, v["step_max"], 1e-15]
    assert low < v["step_max"] < high and v["step_max"] == pytest.approx((low * high) ** 0.5, rel=0.05)
    assert v["curve"][1]["jump"] <= v["check_threshold"]
    assert validity(tangent, x_eval)["step_max"] <= high
