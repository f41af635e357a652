"""The ``setsens weights`` command end to end (``--quick``) and its input errors."""

import json
import random

import numpy as np
import pytest
from cli_helpers import cached, killed_and_resumed, rejected
from click.testing import CliRunner

from setsens.cli import main


def test_quick_run_writes_report(tmp_path):
    out = tmp_path / "rep"
    r = CliRunner().invoke(main, ["weights", "--quick", "--json", "--out", str(out), "--seed", "1"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    for key in ("standard", "robust"):
        for field in ("clean_accuracy", "certified_accuracy", "attacked_accuracy"):
            assert field in summary[key]
        for b in ("0.0", "0.01"):
            c, a = summary[key]["certified_accuracy"][b], summary[key]["attacked_accuracy"][b]
            assert 0 <= c <= a <= summary[key]["clean_accuracy"] + 1e-12
        assert summary[key]["certified_accuracy"]["0.0"] <= summary[key]["clean_accuracy"]
    for name in ("results.json", "report.md", "accuracy_vs_budget.png"):
        assert (out / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "| lam |" in report and "| attack_steps |" in report and "violations" in report
    results = json.loads((out / "results.json").read_text())
    for r_ in results["models"]["robust"]["budgets"]:
        for v in r_.get("soundness_tightness", {}).values():
            assert v["violations"] == 0


@pytest.mark.parametrize("args, hint", [
    (["--seed", "-1"], "--seed"),
    (["--budgets", "0,-1"], "--budgets"),
    (["--budgets", "a"], "--budgets"),
    (["--budgets", ""], "--budgets"),
    (["--budgets", "nan"], "--budgets"),
    (["--lam", "-1"], "--lam"),
    (["--mu", "-1"], "--mu"),
    (["--grid-lams", "-0.1"], "--grid-lams"),
    (["--grid-mus", "x"], "--grid-mus"),
    (["--train-budget", "-0.01"], "--train-budget"),
    (["--epochs", "0"], "--epochs"),
    (["--hidden", "a,b"], "--hidden"),
    (["--hidden", "16,0"], "--hidden"),
    (["--hidden", ""], "--hidden"),
    (["--lr", "0"], "--lr"),
    (["--batch-size", "0"], "--batch-size"),
    (["--attack-steps", "0"], "--attack-steps"),
    (["--attack-restarts", "0"], "--attack-restarts"),
    (["--attack-targets", "0"], "--attack-targets"),
    (["--weight-attack-points", "-1"], "--weight-attack-points"),
    (["--weight-attack-steps", "0"], "--weight-attack-steps"),
    (["--random-samples", "0"], "--random-samples"),
    (["--gamma-rel", "0"], "--gamma-rel"),
    (["--variant", "hinge2"], "--variant"),
    (["--activation", "tanh"], "--activation"),
    (["--dataset", "cifar10", "--data", "{missing}"], "--data"),
    (["--dataset", "cifar10", "--data", "{not_npz}"], "--data"),
    (["--dataset", "cifar10", "--data", "{no_test}"], "--data"),
])
def test_bad_options_are_refused_before_any_work(tmp_path, args, hint):
    not_npz, no_test = tmp_path / "x.npz", tmp_path / "train_only.npz"
    not_npz.write_text("hello")
    np.savez(no_test, train_x=np.zeros((2, 32, 32, 3), np.uint8), train_y=np.zeros(2, np.int64))
    files = {"missing": tmp_path / "no.npz", "not_npz": not_npz, "no_test": no_test}
    out = tmp_path / "r"
    rejected(["weights", *(a.format(**files) for a in args), "--out", str(out)], hint, out=out)


def test_missing_output_parent_is_one_line(tmp_path):
    rejected(["weights", "--quick", "--out", str(tmp_path / "missing" / "rep")], "parent directory")


def test_killed_training_resumes_to_the_same_result(tmp_path):
    """SIGKILL the training (the longest step) at a random epoch of a random model, rerun into the
    same --out: the final JSON equals an uninterrupted run's (timings aside)."""
    rng = random.Random()
    model, epoch = rng.choice(["standard", "robust"]), rng.randint(1, 19)

    def kill_when(out, elapsed, whole):
        saved = cached(out, f"train-{model}")
        return saved is not None and saved["epoch"] >= epoch

    whole, resumed, log = killed_and_resumed(["weights", "--quick", "--epochs", "20", "--json"], tmp_path,
                                             "results.json", kill_when)
    assert f"{model}: training resumes" in log, log
    assert whole.keys() == resumed.keys() and any("/models/robust/" in k for k in whole)
    assert {k: v for k, v in whole.items() if v != resumed[k]} == {}
