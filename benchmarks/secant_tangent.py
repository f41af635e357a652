"""Probe: the *secant* training tangent on the zoo's ReLU networks, against the plain tangent and the reference.

The plain tangent (:func:`setsens.tangent.training_tangent`) differentiates gradient descent's map; on a ReLU
network that map jumps wherever a unit changes sides (the gradient's mask 1[z > 0] is a step function of w), and
no derivative sees the jumps.  The secant tangent keeps the same forward-mode run but replaces, in every step,
each ReLU's derivative by its secant over the tangent's own first-order change of the unit's input z′:
``relu(z + z′) − relu(z)`` forward, and the mask's change ``g·(1[z + z′ > 0] − 1[z > 0])`` in the gradient.
It therefore depends on the step (it is computed per step, not scaled) and costs what the tangent costs.
Each is scored (Pearson, relative error) against the reference it predicts, ``retrain.training_response``
(same 200 full-batch Nesterov steps at lr 1/λ_max(H), perturbed minus clean), on the 500 held-out outputs.

The secant is the library's (``training_tangent(..., secant=True)``, :class:`setsens.secant.Secant`; this probe
was its prototype, with the same arithmetic).  The verdict and validity range of the secant are measured by
``benchmarks/zoo_tangent.py --secant``.

    python benchmarks/secant_tangent.py --models cnn,transformer --seeds 0,1,2 --checkpoints docs/runs/zoo-tangent \
        --out docs/runs/secant-tangent
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from setsens.report import write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_tangent import load, spread  # noqa: E402


def main() -> None:
    from setsens.analysis import _comparable, _score, outputs_on
    from setsens.finetune import Training, resolve_lr
    from setsens.perturb import gradient_perturbation
    from setsens.retrain import training_response
    from setsens.tangent import training_tangent

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,transformer")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", default="3,1,0.3,0.1,0.03")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--out", default="runs/secant-tangent")
    parser.add_argument("--checkpoints", help="where the zoo's trained checkpoints are (or are written) [default: OUT]")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done = out / "secant.json"
    rows = json.loads(done.read_text()) if done.exists() else []
    for name in args.models.split(","):
        problem, test = load(name, Path(args.checkpoints) if args.checkpoints else out)
        training = resolve_lr(problem, Training(steps=args.train_steps))
        at = lambda w: _comparable(problem, outputs_on(problem, w, test[0]))  # noqa: E731
        for seed in (int(s) for s in args.seeds.split(",")):
            idx = torch.randperm(problem.n, generator=torch.Generator().manual_seed(seed))[:3]
            unit = gradient_perturbation(problem, idx, 0.01)
            for step in (float(s) for s in args.steps.split(",")):
                if any((r["model"], r["seed"], r["step_percent"]) == (name, seed, step) for r in rows):
                    continue
                pert = unit.scaled(step)
                ref = training_response(problem, pert, training, floor_factor=300)
                change = at(ref.perturbed) - at(ref.clean)
                floor = float((at(ref.floor) - at(ref.clean)).norm())
                t0 = time.perf_counter()
                plain = training_tangent(problem, pert, training, probes=0)
                t1 = time.perf_counter()
                secant = training_tangent(problem, pert, training, probes=0, secant=True)
                t2 = time.perf_counter()
                p, s = _score(at(plain.centre) - at(plain.base), change), _score(at(secant.centre) - at(secant.base),
                                                                                   change)
                rows.append({"model": name, "seed": seed, "step_percent": step, "diverged": ref.diverged,
                             "pearson_plain": p["pearson"], "relative_error_plain": p["relative_error"],
                             "pearson_secant": s["pearson"], "relative_error_secant": s["relative_error"],
                             "change": float(change.norm()), "noise_floor": floor,
                             "change_over_floor": float(change.norm()) / floor if floor > 0 else float("inf"),
                             "replay_gap": float((secant.base - plain.base).norm()),
                             "seconds_plain": t1 - t0, "seconds_secant": t2 - t1})
                write_text(done, json.dumps(rows, indent=2) + "\n")
                r = rows[-1]
                print(f"{name} seed {seed} step {step:g} %: plain {r['pearson_plain']:.3f} "
                      f"(rel {r['relative_error_plain']:.2f}), secant {r['pearson_secant']:.3f} "
                      f"(rel {r['relative_error_secant']:.2f}), change/floor "
                      f"{r['change_over_floor']:.3g}", flush=True)
    lines = ["| model | step % | seeds | Pearson, plain tangent | Pearson, secant tangent | relative error, plain | "
             "relative error, secant | change / noise floor |", "|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["step_percent"]), []).append(r)
    for (model, step), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        lines.append(f"| {model} | {step:g} | {len(rs)} | " + " | ".join(
            spread([r[k] for r in rs]) for k in ("pearson_plain", "pearson_secant", "relative_error_plain",
                                                  "relative_error_secant", "change_over_floor")) + " |")
    (out / "secant.md").write_text("# The secant training tangent on the zoo's ReLU networks\n\n" + "\n".join(lines)
                                   + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
