import json

import pytest

from click.testing import CliRunner

from setsens.cli import main


def _strict(constant):
    raise AssertionError(f"non-standard JSON constant {constant}")


@pytest.mark.parametrize("solver", ["gauss-newton", "minres"])
def test_resnet_quick_cli_and_landscape(tiny_run_files, tmp_path, solver):
    ckpt, npz, _ = tiny_run_files
    out = tmp_path / "run"
    args = ["resnet", "--quick", "--solver", solver, "--json", "--no-progress", "--depth", "8", "--checkpoint", str(ckpt), "--data", str(npz),
            "--n", "8", "--maxiter", "3", "--scenarios", "1", "--seeds", "2", "--seed-points", "2", "--grid", "2",
            "--retrain-iter", "1", "--n-test", "6", "--recycle", "2", "--out", str(out)]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    r = json.loads(res.output.strip().splitlines()[-1], parse_constant=_strict)  # standard JSON: no NaN/Infinity
    for key in ("loss_original", "loss_estimated", "loss_reduction", "increase_removed", "feasibility_residual",
                "hvp_count", "seconds"):
        assert key in r, key
    assert r["solver"] == solver and r["iterations"] == 3 and r["loss_original"] > 0
    assert r["hvp_count"] == (3 if solver == "minres" else 0) and r["cost_in_hvps"] > 0
    assert len(r["table3"]) == 4 and len(r["table2"]) == 1 and len(r["seeds"]["runs"]) == 2
    t2 = r["table2"][0]  # compared with the perturbation-induced retrained shift, at its own calibrated step
    assert t2["rel_retrained_shift"] > 0 and t2["step_percent"] > 0 and "grad_norm" in r["retrain_unperturbed"]
    # the estimate is a genuine descent on the perturbed points at this tiny scale
    assert r["loss_estimated"] < r["loss_original"]
    for f in ("config.json", "results.json", "report.md", "landscape_contour.png", "landscape_surface.png"):
        assert (out / f).is_file(), f
    # re-running resumes from the cached solves: no new Hessian products for the solves
    res2 = CliRunner().invoke(main, args, catch_exceptions=False)
    r2 = json.loads(res2.output.strip().splitlines()[-1])
    assert r2["loss_estimated"] == r["loss_estimated"] and r2["hvp_count_total"] < r["hvp_count_total"]
    res3 = CliRunner().invoke(main, ["landscape", "--run", str(out), "--grid", "2", "--no-progress", "--out", str(tmp_path / "ls")])
    assert res3.exit_code == 0, res3.output
    assert (tmp_path / "ls" / "landscape_contour.png").is_file()


def test_resnet_cli_bad_paths(tmp_path):
    res = CliRunner().invoke(main, ["resnet", "--checkpoint", str(tmp_path / "none.th"), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "checkpoint not found" in res.output
    res = CliRunner().invoke(main, ["landscape", "--run", str(tmp_path)])
    assert res.exit_code != 0 and "config.json" in res.output


def test_cached_results_are_keyed_by_settings():
    from dataclasses import replace

    from setsens.experiments.resnet import UNCACHED, ResnetConfig
    from setsens.experiments.state import settings_key

    cfg = ResnetConfig()
    key = settings_key(cfg, UNCACHED)
    assert key == settings_key(replace(cfg, threads=2, grid=5), UNCACHED)  # do not change a result
    for change in ({"maxiter": 51}, {"solver": "minres"}, {"n": 500}, {"step": 0.5}, {"dtype": "float64"}):
        assert settings_key(replace(cfg, **change), UNCACHED) != key, change


def test_resnet_bad_inputs_fail_fast_with_one_line(tmp_path):
    import time

    from problems import CKPT, NPZ as DATA

    empty = tmp_path / "empty.th"
    empty.write_bytes(b"")
    not_npz = tmp_path / "x.npz"
    not_npz.write_text("hello")
    cases = [(["--depth", "57"], "--depth"), (["--depth", "20"], "--checkpoint"), (["--checkpoint", str(empty)], "--checkpoint"),
             (["--data", str(not_npz)], "--data"), (["--n", "5000"], "--n")]
    for args, hint in cases:
        t0 = time.perf_counter()
        res = CliRunner().invoke(main, ["resnet", "--checkpoint", str(CKPT), "--data", str(DATA), *args,
                                        "--out", str(tmp_path / "o")])
        assert res.exit_code == 2 and hint in res.output and "Traceback" not in res.output, (args, res.output)
        assert time.perf_counter() - t0 < 30


def test_killed_run_resumes_to_the_same_result(tiny_run_files, tmp_path):
    """SIGKILL a run at a random point, rerun it into the same --out: the final JSON equals an
    uninterrupted run's (timings and product counts aside)."""
    import random

    from cli_helpers import killed_and_resumed

    ckpt, npz, _ = tiny_run_files
    args = ["resnet", "--quick", "--json", "--no-progress", "--depth", "8", "--checkpoint", str(ckpt), "--data", str(npz),
            "--n", "8", "--maxiter", "4", "--scenarios", "1", "--seeds", "2", "--seed-points", "2", "--grid", "2",
            "--retrain-iter", "2", "--n-test", "6", "--recycle", "2", "--threads", "1"]
    fraction = random.Random().uniform(0.3, 0.9)
    whole, resumed, _ = killed_and_resumed(args, tmp_path, "results.json",
                                           lambda out, elapsed, duration: elapsed >= fraction * duration)
    assert whole.keys() == resumed.keys()
    assert {k: v for k, v in whole.items() if v != resumed[k]} == {}


def _break_run(run, case, tmp_path):
    """Spoil a valid `setsens resnet` run directory the way ``case`` names."""
    cfg_file = run / "config.json"
    cfg = json.loads(cfg_file.read_text())
    if case == "no config":
        cfg_file.unlink()
    elif case == "config not JSON":
        cfg_file.write_text("{depth: 8")
    elif case == "config of another command":
        cfg_file.write_text(json.dumps({"points": 300, "width": 32}))
    elif case == "no estimates":
        for f in (run / "state").glob("estimate_*"):
            f.unlink()
    elif case in ("checkpoint gone", "depth mismatch", "data not npz"):
        key, value = {"checkpoint gone": ("checkpoint", str(tmp_path / "gone.th")), "depth mismatch": ("depth", 20),
                      "data not npz": ("data", str(cfg_file))}[case]
        cfg_file.write_text(json.dumps(cfg | {key: value}))


@pytest.mark.parametrize("args, case, hint", [
    (["--grid", "1"], None, "--grid"),
    (["--range", "1"], None, "--range"),
    (["--range", "1,0"], None, "--range"),
    (["--range", "a,b"], None, "--range"),
    (["--n", "0"], None, "--n"),
    (["--n", "100"], None, "--n"),
    (["--seed", "-1"], None, "--seed"),
    (["--plane", "random"], None, "--plane"),
    ([], "no config", "--run"),
    ([], "config not JSON", "--run"),
    ([], "config of another command", "--run"),
    ([], "no estimates", "--run"),
    ([], "checkpoint gone", "--run"),
    ([], "depth mismatch", "--run"),
    ([], "data not npz", "--run"),
    (["--out", "{tmp}/missing/ls"], None, "parent directory"),
])
def test_landscape_bad_options_are_refused_before_any_work(tiny_run_files, tmp_path, args, case, hint):
    from dataclasses import asdict

    from cli_helpers import rejected

    from setsens.experiments.resnet import ResnetConfig

    ckpt, npz, _ = tiny_run_files
    run = tmp_path / "run"
    (run / "state").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(asdict(ResnetConfig(depth=8, checkpoint=str(ckpt), data=str(npz), n=8))))
    (run / "state" / "estimate_seed_0.pt").write_bytes(b"")  # read only after the checks
    _break_run(run, case, tmp_path)
    out = tmp_path / "ls"
    args = [a.format(tmp=tmp_path) for a in args]
    rejected(["landscape", "--run", str(run), "--out", str(out), *args], hint, out=out)
