"""Does a preconditioner pay for itself on the Gauss–Newton system?  Iterations and time to 99 %.

    python benchmarks/preconditioner.py --problem digits --seeds 0,1,2
    python benchmarks/preconditioner.py --problem resnet --n 100 --points 1 --step 0.2 --maxiter 60

The minimum-norm shift ``v = −G⁺ r`` is solved, side by side in one process, by

* ``cgls`` — the default (CGLS on G, no preconditioner);
* ``cgne`` — CG on ``G Gᵀ u = −r``, ``v = Gᵀ u`` without a preconditioner (the same limit, the
  error rather than the residual minimised);
* ``cgne+diagonal:s`` and ``cgne+nystrom:k`` — the same with :mod:`setsens.preconditioners` built
  from ``s`` Hutchinson samples (s JVP passes) or a rank-k Nyström sketch (k JVP + VJP passes).

Scored after every iteration on two accuracies: the share of the perturbation's loss increase on the
moved points removed by w̄ + v_k (target: 99 % of what v* removes — the linear model cannot remove
more than v* does, and on the digits problem v* itself removes 98.5 %), and the error
``‖v_k − v*‖/‖v*‖`` (target: 1 %), against a reference v* (CGLS run to ``rtol`` 1e-12 or
``--reference-iters``).  Printed per method:
the iterations and the passes over the data (JVP + VJP products, the sketch included) to reach
each target, and the wall time including the sketch — median, min and max over sketch seeds
(the unpreconditioned solvers are deterministic).  A target not reached within ``--maxiter`` is
reported as ``null`` with the best value reached.  Also per method: the iterations one null
projection (``G x = G z`` for a random z, as the radius rule solves per direction; the sketch is
built once and serves them all) takes to 1 % error.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from setsens.function_space import OutputJacobian, output_shift
from setsens.krylov import cgls, cgne
from setsens.perturb import gradient_perturbation
from setsens.preconditioners import gram_preconditioner


def problem_and_points(args):
    if args.problem == "digits":
        from setsens.experiments.demo import DemoConfig, movable_points, train_stationary

        problem = train_stationary(DemoConfig(n=args.n or 100, seed=0))
        return problem, movable_points(problem, args.points or 10)
    from setsens.data.cifar import load_cifar10
    from setsens.models.resnet import load_cifar_resnet
    from setsens.problem import Problem, cross_entropy

    model = load_cifar_resnet(args.checkpoint).to(args.device)
    x, y = load_cifar10(args.data, "train", n=args.n or 100)
    problem = Problem(model, cross_entropy, (x, y), batch_size=args.batch_size, device=args.device)
    with torch.no_grad():
        losses = torch.cat([problem.per_sample_loss(problem.params, xb, yb) for xb, yb in problem.batches()])
    return problem, torch.argsort(losses)[:args.points or 1].sort().values  # the lowest-loss points


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problem", choices=["digits", "resnet"], default="digits")
    ap.add_argument("--n", type=int, default=None, help="training points [digits 100, resnet 100]")
    ap.add_argument("--points", type=int, default=None, help="points moved [digits 10, resnet 1]")
    ap.add_argument("--step", type=float, default=1.0, help="percent of each point's norm")
    ap.add_argument("--maxiter", type=int, default=200)
    ap.add_argument("--reference-iters", type=int, default=2000)
    ap.add_argument("--sketch", default="diagonal:20,nystrom:10,nystrom:40",
                    help="preconditioners as kind:size, comma-separated")
    ap.add_argument("--seeds", default="0,1,2", help="sketch seeds")
    ap.add_argument("--checkpoint", default="../shared/data/resnet56-cifar10.th")
    ap.add_argument("--data", default="../shared/data/cifar10-subset.npz")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the summary here too")
    args = ap.parse_args(argv)
    sketches = [(k, int(s)) for k, s in (item.split(":") for item in args.sketch.split(","))]
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(args.threads)

    problem, idx = problem_and_points(args)
    pert = gradient_perturbation(problem, idx, args.step / 100)
    centered = problem.loss_ignores_output_shift
    G = OutputJacobian(problem, centered=centered)
    r = output_shift(problem, pert, centered=centered)
    wbar = problem.params
    base = float(problem.loss_on(idx))
    l0 = problem.loss_on(idx, perturbation=pert)
    reference = cgls(G, -r, maxiter=args.reference_iters, rtol=1e-12, dot=G.dot)
    v_star = reference.x
    removed_star = (l0 - problem.loss_on(idx, wbar + v_star.to(wbar), perturbation=pert)) / (l0 - base)
    z = torch.randn(problem.p, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    Gz = G @ z  # a null projection z − G⁺G z solves G x = G z (the radius rule does this per direction)
    x_star = cgls(G, Gz, maxiter=args.reference_iters, rtol=1e-12, dot=G.dot).x
    print(json.dumps({"problem": args.problem, "p": problem.p, "n": problem.n, "points": idx.tolist(),
                      "loss_before": base, "loss_moved": l0, "reference_iterations": reference.iterations,
                      "reference_residual": reference.residual, "reference_removed": removed_star}))

    def run(name, solver, seed):
        calls0, t0 = G.calls, time.perf_counter()
        M = None
        if "+" in name:
            kind, size = name.split("+")[1].split(":")
            M = gram_preconditioner(kind, G, int(size), seed)
        sketch_passes, sketch_seconds = G.calls - calls0, time.perf_counter() - t0
        trace = []

        def score(k, residual, v):
            removed = (l0 - problem.loss_on(idx, wbar + v.to(wbar), perturbation=pert)) / (l0 - base)
            error = float((v - v_star).norm() / v_star.norm())
            trace.append({"iteration": k, "removed": removed, "error": error, "passes": G.calls - calls0})

        options = dict(maxiter=args.maxiter, rtol=0, dot=G.dot)
        if M is not None:
            options["precondition"] = M
        result = solver(G, -r, callback=score, **options)
        solve_seconds = result.seconds
        errors = []
        solver(G, Gz, callback=lambda k, res, x: errors.append(float((x - x_star).norm() / x_star.norm())),
               **options)
        projection = next((k + 1 for k, e in enumerate(errors) if e <= 0.01), None)

        def first(key, ok):
            hit = next((t for t in trace if ok(t[key])), None)
            return None if hit is None else {"iteration": hit["iteration"], "passes": hit["passes"],
                                             "seconds": sketch_seconds + solve_seconds * hit["iteration"]
                                             / max(result.iterations, 1)}

        return {"method": name, "seed": seed, "sketch_passes": sketch_passes, "sketch_seconds": sketch_seconds,
                "seconds_per_iteration": solve_seconds / max(result.iterations, 1),
                "to_99_removed": first("removed", lambda x: x >= 0.99 * removed_star),
                "to_1pct_error": first("error", lambda x: x <= 0.01),
                "projection_to_1pct_error": None if projection is None else {"iteration": projection,
                                                                             "passes": 2 * projection + 1},
                "best_removed": max(t["removed"] for t in trace), "best_error": min(t["error"] for t in trace)}

    rows = [run("cgls", cgls, 0), run("cgne", cgne, 0)]
    for kind, size in sketches:
        rows += [run(f"cgne+{kind}:{size}", cgne, s) for s in seeds]
    for row in rows:
        print(json.dumps(row))

    def spread(values):
        values = [v for v in values if v is not None]
        return None if not values else {"median": statistics.median(values), "min": min(values), "max": max(values)}

    summary = {"problem": args.problem, "p": problem.p, "n": problem.n, "points": len(idx), "step_percent": args.step,
               "device": str(problem.device), "maxiter": args.maxiter, "methods": {}}
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        entry = {"runs": len(mine), "best_removed": spread([r["best_removed"] for r in mine]),
                 "best_error": spread([r["best_error"] for r in mine])}
        for target in ("to_99_removed", "to_1pct_error", "projection_to_1pct_error"):
            hits = [r[target] for r in mine]
            entry[target] = {"reached": sum(h is not None for h in hits),
                             **{k: spread([h.get(k) if h else None for h in hits])
                                for k in ("iteration", "passes", "seconds")}}
        summary["methods"][name] = entry
    print("SUMMARY " + json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/preconditioner.py " + " ".join(argv or __import__("sys").argv[1:]),
                       "summary": summary, "runs": rows}, f, indent=1)


if __name__ == "__main__":
    main()
