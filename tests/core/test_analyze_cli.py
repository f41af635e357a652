"""`setsens analyze` on a user's model file: a report end to end, and one-line errors for bad input."""

import json
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from setsens.cli import main

MODEL = textwrap.dedent("""
    import torch
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def relu_model():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(4, 16, bias=False), nn.ReLU(), nn.Linear(16, 3, bias=False))

    def not_a_module():
        return 42

    def data():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(40, 4, generator=g)
        y = x[:, :3].argmax(1)
        return x[:30], y[:30], x[30:], y[30:]
""")


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A model file, a trained checkpoint (Adam, float32) and the same data as an .npz."""
    root = tmp_path_factory.mktemp("user")
    (root / "net.py").write_text(MODEL)
    sys.path.insert(0, str(root))
    import net

    sys.path.remove(str(root))
    m = net.model()
    x, y, xt, yt = net.data()
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    torch.save({"state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}}, root / "ckpt.pt")
    np.savez(root / "data.npz", x=x.numpy(), y=y.numpy(), x_test=xt.numpy(), y_test=yt.numpy())
    return root


def run(args):
    return CliRunner().invoke(main, ["analyze", *map(str, args)])


def test_a_report_from_a_model_file_checkpoint_and_npz(user, tmp_path):
    res = run(["--model", user / "net.py:model", "--checkpoint", user / "ckpt.pt", "--data", user / "data.npz",
               "--points", "1,5", "--validate", "--steps", "200", "--members", "3", "--json", "--out", tmp_path / "r"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["verdict"]["status"] in ("pass", "warn", "fail")
    assert all(set(c) == {"name", "status", "value", "advice"} for c in summary["verdict"]["checks"])
    assert summary["method"] == "hessian"  # auto, cross-entropy
    assert set(summary["loss_on_points"]) >= {"original", "estimate"}
    assert set(summary["validation"]) >= {"reference", "pearson", "relative_error", "influence_pearson"}
    assert summary["perturbation"]["indices"] == [1, 5]
    assert summary["predictions"]["held_out"]["points"] == 10
    saved = torch.load(tmp_path / "r" / "set.pt")
    assert saved["members"].shape == (3, saved["w_bar"].numel())
    assert float((saved["members"] - saved["w_bar"]).norm(dim=1).max()) <= saved["radius"]
    for name in ("report.md", "results.json", "margins.png", "validation.png"):
        assert (tmp_path / "r" / name).is_file()
    assert "verdict" in (tmp_path / "r" / "report.md").read_text()


def test_data_from_a_function_and_select_rules(user, tmp_path):
    for select in ("top-loss:2", "low-loss:1", "random:2"):
        res = run(["--model", user / "net.py:model", "--checkpoint", user / "ckpt.pt", "--data", user / "net.py:data",
                   "--select", select, "--method", "gauss-newton", "--members", "0", "--out", tmp_path / select[:3]])
        assert res.exit_code == 0, res.output
        assert "verdict:" in res.output and "report written" in res.output
    res = run(["--model", user / "net.py:model", "--checkpoint", user / "ckpt.pt", "--data", user / "data.npz",
               "--points", "2", "--method", "gauss-newton", "--preconditioner", "nystrom", "--sketch", "10",
               "--members", "2", "--json", "--out", tmp_path / "pre"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout[res.stdout.index("{"):])["method"] == "gauss-newton"


def _bad_cases(user):
    m, c, d = str(user / "net.py:model"), str(user / "ckpt.pt"), str(user / "data.npz")
    (user / "wrong.pt").write_bytes(b"")
    torch.save({"weight": torch.zeros(2, 2)}, user / "other.pt")
    (user / "bad.npz").write_text("not a zip")
    np.savez(user / "shape.npz", x=np.zeros((5, 7), np.float32), y=np.zeros(5, np.int64))
    np.savez(user / "labels.npz", x=np.zeros((5, 4), np.float32), y=np.array([0, 1, 2, 3, 9]))
    return {
        "model spec without a function": (["--model", str(user / "net.py"), "--checkpoint", c, "--data", d], "FUNCTION"),
        "model file missing": (["--model", "nowhere.py:model", "--data", d], "does not exist"),
        "model function missing": (["--model", str(user / "net.py:nope"), "--data", d], "no attribute"),
        "factory returns no module": (["--model", str(user / "net.py:not_a_module"), "--data", d], "not a torch.nn.Module"),
        "empty checkpoint": (["--model", m, "--checkpoint", str(user / "wrong.pt"), "--data", d], "empty"),
        "checkpoint of another model": (["--model", m, "--checkpoint", str(user / "other.pt"), "--data", d],
                                        "does not fit the model"),
        "data not an npz": (["--model", m, "--checkpoint", c, "--data", str(user / "bad.npz")], "not a readable .npz"),
        "data the model rejects": (["--model", m, "--checkpoint", c, "--data", str(user / "shape.npz")],
                                   "cannot be applied"),
        "labels out of range": (["--model", m, "--checkpoint", c, "--data", str(user / "labels.npz")], "labels span|class labels must lie in"),
        "indices out of range": (["--model", m, "--checkpoint", c, "--data", d, "--points", "3,99"], "out of range"),
        "zero step": (["--model", m, "--checkpoint", c, "--data", d, "--step", "0"], "--step"),
        "negative step": (["--model", m, "--checkpoint", c, "--data", d, "--step", "-1"], "--step"),
        "bad select": (["--model", m, "--checkpoint", c, "--data", d, "--select", "best:3"], "--select"),
        "too many selected": (["--model", m, "--checkpoint", c, "--data", d, "--select", "random:500"], "only|there are"),
        "missing direction file": (["--model", m, "--checkpoint", c, "--data", d, "--direction", "dx.npy"], "--direction"),
        "unknown loss": (["--model", m, "--checkpoint", c, "--data", d, "--loss", "hinge"], "loss"),
        "no model": (["--data", d], "--model"),
        "preconditioner for eq. 19": (["--model", m, "--checkpoint", c, "--data", d, "--method", "hessian",
                                       "--preconditioner", "nystrom"], "--preconditioner"),
        "preconditioner when auto picks eq. 19": (["--model", m, "--checkpoint", c, "--data", d,
                                                   "--preconditioner", "diagonal"], "Gauss–Newton only"),
    }


def test_bad_input_is_one_line_within_seconds(user):
    for name, (args, message) in _bad_cases(user).items():
        t0 = time.perf_counter()
        res = run(args)
        assert res.exit_code != 0, name
        assert "Traceback" not in res.output, name
        error = [line for line in res.output.splitlines() if line.startswith("Error")]
        assert len(error) == 1 and __import__("re").search(message, error[0]), (name, res.output)
        assert time.perf_counter() - t0 < 30, name


def test_the_installed_command_prints_no_traceback(user):
    res = subprocess.run([sys.executable, "-m", "setsens", "analyze", "--model", str(user / "net.py:model"),
                          "--checkpoint", str(user / "ckpt.pt"), "--data", str(user / "data.npz"), "--points", "500"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("Error") and "out of range" in res.stderr


def test_audit_scan_and_queries_against_their_references(user, tmp_path):
    res = CliRunner().invoke(main, ["audit", "--model", user / "net.py:model", "--checkpoint", user / "ckpt.pt",
                                    "--data", user / "data.npz", "--dtype", "float64", "--check", "--queries", "20",
                                    "--top", "3", "--json", "--out", tmp_path / "a"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    scan = summary["scan"]
    assert scan["spearman_vs_exact"] > 0.99 and scan["top20_max_relative_error"] < 1e-4
    assert len(scan["retrained_held_out_move"]["random_directions"]) == 5 and scan["top_vs_random_ratio"] > 0
    assert scan["top_vs_random_direction_ratio"] > 0
    q = summary["queries"]
    assert q["count"] == 20 and q["max_relative_error_vs_individual"] < 1e-3 and q["max_relative_error_vs_pinv"] < 1e-6
    assert {"seconds_over_one_estimate", "kappa", "ranking"} <= set(scan)
    assert scan["group"]["kappa_top"] >= max(scan["kappa_top"][:3]) * (1 - 1e-9)
    assert (tmp_path / "a" / "kappa.png").is_file() and (tmp_path / "a" / "report.md").is_file()
    bad = CliRunner().invoke(main, ["audit", "--model", str(user / "net.py:model"), "--checkpoint",
                                    str(user / "ckpt.pt"), "--data", str(user / "data.npz"), "--top", "500"])
    assert bad.exit_code != 0 and "there are 30" in bad.output and "Traceback" not in bad.output


def test_audit_attack_and_certificate_resume_and_refuse_bad_input(user, tmp_path):
    args = ["audit", "--model", user / "net.py:relu_model", "--data", user / "data.npz", "--dtype", "float64",
            "--queries", "0", "--attack", "2", "--budget", "5,20", "--points", "3", "--stages", "2", "--certify",
            "--delta", "0,1e-4,1e-2,1", "--certify-checks", "1", "--retrain-steps", "400", "--json",
            "--out", tmp_path / "a"]
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, list(map(str, args)))
    first = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    attack, cert = summary["attack"], summary["certificate"]
    assert [b["budget"] for b in attack["budgets"]] == [0.05, 0.2] and attack["targets"] == 2
    for b in attack["budgets"]:
        assert 0 <= b["flip_rate"] <= 1 and len(b["targets"]) == 2
        assert all(len(t["points"]) == 3 for t in b["targets"])
    assert {"flip_rate", "margin_drop_over_best_baseline", "smallest_budget_flipping_half"} <= set(attack)
    assert attack["response"] == "budget"  # auto: the response its judge (the budget response) measures
    # the certificate predicts the same response: the budget response's, without the margin bounds (the set's)
    assert cert["response"] == "budget" and set(cert["kinds"]) == {"first order"}
    fraction = cert["kinds"]["first order"]["certified_fraction"]
    assert fraction[0] == 1.0 and all(a >= b for a, b in zip(fraction, fraction[1:]))
    assert cert["violations"] == 0 and cert["certified_fraction"] == fraction
    assert "certificate (first order, of the budget response)" in (tmp_path / "a" / "report.md").read_text()
    judge = summary["retraining"]  # the budget response named, with how far its answers moved when halved
    assert judge["steps"] == 400 and "400 steps" in judge["reference"] and judge["lr"] > 0
    assert judge["change_when_halved"]["runs"] >= 2 * 2 * (2 + 2)  # targets × budgets × (stages + baselines)
    assert "retraining (the reference" in (tmp_path / "a" / "report.md").read_text()
    for name in ("attack.png", "certificate.png", "report.md", "results.json"):
        assert (tmp_path / "a" / name).is_file()
    t0 = time.perf_counter()
    again = CliRunner().invoke(main, list(map(str, args)))  # every retraining is cached: resumes, same numbers
    assert again.exit_code == 0 and time.perf_counter() - t0 < first
    assert json.loads(again.stdout[again.stdout.index("{"):])["attack"] == attack
    for extra, message in ((["--budget", "0"], "--budget"), (["--budget", "150"], "--budget"),
                           (["--delta", "x"], "--delta"), (["--points", "99"], "there are 30")):
        bad = CliRunner().invoke(main, list(map(str, args[:-2] + extra + ["--out", tmp_path / "b"])))
        assert bad.exit_code != 0 and message in bad.output and "Traceback" not in bad.output, bad.output
    certify_set = ["--certify", "--certify-checks", "0", "--response", "set", "--queries", "0", "--json"]
    relu = CliRunner().invoke(main, list(map(str, ["audit", "--model", user / "net.py:relu_model", "--data",
                                                    user / "data.npz", *certify_set, "--out", tmp_path / "r"])))
    cert = json.loads(relu.stdout[relu.stdout.index("{"):])["certificate"]
    assert relu.exit_code == 0 and cert["response"] == "set", relu.output
    assert set(cert["kinds"]) == {"first order", "margin bounds"}
    for kind in cert["kinds"].values():
        fraction = kind["certified_fraction"]
        assert fraction[0] == 1.0 and all(a >= b for a, b in zip(fraction, fraction[1:]))
    assert cert["certified_fraction"] == cert["kinds"]["margin bounds"]["certified_fraction"]
    tanh = CliRunner().invoke(main, list(map(str, ["audit", "--model", user / "net.py:model", "--data",
                                                    user / "data.npz", *certify_set, "--out", tmp_path / "c"])))
    assert tanh.exit_code == 0 and "margin bounds skipped (activation Tanh is outside the setting" in tanh.output, \
        tanh.output  # first order only
    assert set(json.loads(tanh.stdout[tanh.stdout.index("{"):])["certificate"]["kinds"]) == {"first order"}


def test_the_training_tangent_with_an_automatic_step(user, tmp_path):
    res = run(["--model", user / "net.py:model", "--checkpoint", user / "ckpt.pt", "--data", user / "data.npz",
               "--points", "1,5", "--method", "training-tangent", "--step", "auto", "--optimizer", "adam",
               "--lr", "0.01", "--steps", "30", "--validate", "--json", "--out", tmp_path / "t"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout[res.stdout.index("{"):])
    v, va = s["validation"], s["validity"]
    assert s["method"] == "training-tangent" and s["verdict"]["status"] == "pass"
    assert v["reference"] == "training_response" and v["reference_stable"] and v["pearson"] > 0.95  # 0.984
    assert va["step_max"] > 0 and s["perturbation"]["step_percent"] == pytest.approx(va["step_max"], rel=1e-4)
    saved = torch.load(tmp_path / "t" / "tangent.pt")
    assert set(saved) >= {"w_bar", "base", "shift", "second"} and "validity at this step" in \
        (tmp_path / "t" / "report.md").read_text()


def test_the_secant_tangent_from_the_command_line(user, tmp_path):
    res = run(["--model", user / "net.py:relu_model", "--data", user / "data.npz", "--points", "1,5", "--method",
               "training-secant", "--step", "auto", "--lr", "0.1", "--steps", "10", "--validate", "--json", "--out",
               tmp_path / "s"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout[res.stdout.index("{"):])
    names = [c["name"] for c in s["verdict"]["checks"]]
    assert s["method"] == "training-secant" and s["estimate"]["method"] == "training-secant"
    assert {"secant_at_step", "above_floor", "bifurcation"} <= set(names) and "smooth_at_step" not in names
    assert s["validity"]["check"] == "secant" and s["validation"]["reference"] == "training_response"
    assert s["estimate"]["secant_uncovered"] == []
    assert "secant residual" in (tmp_path / "s" / "report.md").read_text()


@pytest.mark.parametrize("args, hint", [
    (["--step", "auto"], "--step"),                                   # auto needs the tangent
    (["--optimizer", "adam"], "--optimizer"),                         # a tangent option on eq. 19
    (["--method", "training-tangent", "--reference", "converged", "--weight-decay", "1e-3"], "--reference"),
    (["--step", "0"], "--step"),
])
def test_options_of_the_other_method_are_refused_in_one_line(user, tmp_path, args, hint):
    res = run(["--model", user / "net.py:model", "--checkpoint", user / "ckpt.pt", "--data", user / "data.npz",
               *args, "--out", tmp_path / "x"])
    assert res.exit_code != 0 and hint in res.output and "Traceback" not in res.output
