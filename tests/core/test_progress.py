"""One progress shape (setsens.progress) and its one renderer (setsens.experiments.bars): bars on a terminal, a
few lines in a redirected log, nothing with --quiet; no library module imports tqdm."""

import io
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import torch

from setsens.cli import main
from setsens.experiments.bars import Bars
from setsens.progress import Progress, counted, part, report

SRC = Path(__file__).resolve().parents[2] / "src" / "setsens"


def test_report_counted_and_part_build_one_shape():
    seen = []
    report(seen.append, "solve", 3, 10, residual=0.5)
    report(None, "solve", 4)  # no progress: nothing to call
    assert seen == [Progress("solve", 3, 10, {"residual": 0.5})]
    assert list(counted(seen.append, "abc", "letters")) == ["a", "b", "c"]
    assert [(e.done, e.total) for e in seen[1:]] == [(1, 3), (2, 3), (3, 3)]
    second_run = part(seen.append, "retrain", 100, 200)
    second_run(Progress("fine-tune", 7, 100, {"x": 1}))
    assert seen[-1] == Progress("retrain", 107, 200, {"x": 1})
    assert part(None, "retrain", 0, 1) is None


def test_estimate_reports_its_iterations_and_the_solver_hook_still_stops_it(problem):
    from setsens.perturb import gradient_perturbation
    from setsens.solution_set import SolveOptions, estimate

    pert = gradient_perturbation(problem, [0, 3], 0.01)
    fixed = SolveOptions(rule="fixed", maxiter=8)
    quiet = estimate(problem, pert, "gauss-newton", solve=fixed)
    seen = []
    shown = estimate(problem, pert, "gauss-newton", solve=fixed, progress=seen.append)
    assert torch.equal(quiet.shift, shown.shift)  # reporting changes nothing
    steps = [e for e in seen if e.stage == "iteration"]
    assert [e.done for e in steps] == list(range(1, shown.krylov.iterations + 1)) and steps[0].total == 8
    assert steps[0].info["residual"] == shown.krylov.residuals[0]
    stopped = estimate(problem, pert, "gauss-newton", progress=seen.append,
                       solve=SolveOptions(rule="fixed", maxiter=8, callback=lambda k, res, x: k == 2))
    assert stopped.krylov.iterations == 2 and stopped.krylov.stopped_by == "callback"


def test_a_log_gets_a_line_per_stage_start_and_end_and_one_per_interval():
    now = [0.0]
    log = io.StringIO()
    bars = Bars({"adam": "train (Adam)"}, stream=log, tty=False, interval=30.0, clock=lambda: now[0])
    for t in range(1, 1001):  # 1000 steps over 100 s
        now[0] = t / 10
        bars(Progress("adam", t, 1000, {"loss": 0.1}))
    for k in range(1, 501):  # an open-ended stage, 500 events over 50 s
        now[0] = 100 + k / 10
        bars(Progress("candidate", k))
    bars.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines[0].startswith("[train (Adam)] 1/1000 (0 s): loss 0.1")
    assert lines[4].startswith("[train (Adam)] 1000/1000 (100 s)")
    assert len(lines) == 5 + 2  # adam: start, at 30, 60 and 90 s, end; candidate (no end): start, 30 s later


def test_a_terminal_gets_bars_and_disabled_or_quiet_gets_nothing():
    screen = io.StringIO()
    with Bars(stream=screen, tty=True) as bars:
        for t in range(1, 6):
            bars(Progress("steps", t, 5))
    assert "steps" in screen.getvalue() and "\r" in screen.getvalue()
    silent = io.StringIO()
    with Bars(stream=silent, tty=True, enabled=False) as bars:
        bars(Progress("steps", 1, 5))
    with click.Context(main) as ctx:
        ctx.meta["setsens.quiet"] = True
        with Bars(stream=silent, tty=False) as bars:
            bars(Progress("steps", 1, 5))
    assert silent.getvalue() == ""


def test_no_library_module_imports_tqdm():
    imports = re.compile(r"^\s*(from|import) tqdm", re.M)
    users = [str(f.relative_to(SRC)) for f in SRC.rglob("*.py") if imports.search(f.read_text())]
    assert users == ["experiments/bars.py"]


NET = textwrap.dedent("""
    import torch
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def data():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(40, 4, generator=g)
        return x[:30], x[:30, :3].argmax(1), x[30:], x[30:, :3].argmax(1)
""")


def test_a_cli_run_with_stderr_redirected_writes_a_few_lines_and_quiet_none(tmp_path):
    (tmp_path / "net.py").write_text(NET)
    args = ["analyze", "--model", f"{tmp_path}/net.py:model", "--data", f"{tmp_path}/net.py:data", "--points", "1,5",
            "--validate", "--steps", "200", "--members", "2"]
    logs = {}
    for name, flags in (("plain", []), ("quiet", ["--quiet"])):
        with open(tmp_path / f"{name}.log", "w") as err:
            subprocess.run([sys.executable, "-m", "setsens", *flags, *args, "--out", str(tmp_path / name)],
                           stdout=subprocess.DEVNULL, stderr=err, check=True)
        logs[name] = (tmp_path / f"{name}.log").read_text()
    progress = [line for line in logs["plain"].splitlines() if line.startswith("[")]
    assert "\r" not in logs["plain"]
    assert any(line.startswith("[retrain (perturbed, clean)] 400/400") for line in progress)
    assert 2 <= len(progress) <= 6, logs["plain"]  # 400 retraining steps, and the scored candidates
    assert not any(line.startswith("[") for line in logs["quiet"].splitlines()), logs["quiet"]
