"""First-order convergence of the Gauss–Newton estimate on the demo problem.

For one seed of the digits demo, and steps of 1 %, 0.3 % and 0.1 % of each point's norm: the
distance ratio (distance of the estimate to the new solution set ÷ that of w̄, by warm-started
Levenberg–Marquardt retraining) for the validated rule and for fixed iteration counts up to
convergence.  A first-order estimate's ratio shrinks in proportion to the step.  Usage::

    python benchmarks/step_sweep.py --seed 0
"""

from __future__ import annotations

import argparse

from setsens.experiments.demo import DemoConfig, movable_points, train_stationary
from setsens.perturb import gradient_perturbation
from setsens.retrain import levenberg_marquardt
from setsens.solution_set import SolveOptions, estimate


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", default="0.01,0.003,0.001")
    a = parser.parse_args()
    problem = train_stationary(DemoConfig(seed=a.seed))
    K = movable_points(problem, 10)
    for step in (float(s) for s in a.steps.split(",")):
        pert = gradient_perturbation(problem, K, step)
        d0 = levenberg_marquardt(problem, problem.params, pert).distance
        cells = [f"seed {a.seed}, step {100 * step:g} %: d(w̄) = {d0:.4f}"]
        for rule, iterations in (("validated", 1000), ("fixed", 300), ("fixed", 1000), ("fixed", 3000)):
            est = estimate(problem, pert, "gauss-newton", solve=SolveOptions(
                maxiter=iterations, rule=rule, rtol=1e-12, check_every=10, patience=10))
            ratio = levenberg_marquardt(problem, est.centre, pert).distance / d0
            cells.append(f"{rule} {iterations}: {ratio:.3f} (output residual {est.output_residual:.1e})")
        print(" | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
