"""The zoo: `setsens analyze --validate` on networks trained as people train them.

Each model of ``examples/zoo`` is trained (seeded; float32, Adam, as its file says), saved, and
analysed through the command line for several choices of moved points (``random:3`` with seeds
0, 1, 2), twice: as trained, and after following the verdict's advice (``--polish``: up to 3000
L-BFGS iterations in float64 towards a stationary point of the risk with a weight decay of 1e-4,
and ``--maxiter 1000`` for the solve).  The reference is same-budget gradient descent as trained
and, with weight decay (an isolated minimiser), the converged response: L-BFGS to stationarity.
Printed: per model and step, the verdict (how many seeds pass / warn / fail),
the Pearson correlation between predicted and retrained change of held-out outputs for the
estimate and for the damped influence function (median, min, max over seeds), and whether the
retraining reference was stable and clearly above zero.  The question it answers: where the
estimate misses retraining, did the verdict say so first?

    python benchmarks/zoo.py --out runs/zoo                 # cnn, mlp, transformer at a 1 % step
    python benchmarks/zoo.py --models resnet --retrain-steps 200 --members 0   # the shared ResNet-56, 50 images
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from setsens.report import write_text

ZOO = Path(__file__).resolve().parents[1] / "examples" / "zoo"
TRAINED = {"resnet": Path(__file__).resolve().parents[2] / "shared" / "data" / "resnet56-cifar10.th"}
#: the verdict's advice, per model: fine-tune to a stationary point of the risk with weight decay (the
#: MLP was trained with it; without it a cross-entropy fit only saturates — its loss and curvature → 0)
ADVICE = {name: ["--weight-decay", "1e-4", "--polish", "3000", "--dtype", "float64", "--maxiter", "1000"]
          for name in ("cnn", "mlp", "transformer")} | {"resnet": []}


def checkpoint(name: str, out: Path) -> Path:
    """The model's shared checkpoint, or train it (seed 0) with its own ``train`` and save it."""
    if name in TRAINED:
        return TRAINED[name]
    path = out / f"{name}.pt"
    if not path.exists():
        sys.path.insert(0, str(ZOO))
        module = importlib.import_module(name)
        torch.manual_seed(0)
        x, y, _, _ = module.data()
        net = module.train(module.model(), x, y)
        torch.save(net.state_dict(), path)
    return path


def label(name: str, advised: bool) -> str:
    return name + (" (" + " ".join(ADVICE[name]) + ")" if advised else " (as trained)")


def analyse(name: str, ckpt: Path, step: float, seed: int, retrain_steps: int, members: int, out: Path,
            advised: bool) -> dict:
    from click.testing import CliRunner

    from setsens.cli import main

    run_dir = out / f"{name}{'-advised' if advised else ''}-step{step:g}-seed{seed}"
    args = ["analyze", *(ADVICE[name] if advised else []), "--model", f"{ZOO / name}.py:model",
            "--checkpoint", str(ckpt), "--data",
            f"{ZOO / name}.py:data", "--select", "random:3", "--seed", str(seed), "--step", str(step),
            "--validate", "--steps", str(retrain_steps), "--members", str(members), "--json", "--out", str(run_dir)]
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, args)
    if res.exit_code != 0:  # recorded, not fatal: the zoo goes on
        return {"model": label(name, advised), "step_percent": step, "seed": seed,
                "error": res.output.strip().splitlines()[-1]}
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    v = summary["validation"]
    ref = v["reference_run"]
    return {"model": label(name, advised), "step_percent": step, "seed": seed,
            "verdict": summary["verdict"]["status"],
            "failed_checks": [c["name"] for c in summary["verdict"]["checks"] if c["status"] != "pass"],
            "method": summary["method"], "pearson": v["pearson"], "relative_error": v["relative_error"],
            "influence_pearson": v["influence_pearson"], "reference_stable": ref["stable"],
            "reference_change": ref["output_change_norm"], "reference_drift": ref["output_drift_norm"],
            "seconds": time.perf_counter() - t0}


def spread(values) -> str:
    values = [v for v in values if isinstance(v, float) and v == v]  # JSON's null is a NaN
    if not values:
        return "—"
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def ratio(change: float | None, drift: float) -> float:
    """Retrained change over the clean run's drift (inf: the clean run did not move, w̄ is its minimiser;
    NaN: the reference's change is not finite — JSON's null)."""
    if change is None:
        return float("nan")
    return change / drift if drift > 0 else float("inf")


def table(rows: list[dict]) -> str:
    lines = ["| model | step | verdicts (pass/warn/fail) | Pearson, estimate | Pearson, influence | reference stable |"
             " retrained change / drift | seconds |", "|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in (r for r in rows if "error" not in r):
        groups.setdefault((r["model"], r["step_percent"]), []).append(r)
    for (model, step), rs in groups.items():
        counts = "/".join(str(sum(r["verdict"] == s for r in rs)) for s in ("pass", "warn", "fail"))
        lines.append(f"| {model} | {step:g} % | {counts} | {spread([r['pearson'] for r in rs])} | "
                     f"{spread([r['influence_pearson'] for r in rs])} | {sum(r['reference_stable'] for r in rs)}"
                     f"/{len(rs)} | {spread([ratio(r['reference_change'], r['reference_drift']) for r in rs])}"
                     f" | {statistics.median(r['seconds'] for r in rs):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,mlp,transformer")
    parser.add_argument("--steps", default="1", help="steps in %% of each point's norm")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--retrain-steps", type=int, default=1000)
    parser.add_argument("--members", type=int, default=8,
                        help="set members each analysis samples (a null projection each; 0: centre and radius only)")
    parser.add_argument("--out", default="runs/zoo")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done = out / "zoo.json"
    rows = json.loads(done.read_text()) if done.exists() else []
    rows = [r for r in rows if "error" not in r]  # resumes: finished rows are kept, failed ones rerun
    for name in args.models.split(","):
        ckpt = checkpoint(name, out)
        for advised, step in ((a, float(s)) for a in (False, True) if not a or ADVICE[name]
                              for s in args.steps.split(",")):
            for seed in (int(s) for s in args.seeds.split(",")):
                key = (label(name, advised), step, seed)
                if any((r["model"], r["step_percent"], r["seed"]) == key for r in rows):
                    continue
                rows.append(analyse(name, ckpt, step, seed, args.retrain_steps, args.members, out, advised))
                r = rows[-1]
                write_text(done, json.dumps(rows, indent=2) + "\n")
                if "error" in r:
                    print(f"{r['model']} step {step:g} % seed {seed}: {r['error']}", flush=True)
                    continue
                print(f"{r['model']} step {step:g} % seed {seed}: verdict {r['verdict']} {r['failed_checks']}, "
                      f"Pearson {spread([r['pearson']])} (influence {spread([r['influence_pearson']])}), "
                      f"reference stable {r['reference_stable']}, {r['seconds']:.0f} s", flush=True)
    print(table(rows))
    (out / "zoo.md").write_text(table(rows) + "\n")


if __name__ == "__main__":
    main()
