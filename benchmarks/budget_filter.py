"""The budget response's filter φ_T(𝒢)∇φ on the shared ResNet-56: exact from the Gram factor against Lanczos.

    PYTHONPATH=src python benchmarks/budget_filter.py --json docs/runs/budget-filter/budget_filter.json

The zoo's problem (examples/zoo/resnet.py: 50 shared CIFAR-10 training images, 200 held-out), the training the
audit's budget reference runs (``--retrain-steps`` T, full-batch Nesterov SGD, lr 1/λ_max(H)).  For ``--targets``
held-out margins φ: ``u = φ_T(𝒢)∇φ`` by :func:`setsens.filters.budget_filter` from the exact Gram factor (its
Gauss–Newton spectrum, built once) and by Lanczos at each ``--ranks``; prints each Lanczos answer's relative
distance from the exact one (it shrinks as the rank grows if both are right) and the seconds of each, and the
first-order certificate of the budget response per held-out point (``--certify`` points).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "zoo"))

from setsens.audit import GramFactor  # noqa: E402
from setsens.certificate import first_order_certificate  # noqa: E402
from setsens.filters import budget_filter  # noqa: E402
from setsens.finetune import Training, resolve_lr  # noqa: E402
from setsens.models.resnet import load_cifar_resnet  # noqa: E402
from setsens.poisoning import margin  # noqa: E402
from setsens.problem import Problem, cross_entropy  # noqa: E402
from setsens.report import write_text  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="T of the budget response (the audit's --retrain-steps)")
    parser.add_argument("--lr", type=float, help="the fine-tuning's lr (default 1/λ_max(H) by resolve_lr)")
    parser.add_argument("--targets", type=int, default=2)
    parser.add_argument("--ranks", default="20,40,80")
    parser.add_argument("--certify", type=int, default=2, help="held-out points certified (0: none)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import resnet as zoo

    x, y, x_test, _ = zoo.data()
    problem = Problem(load_cifar_resnet(zoo.SUBSET.parent / "resnet56-cifar10.th", 56), cross_entropy, (x, y))
    t0 = time.perf_counter()
    training = resolve_lr(problem, Training(steps=args.steps, lr=args.lr))
    t_lr = time.perf_counter() - t0
    t0 = time.perf_counter()
    factor = GramFactor(problem)
    t_factor = time.perf_counter() - t0
    t0 = time.perf_counter()
    mu, _ = factor.gauss_newton_spectrum
    t_spectrum = time.perf_counter() - t0
    exact = budget_filter(problem, training, factor=factor)
    ranks = [int(r) for r in args.ranks.split(",")]
    rows = []
    for t in range(args.targets):
        g = torch.func.grad(margin(problem, x_test[t]))(problem.params)
        t0 = time.perf_counter()
        u = exact(g)
        row = {"target": t, "exact_seconds": time.perf_counter() - t0, "lanczos": []}
        for rank in ranks:
            t0 = time.perf_counter()
            v = budget_filter(problem, training, rank=rank)(g)
            seconds = time.perf_counter() - t0
            row["lanczos"].append({"rank": rank, "seconds": seconds,
                                   "seconds_over_exact": seconds / row["exact_seconds"],
                                   "relative_distance": float((v - u).norm() / u.norm())})
            print(f"target {t}: Lanczos {rank}: ‖u_L − u‖/‖u‖ = {row['lanczos'][-1]['relative_distance']:.3g}, "
                  f"{seconds:.1f} s = {seconds / row['exact_seconds']:.0f}× the exact filter's "
                  f"{row['exact_seconds']:.2f} s", flush=True)
        rows.append(row)
    out = {"model": "resnet56 (shared checkpoint)", "n": problem.n, "p": problem.p, "K": factor.k,
           "threads": torch.get_num_threads(), "training": training.describe(), "lr": training.lr,
           "lr_seconds": t_lr, "factor_seconds": t_factor, "spectrum_seconds": t_spectrum,
           "gauss_newton_rank": len(mu), "mu_max": float(mu.max()), "mu_min": float(mu.min()), "targets": rows}
    if args.certify:
        t0 = time.perf_counter()
        cert = first_order_certificate(problem, x_test[:args.certify], [0.0], 10, factor, training=training)
        seconds = time.perf_counter() - t0
        out["certificate"] = {"held_out": args.certify, "seconds_per_point": seconds / args.certify,
                              "radius": cert.radius.tolist()}
        print(f"first-order certificate of the budget response: {seconds / args.certify:.1f} s a held-out point "
              f"(radius {statistics.median(cert.radius.tolist()):.3g} of ‖x_k‖, median)", flush=True)
    print(json.dumps({k: v for k, v in out.items() if k != "targets"}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.json, json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
