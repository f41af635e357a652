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
    for key in ("distance_ratio", "loss_reduction", "influence_distance_ratio"):  # distributions over seeds
        assert set(data[key]) == {"median", "min", "max", "per_seed"} and len(data[key]["per_seed"]) == 1
    assert data["distance_ratio"]["median"] > 0 and data["loss_reduction"]["median"] > 1
    assert data["set_vs_retraining"]["distance_to_set_over_distance_to_centre"] >= 0
    assert data["reference_change_when_tightened_100x"] < 0.05
    jac = data["output_jacobian"]  # 40 digits × 10 outputs, 64-32-10 has 2368 weights
    assert (jac["rows"], jac["p"]) == (400, 2368) and 0 < jac["rank"] <= 400
    assert jac["full_row_rank"] == (jac["rank"] == 400) and 0 < jac["sigma_ratio"] <= 1
    assert (tmp_path / "d" / "report.md").exists() and (tmp_path / "d" / "results.json").exists()


def test_demo_missing_parent(tmp_path):
    res = CliRunner().invoke(main, ["demo", "--quick", "--out", str(tmp_path / "no" / "such")])
    assert res.exit_code != 0 and "parent directory" in res.output and "Traceback" not in res.output


def test_demo_rejects_bad_widths(tmp_path):
    for widths in ("64,x,10", "32,32,10", "64,32,3"):
        res = CliRunner().invoke(main, ["demo", "--widths", widths, "--out", str(tmp_path / "d")])
        assert res.exit_code == 2 and "--widths" in res.output, res.output


def test_demo_rejects_bad_options_before_any_work(tmp_path):
    import time

    for args, hint in ((["--step", "0"], "--step"), (["--step", "-0.01"], "--step"), (["--points", "1000"], "--points"),
                       (["--seeds", "a,b"], "--seeds"), (["--seeds", "1,1"], "--seeds")):
        t0 = time.perf_counter()
        res = CliRunner().invoke(main, ["demo", *args, "--out", str(tmp_path / "d")])
        assert res.exit_code == 2 and hint in res.output, (args, res.output)
        assert time.perf_counter() - t0 < 5, args



def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    bad = str(tmp_path / "missing" / "out")
    res = CliRunner().invoke(main, ["toy", "--out", bad])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1 and "parent directory" in res.output and "--debug" in res.output
    res = CliRunner().invoke(main, ["--debug", "toy", "--out", bad])
    assert isinstance(res.exception, FileNotFoundError)
