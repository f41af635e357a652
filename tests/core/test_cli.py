"""The command line: the toy JSON and the quick demo run end to end."""

import json

from click.testing import CliRunner

from setsens.cli import main


def test_toy_json(tmp_path):
    res = CliRunner().invoke(main, ["toy", "--json", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output[res.output.index("{"):])
    assert abs(data["min_norm_shift"] - 0.178885) < 1e-6
    assert abs(data["risk_original"] - 0.4) < 1e-9 and abs(data["risk_min_norm"] - 0.012166) < 1e-6
    assert len(data["estimated_solutions"]) == 5 and all("risk" in e for e in data["estimated_solutions"])
    assert "influence_point" in data
    assert (tmp_path / "r" / "toy_figure2_sets.png").stat().st_size > 10_000


def test_demo_quick(tmp_path):
    res = CliRunner().invoke(main, ["demo", "--quick", "--json", "--out", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output[res.output.index("{\n"):])
    assert data["distance_ratio"] > 0 and data["loss_reduction"] > 1
    jac = data["output_jacobian"]  # 100 digits × 10 outputs, 64-32-10 has 2368 weights
    assert (jac["rows"], jac["p"]) == (1000, 2368) and 0 < jac["rank"] <= 1000
    assert jac["full_row_rank"] == (jac["rank"] == 1000) and 0 < jac["sigma_ratio"] <= 1
    assert (tmp_path / "d" / "report.md").exists() and (tmp_path / "d" / "results.json").exists()


def test_demo_missing_parent(tmp_path):
    res = CliRunner().invoke(main, ["demo", "--quick", "--out", str(tmp_path / "no" / "such")])
    assert res.exit_code != 0 and "parent directory" in str(res.exception)


def test_demo_rejects_bad_widths(tmp_path):
    for widths in ("64,x,10", "32,32,10", "64,32,3"):
        res = CliRunner().invoke(main, ["demo", "--widths", widths, "--out", str(tmp_path / "d")])
        assert res.exit_code == 2 and "--widths" in res.output, res.output


def test_demo_quick_two_corrector_steps(tmp_path):
    res = CliRunner().invoke(main, ["demo", "--quick", "--json", "--corrector-steps", "2", "--out", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "d" / "results.json").read_text())["digits"]
    assert len(data["corrector"]["selected"]) == 2
    # each validated step can only lower the perturbed risk (it keeps w when no member improves it)
    rows = data["rows"]
    assert rows["corrected"]["risk_perturbed_data"] <= rows["estimate"]["risk_perturbed_data"]
