"""The ``setsens weights`` command end to end (``--quick``) and its input errors."""

import json

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


def test_errors(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["weights", "--quick", "--out", str(tmp_path / "missing" / "rep")])
    assert r.exit_code != 0 and "parent" in r.output
    r = runner.invoke(main, ["weights", "--dataset", "cifar10", "--data", str(tmp_path / "no.npz"),
                             "--out", str(tmp_path / "r")])
    assert r.exit_code != 0 and "not found" in r.output
    r = runner.invoke(main, ["weights", "--quick", "--budgets", "0,-1", "--out", str(tmp_path / "r")])
    assert r.exit_code != 0 and "budgets" in r.output
    r = runner.invoke(main, ["weights", "--quick", "--hidden", "a,b", "--out", str(tmp_path / "r")])
    assert r.exit_code != 0 and "hidden" in r.output
