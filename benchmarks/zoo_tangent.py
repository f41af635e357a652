"""The zoo under the training tangent: does the derivative of the fine-tuning run predict that fine-tuning, on
networks as people train them, and does the verdict say where it does not?

Each model of ``examples/zoo`` (as trained; the shared ResNet-56 from its checkpoint) is analysed for 3 seeds of
moved points (``random:3``, moved along their loss gradient) by :func:`setsens.analysis.analyze_training`: one
second-order tangent per seed at a 1 % step (the validity range and ``--step auto``'s choice come from it, no
retraining), then, at each step of the sweep and at the auto step, the verdict and the validation against the
reference the tangent predicts (the same fine-tuning on perturbed and clean data, with its noise floor at a 300×
smaller step and its self-consistency at a 3× smaller one).  The training differentiated is full-batch SGD with
Nesterov momentum 0.9 at lr 1/λ_max(H) for T steps.  Rows are appended to ``OUT/tangent.json`` (a rerun resumes);
``OUT/tangent.md`` holds the table, the verdict's confusion table and the per-model figures.

    python benchmarks/zoo_tangent.py --out docs/runs/zoo-tangent                     # digits models, regression
    python benchmarks/zoo_tangent.py --models resnet --train-steps 100 --sweep "" --out docs/runs/zoo-tangent/resnet
    python benchmarks/zoo_tangent.py --report-only --out docs/runs/zoo-tangent --merge docs/runs/zoo-tangent/resnet/…
    python benchmarks/zoo_tangent.py --secant --models cnn --checkpoints docs/runs/zoo-tangent \
        --out docs/runs/zoo-secant/cnn

``--secant`` analyses the secant tangent instead (``analyze_training(..., secant=True)``: the same validity range
from the plain tangent, with the secant's residual, noise floor and self-consistency as its checks).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo import ZOO, checkpoint  # noqa: E402

LOSSES = {"regression": "squared_error"}


def load(name: str, out: Path, dtype: str = "float32"):
    from setsens.loading import load_checkpoint, load_loss
    from setsens.problem import Problem

    sys.path.insert(0, str(ZOO))
    module = importlib.import_module(name)
    net = load_checkpoint(module.model(), checkpoint(name, out))
    x, y, xt, yt = module.data()
    problem = Problem(net, load_loss(LOSSES.get(name, "cross_entropy")), (x, y), dtype=dtype)
    return problem, (xt.to(problem.dtype), yt)


def row(name, seed, step, auto, a, seconds) -> dict:
    v, va = a.validation, a.validity
    r = v["reference_run"]
    own = {"jump_median": va["jump_ratio"]["median"]} if a.method == "training-tangent" else \
        {"secant_median": va["secant_residual"]["median"], "above_floor": va["above_floor"],
         "growth": va["growth"]}
    return {"model": name, "seed": seed, "step_percent": step, "auto": auto, "method": a.method,
            "verdict": a.verdict.status, "checks": {c.name: [c.status, c.value] for c in a.verdict.checks},
            "ratio": va["ratio"], "step_max": va["step_max"], **own, "curve": va["curve"],
            "pearson": v["pearson"], "relative_error": v["relative_error"], "influence_pearson": v["influence_pearson"],
            "filter_pearson": v.get("filter", {}).get("pearson"),
            "reference_stable": v["reference_stable"], "diverged": r["diverged"],
            "change": r["output_change_norm"], "noise_floor": r["noise_floor"],
            "change_over_floor": r["change_over_floor"], "self_consistency": r["self_consistency"],
            "lr": r["lr"], "train_steps": r["steps"], "seconds": seconds}


def regrade(r: dict) -> str:
    """The verdict of a stored row under the thresholds in force (they were calibrated on these rows)."""
    from setsens.verdict import tangent_verdict

    precision = r["checks"]["shift_precision"][1]
    if r.get("method", "training-tangent") == "training-tangent":
        return tangent_verdict(r["diverged"], r["ratio"], r["jump_median"], precision).status
    return tangent_verdict(r["diverged"], r["ratio"], r["secant_median"], precision, secant=True,
                           above_floor=r["above_floor"]).status


def model_name(r: dict) -> str:
    """The model's name, with the dtype where it is not float32."""
    return r["model"] + ("" if r.get("dtype", "float32") == "float32" else f" ({r['dtype']})")


def spread(values) -> str:
    values = [v for v in values if isinstance(v, (int, float)) and v == v]
    if not values:
        return "—"
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def tables(rows: list[dict]) -> str:
    secant = any(r.get("method") == "training-secant" for r in rows)
    own = "secant residual | secant change / its floor" if secant else "jump ratio"
    lines = [f"| model | step % | seeds | verdicts (pass/warn/fail) | Pearson, {'secant' if secant else 'tangent'} | "
             f"Pearson, influence | Pearson, GGN filter | reference self-consistency | change / noise floor | "
             f"ratio (2nd/1st) | {own} |", "|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * secant]
    groups = {}
    for r in rows:
        groups.setdefault((model_name(r), "auto" if r["auto"] else f"{r['step_percent']:g}"), []).append(r)
    for (model, step), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "auto",
                                                                      -float(kv[1][0]["step_percent"]))):
        counts = "/".join(str(sum(r["verdict"] == s for r in rs)) for s in ("pass", "warn", "fail"))
        label = "auto: " + ", ".join(f"{r['step_percent']:g}" for r in rs) if step == "auto" else step
        lines.append(f"| {model} | {label} | {len(rs)} | {counts} | {spread([r['pearson'] for r in rs])} | "
                     f"{spread([r['influence_pearson'] for r in rs])} | "
                     f"{spread([r.get('filter_pearson') for r in rs])} | {spread([r['self_consistency'] for r in rs])}"
                     f" | {spread([r['change_over_floor'] for r in rs])} | {spread([r['ratio'] for r in rs])} | "
                     + " | ".join(spread([r[k] for r in rs]) for k in (
                         ("secant_median", "above_floor") if secant else ("jump_median",))) + " |")
    scored = [r for r in rows if r["pearson"] == r["pearson"]]
    good = [r for r in scored if r["pearson"] >= 0.9]
    bad = [r for r in scored if r["pearson"] < 0.9]
    count = lambda rs, s: sum(r["verdict"] == s for r in rs)  # noqa: E731
    lines += ["", "Verdict against the measured Pearson (every scored run above; a run whose reference diverged has "
              "no Pearson and is left out):", "", "| | pass | warn | fail |", "|---|---|---|---|",
              *(f"| Pearson {label} ({len(rs)}) | {count(rs, 'pass')} | {count(rs, 'warn')} | {count(rs, 'fail')} |"
                for label, rs in (("≥ 0.9", good), ("< 0.9", bad)))]
    return "\n".join(lines)


def figure(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # a script at the edge: the library itself never sets a backend
    import matplotlib.pyplot as plt

    models = sorted({model_name(r) for r in rows})
    fig, axes = plt.subplots(2, len(models), figsize=(4 * len(models), 6.4), squeeze=False, sharex="col")
    for top, bottom, model in zip(axes[0], axes[1], models):
        for seed in sorted({r["seed"] for r in rows if model_name(r) == model}):
            mine = [r for r in rows if model_name(r) == model and r["seed"] == seed]
            rs = sorted((r for r in mine if not r["auto"]), key=lambda r: r["step_percent"]) or mine
            line, = top.semilogx([r["step_percent"] for r in rs], [r["pearson"] for r in rs], "o-",
                                 label=f"seed {seed}")
            colour = line.get_color()
            auto = [r for r in mine if r["auto"]]
            if auto:
                top.plot([auto[0]["step_percent"]], [auto[0]["pearson"]], "*", ms=12, color=colour)
            step_max = (auto or rs)[0]["step_max"]  # the auto row's is the latest rule's
            if step_max > 0:
                top.axvline(step_max, color=colour, ls="--", lw=0.8)
            bottom.loglog([r["step_percent"] for r in rs], [r["ratio"] for r in rs], "o-", color=colour)
            own = "secant_median" if "secant_median" in rs[0] else "jump_median"
            bottom.loglog([r["step_percent"] for r in rs], [r[own] for r in rs], "s:", color=colour)
            if own == "secant_median":  # the floor over the change: below 1/FLOOR_THRESHOLD inside the range
                bottom.loglog([r["step_percent"] for r in rs], [1 / r["above_floor"] for r in rs], "^--",
                              color=colour, ms=4)
        steps = [r["step_percent"] for r in rows if model_name(r) == model]
        top.set_xlim(min(steps) / 1.5, max(steps) * 1.5)  # a model with a single step keeps a visible width
        top.axhline(0.9, color="k", lw=0.5)
        top.set(title=model, ylabel="Pearson vs the reference", ylim=(min(0.0, top.get_ylim()[0]), 1.02))
        top.legend(fontsize=7, title="★ auto step, dashed step_max", title_fontsize=7)
        from setsens.verdict import FLOOR_THRESHOLD, JUMP_THRESHOLD, SECANT_THRESHOLD, VALIDITY_THRESHOLD

        secant = any(r.get("method") == "training-secant" for r in rows)
        bottom.axhline(VALIDITY_THRESHOLD, color="k", lw=0.5)
        bottom.axhline(SECANT_THRESHOLD if secant else JUMP_THRESHOLD, color="k", lw=0.5, ls=":")
        if secant:
            bottom.axhline(1 / FLOOR_THRESHOLD, color="k", lw=0.5, ls="--")
        bottom.set(xlabel="step (% of ‖x_k‖)", ylabel="o 2nd/1st, " + (
            "s residual, ^ floor/change" if secant else "s jump ratio"))
    fig.tight_layout()
    fig.savefig(out / "tangent.png", dpi=120)
    plt.close(fig)


def main() -> None:
    from setsens.analysis import analyze_training
    from setsens.finetune import Training, resolve_lr
    from setsens.perturb import gradient_perturbation
    from setsens.tangent import training_tangent

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,regression,cnn,transformer,gn_cnn")
    parser.add_argument("--sweep", default="3,1,0.3,0.1,0.03", help="steps in %% besides the auto step")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--filter-rank", type=int, default=40,
                        help="also score the linearised-training filter (Lanczos rank; 0: not)")
    parser.add_argument("--out", default="runs/zoo-tangent")
    parser.add_argument("--checkpoints", help="where the zoo's trained checkpoints are (or are written) [default: OUT]")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                        help="the precision of the weights, the tangents and the reference")
    parser.add_argument("--secant", action="store_true", help="analyse the secant tangent (method training-secant)")
    parser.add_argument("--auto-only", action="store_true", help="recompute the auto step's row of every seed")
    parser.add_argument("--report-only", action="store_true", help="no runs: tabulate OUT/tangent.json (and --merge)")
    parser.add_argument("--merge", default="", help="also tabulate the rows of these tangent.json files (a,b,…)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done = out / "tangent.json"
    rows = json.loads(done.read_text()) if done.exists() else []
    sweep = [float(s) for s in args.sweep.split(",") if s.strip()]
    for name in [] if args.report_only else args.models.split(","):
        problem, test = load(name, Path(args.checkpoints) if args.checkpoints else out, args.dtype)
        training = resolve_lr(problem, Training(steps=args.train_steps))
        for seed in (int(s) for s in args.seeds.split(",")):
            if args.auto_only:  # redo the auto step only (the validity rule changed): the sweep rows stay
                rows = [r for r in rows if not (r["model"] == name and r["seed"] == seed and r["auto"])]
            elif any(r["model"] == name and r["seed"] == seed and r["auto"] for r in rows):
                continue
            else:
                rows = [r for r in rows if (r["model"], r["seed"]) != (name, seed)]  # an unfinished seed is redone
            idx = torch.randperm(problem.n, generator=torch.Generator().manual_seed(seed))[:3]
            unit = gradient_perturbation(problem, idx, 0.01)
            t0 = time.perf_counter()
            tangent = training_tangent(problem, unit, training, order=2)
            tangent_seconds = time.perf_counter() - t0
            for step in ([] if args.auto_only else sweep) + [None]:  # None: --step auto, from the 1 % tangent
                t0 = time.perf_counter()
                a = analyze_training(problem, unit.scaled(step or 1.0), training, test=test, validate=True,
                                     tangent=tangent.scaled(step or 1.0), auto_step=step is None,
                                     secant=args.secant, filter_rank=args.filter_rank)
                auto = a.validity.get("auto")
                rows.append(row(name, seed, auto["step"] if auto else step, auto is not None, a,
                                tangent_seconds + time.perf_counter() - t0) | {"dtype": args.dtype})
                write_text(done, json.dumps(rows, indent=2) + "\n")
                r = rows[-1]
                print(f"{name} seed {seed} step {r['step_percent']:g} %{' (auto)' if auto else ''}: "
                      f"verdict {r['verdict']}, "
                      f"Pearson {r['pearson']:.3f} (influence {r['influence_pearson']:.3f}), self-consistency "
                      f"{r['self_consistency']:.3f}, change/floor {r['change_over_floor']:.3g}, "
                      f"ratio {r['ratio']:.3g}, " + (f"jump {r['jump_median']:.3g}" if "jump_median" in r else
                                                     f"secant residual {r['secant_median']:.3g}, above floor "
                                                     f"{r['above_floor']:.3g}")
                      + f", step_max {r['step_max']:.3g} %",
                      flush=True)
    own = {r["model"] for r in rows}
    for path in filter(None, args.merge.split(",")):
        rows += [r for r in json.loads(Path(path).read_text()) if r["model"] not in own]
    for r in rows:
        r["verdict"] = regrade(r)
    text = tables(rows)
    print(text)
    title = "the secant training tangent" if args.secant else "the training tangent"
    (out / "tangent.md").write_text(f"# The zoo under {title}\n\n" + text + "\n\n![](tangent.png)\n")
    figure(rows, out)


if __name__ == "__main__":
    main()
