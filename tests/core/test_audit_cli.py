"""`setsens audit` on a user's model file (not the demo network): default options end to end, the polish report,
warnings and ``--debug`` at the command line's edge, and every bad option refused in one line before any work."""

import json
import textwrap
import warnings

import numpy as np
import pytest
import torch
from cli_helpers import rejected
from click.testing import CliRunner

from setsens.cli import main

MODEL = textwrap.dedent("""
    import torch
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))

    def regression():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 8), nn.GELU(), nn.Linear(8, 1))
""")


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A LayerNorm/GELU classifier trained by AdamW (float32, not stationary), its data as an .npz (24 training and
    12 held-out points), and a regression model with real targets."""
    root = tmp_path_factory.mktemp("audit_user")
    (root / "net.py").write_text(MODEL)
    namespace = {}
    exec(MODEL, namespace)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(36, 5, generator=g)
    y = (x[:, :3] + 0.3 * torch.randn(36, 3, generator=g)).argmax(1)
    net = namespace["model"]()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x[:24]), y[:24]).backward()
        opt.step()
    torch.save(net.state_dict(), root / "net.pt")
    np.savez(root / "data.npz", x=x[:24].numpy(), y=y[:24].numpy(), x_test=x[24:].numpy(), y_test=y[24:].numpy())
    np.savez(root / "real.npz", x=x[:24].numpy(), y=x[:24, 0].numpy(), x_test=x[24:].numpy(), y_test=x[24:, 0].numpy())
    return root


def _args(user, *extra):
    return ["audit", "--model", str(user / "net.py:model"), "--checkpoint", str(user / "net.pt"), "--data",
            str(user / "data.npz"), *map(str, extra)]


def test_default_options_on_a_model_file(user, tmp_path):
    """Once a KeyError ('max_relative_error_vs_individual'): the report read a --check figure that the default
    queries (100) do not measure.  The NotStationaryWarning reaches the user once, as one line."""
    before = warnings.showwarning, list(warnings.filters)
    res = CliRunner().invoke(main, _args(user, "--out", tmp_path / "a"))
    assert res.exit_code == 0, res.output
    assert (warnings.showwarning, list(warnings.filters)) == before  # the command line's edge only
    assert "100 queries in" in res.output and "individual solves" not in res.output
    assert "× one estimate (" in res.output  # queries asked for: the scan in units of one estimate
    warned = [line for line in res.stderr.splitlines() if "NotStationaryWarning" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: NotStationaryWarning: w̄ is not a stationary point")
    assert "stationarity = problem" not in res.stderr  # no source line
    summary = json.loads((tmp_path / "a" / "results.json").read_text())
    assert summary["queries"]["count"] == 100 and "max_relative_error_vs_individual" not in summary["queries"]
    assert summary["polish"] is None and len(summary["scan"]["ranking"]) == 20


def test_where_the_gram_matrix_does_not_fit_the_audit_sketches_it_says_so_and_refines_the_top(user, tmp_path,
                                                                                                monkeypatch):
    """The plan is forced to the sketch (as a Gram matrix too large for memory would force it): the log and the report
    name the path, and the refined top points' κ are the exact scan's.  In float64: in float32 the refinement's
    products carry ε₃₂, and on this small ill-conditioned Gram matrix its rises stalled at that level without shrinking
    on some thread counts (the round then not taken, as a non-converging one is)."""
    import setsens.audit
    import setsens.gram

    exact = CliRunner().invoke(main, _args(user, "--queries", "0", "--dtype", "float64", "--out", tmp_path / "e"))
    assert exact.exit_code == 0, exact.output
    # no queries, no unit of cost: one estimate is not solved (on ResNet-56 it took 50× the scan)
    assert "one estimate" not in exact.output
    assert json.loads((tmp_path / "e" / "results.json").read_text())["one_estimate_seconds"] is None
    real = setsens.gram.plan
    sketch = lambda n, k, p, itemsize, memory="auto", path="auto", rank=1000: real(  # noqa: E731
        n, k, p, itemsize, memory, "nystrom", 24)
    monkeypatch.setattr(setsens.gram, "plan", sketch)
    monkeypatch.setattr(setsens.audit, "plan", sketch)
    res = CliRunner().invoke(main, _args(user, "--queries", "0", "--dtype", "float64", "--out", tmp_path / "s"))
    assert res.exit_code == 0, res.output
    assert "nystrom: the exact Gram matrix does not fit: a rank-24 Nyström sketch" in res.output
    summary = json.loads((tmp_path / "s" / "results.json").read_text())["scan"]
    reference = json.loads((tmp_path / "e" / "results.json").read_text())["scan"]
    assert summary["factor"]["path"] == "nystrom" and reference["factor"]["path"] == "dense"
    assert summary["exact_points"] == 24 and summary["refine_error"] <= setsens.gram.REFINE_TOL
    assert summary["ranking"][:5] == reference["ranking"][:5]
    # CG to an estimated κ error of REFINE_TOL = 1 %
    assert summary["kappa_top"][:5] == pytest.approx(reference["kappa_top"][:5], rel=1e-2)
    assert "approximate: a rank-24 Nyström sketch of GGᵀ; κ refined for the 24 points" in (
        tmp_path / "s" / "report.md").read_text()


def test_the_polish_reports_how_far_it_moved_the_model(user, tmp_path):
    res = CliRunner().invoke(main, _args(user, "--polish", "200", "--queries", "0", "--json", "--out", tmp_path / "p"))
    assert res.exit_code == 0, res.output
    polish = json.loads(res.stdout)["polish"]
    assert polish["relative_move"] == pytest.approx(polish["weights_moved"] / polish["weights_norm"])
    assert polish["risk_after"] < polish["risk_before"] and polish["grad_norm_after"] < polish["grad_norm_before"]
    held = polish["held_out"]
    assert set(held) == {"loss_before", "loss_after", "accuracy_before", "accuracy_after"}
    assert 0 <= held["accuracy_after"] <= 1
    warned = "warning: the polish moved w̄ by" in res.stderr
    assert warned == (polish["relative_move"] > 0.1), (polish, res.stderr)
    assert "of ‖w̄‖" in (tmp_path / "p" / "report.md").read_text()


def test_analyze_reports_the_polish_too(user, tmp_path):
    res = CliRunner().invoke(main, ["analyze", *_args(user)[1:], "--polish", "50", "--method", "gauss-newton",
                                    "--members", "0", "--json", "--out", str(tmp_path / "an")])
    assert res.exit_code == 0, res.output
    polish = json.loads(res.stdout[res.stdout.index("{"):])["polish"]
    assert {"relative_move", "weights_norm", "risk_before", "risk_after", "held_out"} <= set(polish)
    assert "of ‖w̄‖" in (tmp_path / "an" / "report.md").read_text()


def test_every_subcommand_takes_debug():
    from setsens.experiments import NAMES

    for name in NAMES:
        res = CliRunner().invoke(main, [name, "--debug", "--help"])
        assert res.exit_code == 0 and "--debug" in res.output, (name, res.output)


def test_debug_is_accepted_after_the_subcommand(user, tmp_path):
    bad = ["--points", "99", "--attack", "1", "--out", tmp_path / "d"]
    one_line = CliRunner().invoke(main, _args(user, *bad))
    assert one_line.exit_code == 2 and "there are 24" in one_line.output
    missing = tmp_path / "missing" / "out"
    for args in (["--debug", "toy", "--out", missing], ["toy", "--out", missing, "--debug"]):
        res = CliRunner().invoke(main, list(map(str, args)))
        assert isinstance(res.exception, FileNotFoundError), (args, res.output)


def _bad(user):
    m, c, d, real = str(user / "net.py:model"), str(user / "net.pt"), str(user / "data.npz"), str(user / "real.npz")
    model = ["--model", m, "--checkpoint", c, "--data", d]
    return [
        (["--queries", "-1"], "--queries"),
        (["--top", "0"], "--top"),
        (["--step", "0"], "--step"),
        (["--step", "101"], "--step"),
        (["--attack", "-1"], "--attack"),
        (["--attack", "1", "--budget", "0"], "--budget"),
        (["--attack", "1", "--budget", "150"], "--budget"),
        (["--attack", "1", "--budget", "x"], "--budget"),
        (["--attack", "1", "--budget", ""], "--budget"),
        (["--attack", "1", "--points", "0"], "--points"),
        (["--attack", "1", "--stages", "0"], "--stages"),
        (["--certify", "--delta", "x"], "--delta"),
        (["--certify", "--delta", "-1"], "--delta"),
        (["--certify", "--delta", "nan"], "--delta"),
        (["--certify", "--delta", "200"], "--delta"),
        (["--certify", "--certify-checks", "-1"], "--certify-checks"),
        (["--seed", "-1"], "--seed"),
        (["--budget", "5"], "--budget"),                     # attack options without --attack
        (["--stages", "2"], "--stages"),
        (["--points", "3"], "--points"),
        (["--delta", "1"], "--delta"),                       # certificate options without --certify
        (["--certify-checks", "2"], "--certify-checks"),
        (["--retrain-steps", "50"], "--retrain-steps"),      # the reference's budget without anything it judges
        (["--attack", "1", "--retrain-steps", "1"], "--retrain-steps"),
        (["--response", "set"], "--response"),               # the attack's response without --attack
        (["--attack", "1", "--response", "budget"], "--response"),  # the demo fits a squared error
        (["--attack", "1", "--response", "x"], "--response"),
        (["--weight-decay", "1e-3"], "--weight-decay"),
        (["--data", d], "--data"),                           # a user's model options without --model: the demo
        (["--loss", "squared_error"], "--loss"),
        (["--polish", "10"], "--polish"),
        (["--dtype", "float64"], "--dtype"),
        (["--dtype", "float16"], "--dtype"),
        (["--top", "101"], "--top"),                         # the demo network has 100 points
        (["--model", m], "--data"),
        ([*model, "--top", "25"], "--top"),
        ([*model, "--attack", "1", "--points", "25"], "--points"),
        ([*model, "--attack", "13"], "--attack"),            # 12 held-out points
        ([*model, "--device", "nowhere"], "--device"),
        ([*model, "--batch-size", "0"], "--batch-size"),
        ([*model, "--polish", "-1"], "--polish"),
        (["--model", "nowhere.py:model", "--data", d], "does not exist"),
        (["--model", m, "--checkpoint", str(user / "none.pt"), "--data", d], "does not exist"),
        (["--model", m, "--data", str(user / "none.npz")], "does not exist"),
        (["--model", m, "--data", real], "--loss squared_error"),
        (["--model", str(user / "net.py:regression"), "--data", real, "--loss", "squared_error", "--attack", "1"],
         "needs a classifier"),
        (["--model", str(user / "net.py:regression"), "--data", real, "--loss", "squared_error", "--certify"],
         "needs a classifier"),
    ]


def test_bad_options_are_refused_in_one_line_before_any_work(user, tmp_path):
    for i, (args, hint) in enumerate(_bad(user)):
        out = tmp_path / f"r{i}"
        rejected(["audit", *args, "--out", str(out)], hint, out=out)
    rejected(["audit", "--out", str(tmp_path / "missing" / "out")], "parent directory")


def test_the_report_names_the_points_a_sketch_scan_did_not_refine():
    from setsens.experiments.audit import _sketch_note

    scan = {"factor": {"path": "nystrom", "sketch_rank": 500}, "exact_points": 110, "refine_error": 0.004,
            "unresolved": []}
    assert "κ refined for the 110 points" in _sketch_note(scan) and "not refined" not in _sketch_note(scan)
    scan["unresolved"] = [7, 41]
    assert "2 more may belong to the top but were not refined: [7, 41]" in _sketch_note(scan)
    assert "did not converge" in _sketch_note({**scan, "exact_points": 0})
    assert _sketch_note({**scan, "factor": {"path": "streamed"}}) == ""


def test_one_budget_draws_every_target(tmp_path):
    """With one budget the attack figure shows each target's margin before and after (no one-point curves)."""
    from setsens.experiments.audit import _attack_figure

    rows = [{"target": t, "start": 3.0 + t, "attack": -1.0, "random": 2.0, "loss-gradient": 1.0} for t in range(4)]
    budget = {"budget": 0.1, "flip_rate": 1.0, "baseline_flip_rate": {"random": 0.0, "loss-gradient": 0.25},
              "targets": rows}
    assert _attack_figure({"response": "budget", "budgets": [budget]}, tmp_path) == "attack.png"
    assert (tmp_path / "attack.png").stat().st_size > 10_000


def test_the_reference_record_says_when_the_budget_still_matters():
    """The audit's retraining record counts a budget response as stable only where halving its budget moved it by
    ≤ 10 %: after 2 steps it is not (the run is still moving), after 5000 it is, on the same problem and move."""
    from problems import fitted_problem

    from setsens.experiments.audit import _Retrainer
    from setsens.perturb import gradient_perturbation
    from setsens.problem import cross_entropy

    problem = fitted_problem(cross_entropy, k=3)  # judged by the budget response, not Levenberg–Marquardt
    pert = gradient_perturbation(problem, [1], 0.01)
    for steps, stable in ((2, 0.0), (5000, 1.0)):
        judge = _Retrainer(problem, steps)
        judge(pert)
        record = judge.record()
        assert record["change_when_halved"]["stable_fraction"] == stable, record
        assert f"{steps} steps of SGD" in record["reference"]


def test_what_follows_the_reference_runs_at_its_lr():
    """The attack and the certificate take the reference's training before any retraining; the reference halves
    its lr after a diverged run, so that training must already carry the lr the runs it will judge converge at.
    Here (as on ResNet-56) the clean run converges at a larger lr than a perturbed one (12.5 against 3.125 from a
    100× too large lr): settled on the clean run alone, the attack followed 12.5 while its judge ran at 3.125 —
    once the first ResNet target of every seed.  Settled on a probe as large as the judged moves, they agree."""
    from problems import fitted_problem

    from setsens.experiments.audit import _Retrainer
    from setsens.perturb import gradient_perturbation
    from setsens.problem import cross_entropy

    problem = fitted_problem(cross_entropy, k=3)
    judge = _Retrainer(problem, 200)
    judge.lr = 100.0
    training = judge.training(gradient_perturbation(problem, [1, 2], 0.3))
    assert training.lr < 12.5 and judge.clean_runs[(training.lr, 200, 0.9)]  # below the clean run's own lr
    judge(gradient_perturbation(problem, [0, 1], 0.1))  # a judged move: no further halving
    assert judge.lr == training.lr and judge.training().lr == training.lr
    assert 2 ** judge.record()["lr_halvings"] == 100.0 / judge.lr  # every halving counted


def test_a_resumed_attack_keeps_its_reference_record(user, tmp_path):
    """Rerun into the same --out, every target comes from the cache: the record still says how much the reference's
    runs moved when their budget was halved and the lr it ended at (once lost on a resumed ResNet-56 run).  Here the
    probe's run converged at 1/λ_max(H) = 0.915 and the attack's moves did not: every target is attacked and judged
    again at the smaller lr, so all follow and are judged at one (on ResNet-56, 11 of 30 targets were not)."""
    args = _args(user, "--queries", 0, "--attack", 2, "--budget", 10, "--stages", 1, "--attack-steps", 1,
                 "--retrain-steps", 20, "--out", tmp_path / "a")
    records = []
    for _ in range(2):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output
        records.append(json.loads((tmp_path / "a" / "results.json").read_text()))
    first, resumed = records
    assert resumed["retraining"] == first["retraining"] and first["retraining"]["change_when_halved"]["runs"] > 0
    assert resumed["attack"] == first["attack"]
    # here the attack's moves diverged where the probe's did not: every target again at the smaller lr
    assert first["attack"]["passes"] > 1 and first["retraining"]["lr"] < 0.9152
    assert f"{first['attack']['passes']} passes: a retraining diverged" in (tmp_path / "a" / "report.md").read_text()
    assert {row["lr"] for row in first["attack"]["budgets"][0]["targets"]} == {first["retraining"]["lr"]}
    # a pass stops at the target whose retraining halved the lr (here the first or the second): not all are cached
    cached = [p.name for p in (tmp_path / "a").glob("state/*/attack-*.pt")]
    assert len(cached) < 2 * first["attack"]["passes"], cached


def test_the_report_says_when_the_predicted_drop_is_out_of_range():
    """The attack's report flags a predicted drop more than 10× off the measured one (medians), and only then: not
    at 3× either way, nor where nothing dropped (no ratio)."""
    from setsens.experiments.audit import _size_verdict

    def verdict(predicted, measured):
        return _size_verdict({"predicted_drop_median": predicted, "margin_drop": {"attack": {"median": measured}}})

    assert "outside its range" in verdict(4500.0, 6.0) and "7.5e+02×" in verdict(4500.0, 6.0)
    assert "outside its range" in verdict(0.05, 6.0)
    assert verdict(18.0, 6.0) == verdict(2.0, 6.0) == verdict(5.0, 0.0) == verdict(5.0, -1.0) == ""


def test_the_certificate_is_made_again_when_a_check_halves_the_lr(user, tmp_path):
    """The first-order certificate follows the training its judge runs.  Here the probe's run converged at
    1/λ_max(H) = 0.915 and the checks' attacks did not: the certificates and every check are made again at the
    smaller lr, so the certificate, its checks and their judge run at one lr (once computed at the previous one)."""
    args = _args(user, "--queries", 0, "--certify", "--delta", 10, "--certify-checks", 1, "--stages", 1,
                 "--attack-steps", 1, "--retrain-steps", 20, "--out", tmp_path / "a")
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "a" / "results.json").read_text())
    cert, lr = out["certificate"], out["retraining"]["lr"]
    assert cert["passes"] > 1 and lr < 0.9152
    assert f"{cert['passes']} passes: a check's retraining diverged" in (tmp_path / "a" / "report.md").read_text()
    checks = sorted(p.name for p in (tmp_path / "a").glob("state/*/certify-*.pt"))
    final = [name for name in checks if name.endswith(f"-lr{lr:.6g}.pt")]
    assert len(final) == 2 and len(checks) < 2 * cert["passes"], checks  # a stale pass stops at its halving
