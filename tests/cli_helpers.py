"""Subcommands in a subprocess: kill one in its longest step, resume it, compare its results."""

from __future__ import annotations

import json
import subprocess
import sys
import time

#: Parts of a result that a resumed run legitimately changes (timings, products it did not redo).
VOLATILE = ("seconds", "hvp", "time", "resumed", "passes", "evaluations")


def result_numbers(obj, path: str = ""):
    """Every number in a JSON tree, by path, except timings and product counts."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from result_numbers(v, f"{path}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from result_numbers(v, f"{path}/{i}")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        if not any(t in path for t in VOLATILE) and not path.endswith("_s"):
            yield path, obj


def killed_and_resumed(command: list[str], tmp_path, result: str, kill_when):
    """``setsens *command`` run once whole (``--out tmp_path/whole``) and once SIGKILLed as soon as
    ``kill_when(out, elapsed, whole_seconds)`` holds, then rerun into the same ``--out``
    (``tmp_path/resumed``).  Returns ``(whole, resumed, stderr of the rerun)``, the results as
    ``{path: number}``; fails if the run ends before the kill.
    """
    base = [sys.executable, "-m", "setsens", *command]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    t0 = time.perf_counter()
    subprocess.run(base + ["--out", str(whole)], check=True, capture_output=True)
    duration = time.perf_counter() - t0
    proc = subprocess.Popen(base + ["--out", str(resumed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.perf_counter()
    while not kill_when(resumed, time.perf_counter() - t0, duration):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    rerun = subprocess.run(base + ["--out", str(resumed)], check=True, capture_output=True, text=True)
    numbers = [dict(result_numbers(json.loads((d / result).read_text()))) for d in (whole, resumed)]
    return numbers[0], numbers[1], rerun.stderr


def cached(out, name: str):
    """The object a run cached as ``out/state/<key>/name.pt`` (None while there is none)."""
    import torch

    files = list(out.glob(f"state/*/{name}.pt"))
    return torch.load(files[0], weights_only=False) if files else None


def rejected(args: list[str], hint: str, seconds: float = 5.0, out=None) -> str:
    """Invoke ``setsens *args`` in-process and check the mistake is refused before any work: a
    non-zero exit within ``seconds``, one error line naming ``hint``, no traceback, and ``out`` (the
    run directory passed in ``args``) not created.  Returns the error line."""
    from click.testing import CliRunner

    from setsens.cli import main

    t0 = time.perf_counter()
    res = CliRunner().invoke(main, args)
    elapsed = time.perf_counter() - t0
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit), (args, res.output, res.exception)
    assert "Traceback" not in res.output and len(errors) == 1 and hint in errors[0], (args, res.output)
    assert elapsed < seconds, (args, elapsed)
    assert out is None or not out.exists(), (args, "the run directory was created")
    return errors[0]
