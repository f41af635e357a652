"""The retraining tolerance of ``setsens lipschitz``: the default against the former, tighter one.

For each seed, the default digits DFCNN is trained and the directions of the report are built;
the strongest ones (worst case, next singular directions, loss gradient) and one random direction
are retrained at the default steps with both settings of the L-BFGS stopping rule:
``‖∇L‖ ≤ max(10⁻³‖∇L(w, xᵖ)‖, floor · ‖∇L(w̄)‖)``, at most ``iter`` iterations.  Printed: each
ratio (set shift ÷ ‖Δx‖) under both settings and their relative difference, the two headline
figures (largest ratio at steps ≤ 0.1 %, worst-case ratio at the smallest step) per seed, and
their spread over the seeds.  Usage::

    python benchmarks/lipschitz_tolerance.py --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

from setsens.experiments.lipschitz import LipschitzConfig, _directions, _distance_fn, train_dfcnn
from setsens.lipschitz import DenseModulus, closed_form_modulus, empirical_modulus

SETTINGS = {"former": {"retrain_floor": 0.1, "retrain_iter": 5000}, "default": {}}
PLAN = [("worst", 1e-3), ("worst", 1e-4), ("singular-2", 1e-3), ("singular-3", 1e-3), ("gradient", 1e-3),
        ("random-0", 1e-3)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    a = parser.parse_args()
    headlines = {name: {"max": [], "worst": []} for name in SETTINGS}
    for seed in (int(s) for s in a.seeds.split(",")):
        cfg = LipschitzConfig(seed=seed)
        problem = train_dfcnn(cfg, log=lambda m: None)
        dm = DenseModulus(problem, tau=cfg.tau)
        net = dm.modulus("network", cfg.tau, n_directions=3, stability=False)
        dirs = _directions(problem, dm, net, cfg, closed_form_modulus(problem))
        ref = float(problem.points(dm.indices)[0].norm())
        print(f"seed {seed}: κ = {net.kappa:.4g}", flush=True)
        ratios = {}
        for name, over in SETTINGS.items():
            dist = _distance_fn(replace(cfg, **over), problem)
            for d, step in PLAN:
                t0 = time.perf_counter()
                rec = empirical_modulus(problem, {d: dirs[d]}, [step], ref, distance=dist)[0]
                ratios[name, d, step] = (rec.ratio, time.perf_counter() - t0)
            headlines[name]["max"].append(max(ratios[name, d, s][0] for d, s in PLAN))
            headlines[name]["worst"].append(ratios[name, "worst", min(s for d, s in PLAN if d == "worst")][0])
        for d, step in PLAN:
            (r0, t0), (r1, t1) = ratios["former", d, step], ratios["default", d, step]
            print(f"  {d:>10s} step {step:.0e}: former {r0:.4g} ({t0:.0f} s), default {r1:.4g} ({t1:.0f} s), "
                  f"difference {(r1 - r0) / r0:+.1%}", flush=True)
    for fig in ("max", "worst"):
        for name in SETTINGS:
            v = headlines[name][fig]
            print(f"{fig} ratio, {name}: per seed {', '.join(f'{x:.4g}' for x in v)}; spread (max − min) ÷ median "
                  f"{(max(v) - min(v)) / statistics.median(v):.1%}")


if __name__ == "__main__":
    main()
