"""The secant tangent: each ReLU's forward-mode derivative is its secant over the move, so that a ReLU network's
fine-tuning is followed where the units change sides — exact for one ReLU layer, the tangent itself on a smooth
network, and graded by checks that can fail."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

import setsens.analysis
from setsens.analysis import analyze, analyze_training, validity
from setsens.finetune import Training
from setsens.perturb import gradient_perturbation
from setsens.problem import Problem, cross_entropy
from setsens.retrain import training_response
from setsens.secant import Secant
from setsens.tangent import jump_ratio, secant_residual, training_tangent

FORMS = {"nn.ReLU": lambda z: nn.ReLU()(z), "nn.ReLU(inplace)": lambda z: nn.ReLU(inplace=True)(z),
         "F.relu": F.relu, "torch.relu": torch.relu, "Tensor.relu": lambda z: z.relu(),
         "torch.relu_": lambda z: torch.relu_(z.clone()), "Tensor.relu_": lambda z: z.clone().relu_(),
         "F.leaky_relu": lambda z: F.leaky_relu(z, 0.1), "nn.LeakyReLU": lambda z: nn.LeakyReLU(0.2)(z)}


class OneLayer(nn.Module):
    def __init__(self, unit):
        super().__init__()
        self.first, self.second, self.unit = nn.Linear(3, 40), nn.Linear(40, 2), unit

    def forward(self, x):
        return self.second(self.unit(self.first(x)))


@pytest.mark.parametrize("form", FORMS)
def test_the_secant_of_one_relu_layer_is_the_exact_difference(form):
    """Moving the weights before one ReLU layer by a finite ``dw``, the secant derivative of the outputs is
    ``f(w + dw) − f(w)`` exactly; the derivative is not (units change sides).  A form the mode missed would give the
    derivative and fail."""
    torch.manual_seed(0)
    model = OneLayer(FORMS[form]).double()
    x = torch.randn(30, 3, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    move = {k: (0.5 * torch.randn_like(v) if k.startswith("first") else torch.zeros_like(v)) for k, v in params.items()}
    f = lambda p: functional_call(model, p, (x,))  # noqa: E731
    exact = f({k: params[k] + move[k] for k in params}) - f(params)
    with Secant() as mode:
        secant = jvp(f, (params,), (move,))[1]
    derivative = jvp(f, (params,), (move,))[1]
    assert float((secant - exact).norm() / exact.norm()) < 1e-12
    assert float((derivative - exact).norm() / exact.norm()) > 0.1
    assert not mode.uncovered


@pytest.mark.parametrize("pool", ["2x2", "3x3 stride 1 (overlapping)", "3x3 stride 2 padding 1"])
def test_the_secant_of_max_pooling_is_the_exact_difference(pool):
    """Through one max-pooling layer the secant is exact, for the outputs and for a gradient (a loss linear in the
    outputs, so that the routing of the windows is the only nonlinearity): windows whose largest input changes
    are followed; the derivative is not."""
    layer, size = {"2x2": (nn.MaxPool2d(2), 18), "3x3 stride 1 (overlapping)": (nn.MaxPool2d(3, stride=1), 32),
                   "3x3 stride 2 padding 1": (nn.MaxPool2d(3, stride=2, padding=1), 18)}[pool]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), layer, nn.Flatten(), nn.Linear(size, 2)).double()
    x = torch.randn(10, 1, 8, 8, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    move = {k: (0.5 * torch.randn_like(v) if k.startswith("0.") else torch.zeros_like(v)) for k, v in params.items()}
    moved = {k: params[k] + move[k] for k in params}
    f = lambda p: functional_call(model, p, (x,))  # noqa: E731
    g = lambda p: torch.func.grad(lambda q: f(q).sum())(p)["0.weight"]  # noqa: E731
    for fn in (f, g):
        exact = fn(moved) - fn(params)
        with Secant() as mode:
            secant = jvp(fn, (params,), (move,))[1]
        assert float((secant - exact).norm() / exact.norm()) < 1e-12
        assert float((jvp(fn, (params,), (move,))[1] - exact).norm() / exact.norm()) > 0.1
        assert not mode.uncovered
    with Secant():  # the values (and the gradient) are max-pooling's own
        assert torch.equal(f(params), functional_call(model, params, (x,)))
        assert torch.allclose(g(params), torch.func.grad(lambda q: functional_call(model, q, (x,)).sum())(params)[
            "0.weight"], rtol=0, atol=1e-12)


def relu_problem(seed=1):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)).double()
    x, y = torch.randn(60, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (60,), generator=g)
    xt, yt = torch.randn(100, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (100,), generator=g)
    return Problem(model, cross_entropy, (x, y), batch_size=30), (xt, yt)


def errors_against_retraining(problem, training, step):
    """Relative errors of the secant and of the plain tangent against the budget response (two retrainings) of
    moving points 1, 7, 9 by ``step`` along their loss gradient."""
    pert = gradient_perturbation(problem, [1, 7, 9], step)
    ref = training_response(problem, pert, training, floor_factor=0).shift
    return tuple(float((training_tangent(problem, pert, training, secant=s).shift - ref).norm() / ref.norm())
                 for s in (True, False))


def test_the_secant_tangent_follows_a_relu_networks_fine_tuning_where_the_tangent_misses():
    """Against the measured budget response (two fine-tuning runs), at steps where units change sides: the secant
    tangent within 5 % (measured 0.3–1.4 %), the plain tangent off by 70–90 %."""
    problem, _ = relu_problem()
    training = Training(steps=10, lr=0.3)
    for step in (0.003, 0.01, 0.03):
        secant, plain = errors_against_retraining(problem, training, step)
        assert secant < 0.05 and plain > 0.5


def test_the_secant_tangent_follows_a_max_pooling_cnns_fine_tuning():
    """Against two retrainings of a conv–max-pool–conv–ReLU network: the secant within 25 % (measured 2.5–16 %),
    the plain tangent off by more than 80 % (measured 89–98 %)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2), nn.Conv2d(4, 4, 2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16, 3)).double()
    x, y = torch.randn(40, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g)
    problem, training = Problem(model, cross_entropy, (x, y)), Training(steps=10, lr=0.1)
    for step in (0.003, 0.03):
        secant, plain = errors_against_retraining(problem, training, step)
        assert secant < 0.25 and plain > 0.8


def tanh_problem():
    """A small smooth (tanh) classifier in float64 and its inputs."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x, y = torch.randn(30, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (30,), generator=g)
    return Problem(model, cross_entropy, (x, y)), x


def test_on_a_smooth_network_the_secant_tangent_is_the_tangent():
    problem, _ = tanh_problem()
    pert = gradient_perturbation(problem, [1, 7], 0.03)
    plain, secant = (training_tangent(problem, pert, Training(steps=10, lr=0.3), secant=s) for s in (False, True))
    assert secant.method == "training-secant" and plain.method == "training-tangent"
    assert torch.allclose(secant.shift, plain.shift, rtol=1e-12, atol=0)
    assert torch.equal(secant.base, plain.base)


def test_the_ranges_noise_floor_is_measured_where_the_range_is():
    """On a smooth network the secant's change is linear in the step, so its "floor" at a 300× smaller step is just
    a smaller change.  Measured from a tangent 1000× above the range (as ``--step auto`` measures from 1 %), a floor
    at that tangent's step/300 would put every step of the range below it; measured at the range's top it leaves
    the steps inside at 300 × their share of that top."""
    problem, x = tanh_problem()
    tangent = training_tangent(problem, gradient_perturbation(problem, [1, 7], 0.01), Training(steps=10, lr=0.3),
                               order=2)
    x_eval = x[10:]
    plain = validity(tangent, x_eval)
    top = plain["threshold"] * plain["step_percent"] / plain["ratio"]  # the largest step the ratio lets inside
    far = tangent.scaled(1000 * top / plain["step_percent"])
    v = validity(far, x_eval, steps=(3 * top, top / 2, top / 10), secant=True)
    assert v["floor_step"] == pytest.approx(top, rel=1e-9)
    assert [p["step"] for p in v["curve"]] == pytest.approx([3 * top, top / 2])
    assert v["curve"][1]["above_floor"] == pytest.approx(150, rel=1e-2) and v["step_max"] == pytest.approx(top / 2)


def test_step_auto_measures_the_ranges_floor_once(monkeypatch):
    """``auto_step`` grades the range from the tangent it is given and again at the step it chooses; the range's
    floor is an absolute step's, so it is measured once, and the analysis is the one at the chosen step."""
    problem, x = tanh_problem()
    pert = gradient_perturbation(problem, [1, 7], 0.01)
    training = Training(steps=30, lr=1.0)  # the ratio lets steps up to 0.73 % inside
    tangent = training_tangent(problem, pert, training, order=2)
    measured = []
    secant_floor = setsens.analysis.secant_floor
    monkeypatch.setattr(setsens.analysis, "secant_floor",
                        lambda problem, pert, *args: measured.append(pert) or secant_floor(problem, pert, *args))
    auto = analyze_training(problem, pert, training, tangent=tangent, auto_step=True, secant=True)
    step = auto.validity["auto"]["step"]
    assert auto.validity["auto"]["inside"] and step == auto.validity["step_max"] < 1
    assert len(measured) == 2  # the range's floor, and the verdict's at the chosen step
    by_hand = analyze_training(problem, pert.scaled(step), training, tangent=tangent.scaled(step), secant=True)
    assert auto.validity["floor"] == pytest.approx(by_hand.validity["floor"], rel=1e-9)
    assert auto.validity["above_floor"] == pytest.approx(by_hand.validity["above_floor"], rel=1e-9)
    assert [p["step"] for p in auto.validity["curve"]] == [p["step"] for p in by_hand.validity["curve"]]


def test_the_secant_residual_shrinks_with_the_step_where_the_jump_ratio_does_not():
    problem, _ = relu_problem()
    tangent = training_tangent(problem, gradient_perturbation(problem, [1, 7, 9], 0.03), Training(steps=20, lr=0.1),
                               probes=5)
    residual = {f: secant_residual(tangent.scaled(f))["median"] for f in (3.0, 0.3)}
    assert 3 < residual[3.0] / residual[0.3] < 30 and residual[3.0] < 0.1  # O(step), measured 0.042 and 0.0064
    jump = {f: jump_ratio(tangent.scaled(f))["median"] for f in (3.0, 0.3)}
    assert min(jump.values()) > 1.0  # the derivative's error does not shrink: measured 1.5 and 1.3


def test_a_secant_tangent_refuses_what_does_not_apply_to_it():
    problem, _ = relu_problem()
    pert = gradient_perturbation(problem, [1], 0.01)
    secant = training_tangent(problem, pert, Training(steps=3, lr=0.1), secant=True)
    with pytest.raises(ValueError, match="holds for the perturbation it was computed at only"):
        secant.scaled(2.0)
    with pytest.raises(ValueError, match="no second derivative"):
        training_tangent(problem, pert, Training(steps=3, lr=0.1), secant=True, order=2)
    with pytest.raises(ValueError, match="plain tangent's second derivative"):
        validity(secant, problem.points(torch.arange(5))[0])


def test_the_secant_names_piecewise_linear_units_it_leaves_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveMaxPool2d(3), nn.ReLU6(), nn.Flatten(),
                          nn.Linear(18, 2)).double()
    x, y = torch.randn(8, 1, 8, 8, dtype=torch.float64), torch.randint(0, 2, (8,))
    problem = Problem(model, cross_entropy, (x, y))
    secant = training_tangent(problem, gradient_perturbation(problem, [1], 0.01), Training(steps=2, lr=0.1),
                              secant=True)
    assert secant.uncovered == ("adaptive_max_pool2d", "hardtanh")  # ReLU6 is a hardtanh
    assert secant.summary()["secant_uncovered"] == ["adaptive_max_pool2d", "hardtanh"]


def test_the_secant_verdict_passes_a_followed_run_and_flags_jumps_and_the_floor():
    """Flags that can come out either way, each confirmed by retraining: at 1 % over 10 steps the secant passes
    (Pearson > 0.99); at a 200 % move the secant misses most of a step (``secant_at_step``, Pearson 0.79); with an
    lr at the edge of stability a 1e-4 % move sends the run elsewhere (``bifurcation``: the change grows 1e5×
    faster than the step, Pearson 0.41); over 100 steps the fine-tuning's change at 1 % is at its floor
    (``above_floor`` fails, and the reference's own change is below 10× its floor)."""
    problem, test = relu_problem()
    pert = gradient_perturbation(problem, [1, 7, 9], 0.01)
    good = analyze(problem, pert, "training-secant", test=test, validate=True, training=Training(steps=10, lr=0.3))
    checks = {c.name: c.status for c in good.verdict.checks}
    assert good.method == "training-secant" and good.verdict.status == "pass", checks
    assert good.validation["pearson"] > 0.99 and good.validation["reference_stable"]
    assert good.validation["pearson"] > good.validation["influence_pearson"]
    assert good.validity["check"] == "secant" and good.validity["step_max"] > 0

    jump = analyze(problem, pert.scaled(0.01), "training-secant", test=test, validate=True,
                   training=Training(steps=25, lr=0.5))
    assert {c.name: c.status for c in jump.verdict.checks}["bifurcation"] == "fail"
    assert jump.verdict.status != "pass" and jump.validation["pearson"] < 0.9

    far = analyze(problem, pert.scaled(200), "training-secant", test=test, validate=True,
                  training=Training(steps=10, lr=0.3))  # a 200 % move: the secant misses 0.8 of a step's change
    assert {c.name: c.status for c in far.verdict.checks}["secant_at_step"] != "pass"
    assert far.verdict.status != "pass" and far.validation["pearson"] < 0.9

    floor = analyze(problem, pert, "training-secant", test=test, validate=True, training=Training(steps=100, lr=0.3))
    assert {c.name: c.status for c in floor.verdict.checks}["above_floor"] == "fail"
    assert not floor.validation["reference_stable"] and floor.validation["pearson"] < 0.9
