"""The audit's amortised scan and many queries on the digits demo network, measured side by side.

    python benchmarks/audit.py --json            # seed 0: 100 digits, 64-64-64-10, exact fit

Printed (one JSON object with --json):
* ``scan``: κ_k of all n points from one Gram factorisation against an independent reference (the
  SVD pseudo-inverse of G), as Spearman correlation and the largest relative error on the top 20;
  its time over one default ``estimate``; the retrained move of held-out outputs when the 10
  top-ranked points move along their worst directions, over the same for 10 random points
  (same per-point ‖Δx‖, Levenberg–Marquardt retraining from w̄, median over 5 random draws).
* ``queries``: 100 one-point queries from the factor against 10 of them solved one by one
  (``estimate``, fixed rule, converged), and the time of all 100 over one default estimate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> None:
    from setsens.audit import GramFactor, answer_queries, input_jacobians, scan
    from setsens.data import load_digits_subset
    from setsens.experiments.demo import DemoConfig, train_stationary
    from setsens.perturb import gradient_perturbation
    from setsens.problem import Perturbation
    from setsens.retrain import levenberg_marquardt
    from setsens.solution_set import SolveOptions, estimate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cfg = DemoConfig(seed=args.seed)
    problem = train_stationary(cfg, progress=False)
    _, _, x_test, _ = load_digits_subset(cfg.n, seed=cfg.seed, test=True)
    x_test = x_test[:500]

    t0 = time.perf_counter()
    one = estimate(problem, gradient_perturbation(problem, [0], cfg.step))  # what a user runs for one query
    t_one = time.perf_counter() - t0

    t0 = time.perf_counter()
    factor = GramFactor(problem)
    result = scan(problem, factor)
    t_scan = time.perf_counter() - t0

    # independent reference: the SVD pseudo-inverse of G (not the Gram eigendecomposition)
    pinv = torch.linalg.pinv(factor.G)
    A = input_jacobians(problem)
    exact = torch.stack([torch.linalg.matrix_norm(pinv[:, k * factor.k:(k + 1) * factor.k] @ A[k], ord=2)
                         for k in range(problem.n)])
    top20 = exact.argsort(descending=True)[:20]
    top_error = float(((result.kappa[top20] - exact[top20]).abs() / exact[top20]).max())

    def moved_outputs(points: torch.Tensor) -> float:
        x, _ = problem.points(points)
        scale = cfg.step * x.reshape(len(points), -1).norm(dim=1)
        delta = result.direction[points] * scale.reshape(-1, *[1] * (x.ndim - 1))
        w = levenberg_marquardt(problem, None, Perturbation(points, delta), gtol=1e-13).w
        with torch.no_grad():
            return float((problem.outputs(w, x_test) - problem.outputs(problem.params, x_test)).norm())

    top_move = moved_outputs(result.top(10))
    g = torch.Generator().manual_seed(args.seed)
    random_moves = [moved_outputs(torch.randperm(problem.n, generator=g)[:10]) for _ in range(5)]

    g = torch.Generator().manual_seed(args.seed + 1)
    queries = [gradient_perturbation(problem, [int(i)], cfg.step) for i in torch.randint(0, problem.n, (100,),
                                                                                             generator=g)]
    t0 = time.perf_counter()
    shifts = answer_queries(problem, queries, GramFactor(problem))
    t_queries = time.perf_counter() - t0
    errors = []
    for q, v in list(zip(queries, shifts))[:10]:
        ref = estimate(problem, q, solve=SolveOptions(rule="fixed", rtol=1e-13, maxiter=cfg.maxiter)).shift
        errors.append(float((v - ref).norm() / ref.norm()))

    out = {
        "network": f"digits, n = {problem.n}, widths {list(cfg.widths)}, p = {problem.p}, seed {args.seed}",
        "one_estimate_seconds": t_one, "one_estimate_iterations": one.selected.get("iterations_run"),
        "scan": {"points": problem.n, "spearman_vs_exact": spearman(result.kappa, exact),
                 "top20_max_relative_error": top_error, "seconds": t_scan,
                 "seconds_over_one_estimate": t_scan / t_one, "factor_rank": factor.rank,
                 "kappa": {"min": float(result.kappa.min()), "median": float(result.kappa.median()),
                           "max": float(result.kappa.max())},
                 "retrained_held_out_move": {"top10": top_move, "random10": random_moves},
                 "top_vs_random_ratio": top_move / statistics.median(random_moves)},
        "queries": {"count": 100, "seconds": t_queries, "time_100_over_1": t_queries / t_one,
                    "max_relative_error_vs_individual": max(errors), "checked": len(errors)},
    }
    print(json.dumps(out, indent=2) if args.json else
          f"scan: Spearman {out['scan']['spearman_vs_exact']:.4f}, top-20 error {top_error:.2e}, "
          f"{out['scan']['seconds_over_one_estimate']:.2f}× one estimate; top-10 moves held-out outputs "
          f"{out['scan']['top_vs_random_ratio']:.1f}× random-10\n"
          f"queries: 100 in {out['queries']['time_100_over_1']:.2f}× one estimate, max error "
          f"{out['queries']['max_relative_error_vs_individual']:.1e}")


if __name__ == "__main__":
    main()
