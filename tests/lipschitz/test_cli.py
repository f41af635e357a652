"""``setsens lipschitz``: bad options are refused before any work; a killed sweep resumes."""

import random

import pytest
from cli_helpers import cached, killed_and_resumed, rejected


@pytest.mark.parametrize("args, hint", [
    (["--depth", "0"], "--depth"),
    (["--points", "5"], "--points"),
    (["--points", "2000"], "--points"),
    (["--width", "0"], "--width"),
    (["--width", "200"], "--width/--depth"),  # 54 800 weights: the dense modulus would need ~100 GB
    (["--depth", "9", "--width", "40"], "--width/--depth"),
    (["--directions", "0"], "--directions"),
    (["--tau", "0"], "--tau"),
    (["--tau", "2"], "--tau"),
    (["--steps", "abc"], "--steps"),
    (["--steps", ""], "--steps"),
    (["--steps", "0"], "--steps"),
    (["--steps", "1e-3,-1e-3"], "--steps"),
    (["--steps", "nan"], "--steps"),
    (["--worst-steps", "0"], "--worst-steps"),
    (["--seed", "-1"], "--seed"),
    (["--seeds", "a,b"], "--seeds"),
    (["--seeds", "1,1"], "--seeds"),
    (["--retrain-iter", "0"], "--retrain-iter"),
    (["--retrain-floor", "-0.1"], "--retrain-floor"),
    (["--adam-steps", "-1"], "--adam-steps"),
    (["--threads", "-1"], "--threads"),
    (["--scale", "half"], "--scale"),
    (["--retrain", "sgd"], "--retrain"),
])
def test_bad_options_are_refused_before_any_work(tmp_path, args, hint):
    out = tmp_path / "l"
    rejected(["lipschitz", *args, "--out", str(out)], hint, out=out)


def test_missing_output_parent_is_one_line(tmp_path):
    rejected(["lipschitz", "--quick", "--out", str(tmp_path / "no" / "l")], "parent directory")


def test_killed_sweep_resumes_to_the_same_result(tmp_path):
    """SIGKILL the retraining sweep (the longest step; L-BFGS as in the default) after a random
    number of its 10 retrainings, rerun into the same --out: the final JSON equals an uninterrupted
    run's."""
    done = random.Random().randint(1, 9)

    def kill_when(out, elapsed, whole):
        saved = cached(out, "retrainings")
        return saved is not None and len(saved["records"]) >= done

    args = ["lipschitz", "--quick", "--width", "12", "--directions", "8", "--retrain", "lbfgs", "--retrain-iter", "300",
            "--json", "--no-progress", "--threads", "1"]
    whole, resumed, log = killed_and_resumed(args, tmp_path, "lipschitz.json", kill_when)
    assert "retrainings cached" in log, log
    assert whole.keys() == resumed.keys() and any("/empirical/" in k for k in whole)
    assert {k: v for k, v in whole.items() if v != resumed[k]} == {}


def test_notice_states_the_duration_and_the_short_option_before_any_work(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from setsens.cli import main
    from setsens.experiments import lipschitz as exp

    def no_work(*args, **kwargs):
        raise RuntimeError("work started")

    monkeypatch.setattr(exp, "run", no_work)
    res = CliRunner().invoke(main, ["lipschitz", "--out", str(tmp_path / "l")])
    notice, error = res.output.splitlines()[0], res.output.splitlines()[-1]
    assert "work started" in error and "min on 2 CPU cores" in notice and "--quick" in notice
    minutes = float(notice.split("about ")[1].split(" min")[0])
    assert minutes == round(exp.expected_minutes(exp.LipschitzConfig())) and minutes <= 10
