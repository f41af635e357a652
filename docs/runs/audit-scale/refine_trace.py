"""How the refined Nyström scan's κ approach the exact ones, iteration by iteration of its first round's block CG.

    PYTHONPATH=src python docs/runs/audit-scale/refine_trace.py --n 250 \
        --state docs/runs/audit-scale/state/scan-250-nystrom.state

The shared ResNet-56 on the first n shared CIFAR-10 training images, K = 10, the rank-500 sketch that
``audit_scale.py --path nystrom --rank 500`` built (taken from its ``--state`` checkpoint, or built there), and the
scan's first refinement round (the sketch's top 100 and 10 drawn points, their 1100 centred columns of
``(GGᵀ)⁺`` by :func:`setsens.gram.block_pcg` preconditioned with the sketch, the same products as ``gram_solve``).
After each iteration: the largest relative residual, and the κ of the 110 points read from the iterate X (the block
Xᵀ·rhs, the Galerkin approximation of their block of ``(GGᵀ)⁺``, which grows with every iteration) against the
exact streamed scan's κ (``kappa-exact-<n>.json``): the largest relative error among the 110; the scan's estimate
of it (:func:`setsens.gram.block_error`, the stopping rule of ``GramFactor.refine``: ``error_estimate``, and per
point the largest ratio of true error to estimate, ``worst_true_over_estimate``); an older candidate, the κ of
the block plus ``RᵀPR`` (the Galerkin gap ``RᵀA⁺R`` with the sketch's P for A⁺, ``gap_estimate``); and the top-20
relative error of the scan that would stop there (the sketch's κ for the other points).  Writes
``refine-trace-<n>.json`` beside this file.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2] / "benchmarks"))
from audit_scale import DATA, images, spearman, top20_error  # noqa: E402

from setsens.audit import REFINE_POINTS, REFINE_SAMPLE, GramFactor, input_jacobians, scan  # noqa: E402
from setsens.gram import block_error, block_pcg, jacobian_products, point_blocks  # noqa: E402
from setsens.models.resnet import load_cifar_resnet  # noqa: E402
from setsens.problem import Problem, cross_entropy  # noqa: E402
from setsens.report import write_json  # noqa: E402


def kappas(block: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """σ_max(B^½ A_k) for per-point blocks B (m, K, K) and input Jacobians A (m, K, d)."""
    lam, U = torch.linalg.eigh((block + block.transpose(1, 2)) / 2)
    root = (U * lam.clamp(min=0).sqrt()[:, None, :]) @ U.transpose(1, 2)
    return torch.linalg.matrix_norm(root @ A.to(root), ord=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--state", required=True, help="the sketch's checkpoint (audit_scale.py's state file)")
    parser.add_argument("--rank", type=int, default=500)
    parser.add_argument("--iterations", type=int, default=8)
    args = parser.parse_args()
    exact = torch.tensor(json.loads((HERE / f"kappa-exact-{args.n}.json").read_text())["kappa"], dtype=torch.float64)

    model = load_cifar_resnet(DATA / "resnet56-cifar10.th", 56)
    problem = Problem(model, cross_entropy, images(args.n), batch_size=20)
    t0 = time.perf_counter()
    # audit_scale's fixed 12 GB budget: with "auto" the rank (and the checkpoint's key) would follow the free memory
    factor = GramFactor(problem, path="nystrom", rank=args.rank, memory=int(12e9), checkpoint=args.state)
    sketch = scan(problem, factor, refine=0).kappa.double()
    print(f"n={args.n}: sketch ready ({time.perf_counter() - t0:.0f} s); sketch top-20 error "
          f"{top20_error(sketch, exact):.3g}", flush=True)

    order = sketch.argsort(descending=True)  # the scan's first round
    rest = order[REFINE_POINTS:]
    drawn = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(0))[:REFINE_SAMPLE]]
    points = torch.cat([order[:REFINE_POINTS], drawn]).sort().values
    k = factor.k
    rows = (points[:, None] * k + torch.arange(k)).reshape(-1)
    rhs = torch.zeros(factor.shape[1], len(rows), dtype=torch.float64)
    rhs[rows, torch.arange(len(rows))] = 1.0
    rhs = factor.rows(rhs.T.reshape(len(rows), problem.n, k)).T
    A = input_jacobians(problem, points)

    def gram(X):
        back = jacobian_products(problem, factor.centered, left=X.T)[1]
        return jacobian_products(problem, factor.centered, right=back)[0].double().T

    trace, start = [], time.perf_counter()
    own = point_blocks(rhs[rows], k)  # each point's centred identity: rhs is zero off the point's own rows

    def error(X, memory):  # GramFactor.refine's stopping rule
        return block_error(own.transpose(1, 2) @ point_blocks(X[rows], k), memory)

    def saved(state):
        R, memory = state["R"], state["memory"]
        blocks, gap = memory["blocks"], point_blocks(R.T @ factor.gram_inverse.apply(R.T).T, k)
        refined = kappas(blocks, A)
        true = (exact[points] - refined) / exact[points]
        tail = memory.get("tail")
        kappa = sketch.clone()
        kappa[points] = refined
        row = {"iteration": state["done"], "residual": state["residual"], "seconds": time.perf_counter() - start,
               "max_error_refined": float(true.abs().max()), "error_estimate": state["error"],
               "worst_true_over_estimate": None if tail is None else float((true / tail).max()),
               "gap_estimate": float((kappas(blocks + gap, A) / refined - 1).max()),
               "top20_error": top20_error(kappa, exact), "spearman": spearman(kappa, exact)}
        trace.append(row)
        print(f"  iteration {row['iteration']}: residual {row['residual']:.3g}, error among the 110 "
              f"{row['max_error_refined']:.3g} (estimated {state['error']:.3g}, worst true/estimate "
              f"{row['worst_true_over_estimate']}), top-20 {row['top20_error']:.3g} ({row['seconds']:.0f} s)",
              flush=True)
        write_json(HERE / f"refine-trace-{args.n}.json", {  # after every iteration: a stopped run keeps its rows
            "model": "resnet56", "n": args.n, "K": k, "sketch_rank": factor.plan.rank, "points": len(points),
            "exact_top20_in_round": int(torch.isin(exact.argsort(descending=True)[:20], points).sum()),
            "threads": torch.get_num_threads(), "sketch_top20_error": top20_error(sketch, exact), "trace": trace})

    block_pcg(gram, lambda R: factor.gram_inverse.apply(R.T).T, rhs, 0.0, args.iterations, saved=saved, error=error)


if __name__ == "__main__":
    main()
