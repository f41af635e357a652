"""The README's library snippet runs as written, on a small fitted network."""

import re
from pathlib import Path

import torch
from torch import nn

from setsens.problem import Problem, squared_error
from setsens.retrain import retrain


def test_readme_library_snippet_runs():
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = re.search(r"## Library\n\n```python\n(.*?)```", text, re.S).group(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    fit = retrain(Problem(model, squared_error, (x, y)), gtol=1e-10, max_iter=2000).w
    torch.nn.utils.vector_to_parameters(fit, model.parameters())
    namespace = {"model": model, "x": x, "y": y}
    exec(compile(code, "README.md", "exec"), namespace)
    est, members = namespace["est"], namespace["members"]
    assert members.shape == (8, est.problem.p) and len({tuple(m.tolist()) for m in members}) == 8


def test_readme_analyze_commands_run(tmp_path):
    """The two commands of "Your own model", as written (a smaller budget appended to keep CI short)."""
    import shlex
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    text = (root / "README.md").read_text()
    block = re.search(r"## Your own model.*?```bash\n(.*?)```", text, re.S).group(1)
    lines = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    train, analyze = lines
    assert train.startswith("python ") and analyze.startswith("setsens analyze")
    def absolute(args):  # run in tmp_path, the example files read from the repository
        return [str(root / a) if a.startswith("examples/") else a for a in args]

    subprocess.run([sys.executable, *absolute(shlex.split(train)[1:])], cwd=tmp_path, check=True, timeout=120)
    args = absolute(shlex.split(analyze)[1:]) + ["--steps", "50", "--maxiter", "30", "--members", "2", "--out", "r"]
    res = subprocess.run([sys.executable, "-m", "setsens", *args], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert "verdict:" in res.stdout + res.stderr and (tmp_path / "r" / "report.md").is_file()
