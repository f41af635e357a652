"""The estimated set at ResNet-56 scale (p = 853 018), matrix-free, on the CPU.

Both forms on 32 shared CIFAR-10 images with 2 points moved 0.2 %: v₀, the validated radius, three
members (distinct, inside U) and the cost.  A scale check, not an accuracy study (10 iterations).
Usage::

    python benchmarks/resnet56_set.py [--n 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from setsens import Problem, RadiusOptions, SolveOptions, cross_entropy, estimate, gradient_perturbation
from setsens.data.cifar import load_cifar10
from setsens.models.resnet import load_cifar_resnet


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="../shared/data/resnet56-cifar10.th")
    parser.add_argument("--data", default="../shared/data/cifar10-subset.npz")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    x, y = load_cifar10(a.data, "train", n=a.n)
    problem = Problem(load_cifar_resnet(a.checkpoint, 56), cross_entropy, (x, y), batch_size=a.n)
    pert = gradient_perturbation(problem, [0, 1], 0.002)
    for method in ("gauss-newton", "hessian"):
        t0 = time.perf_counter()
        est = estimate(problem, pert, method, solve=SolveOptions(maxiter=10),
                       radius=RadiusOptions(directions=2, projection_maxiter=10))
        members = est.sample(3, torch.Generator().manual_seed(0))
        pair = torch.cdist(members, members)[~torch.eye(3, dtype=torch.bool)]
        print(f"{method}: p = {problem.p}, ‖v₀‖ = {float(est.shift.norm()):.3e}, ρ = {est.null_radius:.3e}, "
              f"r = {est.radius:.3e}, perturbed-risk ratio {est.perturbed_risk_ratio:.3f}, "
              f"members pairwise ≥ {float(pair.min()):.3e}, inside U: "
              f"{bool(((members - problem.params).norm(dim=1) <= est.radius).all())}, cost {est.cost}, "
              f"{time.perf_counter() - t0:.0f} s with sampling", flush=True)


if __name__ == "__main__":
    main()
