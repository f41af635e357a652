"""How far one Jacobian pass of the scan (``setsens.gram.jacobian_products``) is from what this CPU can do.

    PYTHONPATH=src python docs/runs/audit-scale/pass_floor.py [--threads 2]

The shared ResNet-56 (K = 10) on a chunk of shared CIFAR-10 images, each timing the best of ``--repeats``:
- the per-sample Jacobian of a chunk (``per_sample_jacobian``, vmapped reverse passes, the scan's chunk of 16)
  against its floor: one batched forward and K reverse passes of the chunk's summed outputs (the same reverse
  work with no per-sample weight gradients kept, which the Jacobian cannot do with less);
- the products of the chunk's (16·K) × p Jacobian with m rows (m = 1100: the refinement's first round's
  columns), as the scan makes them — ``Gᵀ U`` accumulated into an (m, p) sum, ``G W`` as ``W @ Jᵀ`` — and
  ``Gᵀ U`` accumulated into a (p, m) sum instead and ``G W`` from such a sum's transpose, in GFLOP/s, against
  a square float32 product's rate.
Prints the figures; the per-pass costs at n images are n/16 times the chunk's.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2] / "benchmarks"))
from audit_scale import DATA, images  # noqa: E402

from setsens.models.resnet import load_cifar_resnet  # noqa: E402
from setsens.operators import per_sample_jacobian  # noqa: E402
from setsens.problem import Problem, cross_entropy  # noqa: E402


def best(f, repeats: int) -> float:
    f()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--columns", type=int, default=1100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_cifar_resnet(DATA / "resnet56-cifar10.th", 56).eval()
    problem = Problem(model, cross_entropy, images(args.chunk), batch_size=args.chunk)
    x = next(iter(problem.batches()))[0]
    c, p = x.shape[0], problem.p
    jac = per_sample_jacobian(problem)
    J = jac(problem.params, x)
    k = J.shape[1]
    jacobian = best(lambda: jac(problem.params, x), args.repeats)
    weights = list(model.parameters())

    def reverse():
        out = model(x)
        for j in range(k):
            torch.autograd.grad(out[:, j].sum(), weights, retain_graph=j < k - 1)

    floor = best(reverse, args.repeats)
    print(f"ResNet-56, p = {p}, K = {k}, chunk {c}, {args.threads} threads")
    print(f"per-sample Jacobian: {jacobian / c * 1e3:.1f} ms per image; one forward and {k} summed reverse passes: "
          f"{floor / c * 1e3:.1f} ms per image (ratio {jacobian / floor:.2f})")
    J = J.reshape(-1, p)
    left = torch.randn(args.columns, J.shape[0])
    out = torch.zeros(args.columns, p)
    back = best(lambda: out.addmm_(left, J), args.repeats)
    right = torch.randn(args.columns, p)
    forth = best(lambda: right @ J.T, args.repeats)
    out = torch.zeros(p, args.columns)
    transposed = best(lambda: out.addmm_(J.T, left.T), args.repeats)
    forth_transposed = best(lambda: out.T @ J.T, args.repeats)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    peak = 2 * 2048 ** 3 / best(lambda: a @ b, args.repeats) / 1e9
    flops = 2 * args.columns * J.shape[0] * p / 1e9
    print(f"a 2048² float32 product: {peak:.0f} GFLOP/s; with {args.columns} rows, per image and rate:")
    for name, seconds in (("Gᵀ U into (m, p)", back), ("G W", forth), ("Gᵀ U into (p, m)", transposed),
                          ("G W from (p, m)ᵀ", forth_transposed)):
        print(f"  {name}: {seconds / c * 1e3:.1f} ms, {flops / seconds:.0f} GFLOP/s")
    print(f"so one CG iteration (two passes) with {args.columns} columns at 4000 images: Jacobians "
          f"{2 * 4000 * jacobian / c:.0f} s, products {4000 * (back + forth) / c:.0f} s")


if __name__ == "__main__":
    main()
