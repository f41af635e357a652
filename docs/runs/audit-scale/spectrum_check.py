"""Why the refined scan's block CG needs more iterations as n grows: the preconditioned Gram matrix's spectrum.

    PYTHONPATH=src python docs/runs/audit-scale/spectrum_check.py --n 500 \
        --checkpoint docs/runs/audit-scale/state/gram-500.pt

The shared ResNet-56 on the first n shared CIFAR-10 training images, K = 10: the exact centred Gram matrix M = GGᵀ
(``gram_matrix``, streamed, resumable), and for its leading sub-matrices of m = n/4, n/2 and n points (the first m
images; ``--subsets`` others) the scan's preconditioner P (``block_cg_check.sketch``: the rank-r Nyström sketch of M
plus its exact per-point blocks, as ``nystrom_inverse`` builds it from Jacobian passes) with r = 500 (the scan's)
and r = m·K/20 (the ratio of the 1000-image run). For each: the eigenvalues of P^½ M P^½ on M's range — their spread
(the condition number), how many lie outside [½, 2] — and block CG's iterations to residual 0.5 and 0.1 for 11 % of
the points' columns (the 1000-image run's 110 of 1000). Writes ``spectrum-<n>.json`` beside this file.
"""

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2] / "benchmarks"))
sys.path.insert(0, str(HERE))
from audit_scale import DATA, images  # noqa: E402
from block_cg_check import sketch  # noqa: E402

from setsens.gram import block_pcg, center_gram, gram_matrix, plan, resumable_plan  # noqa: E402
from setsens.models.resnet import load_cifar_resnet  # noqa: E402
from setsens.problem import Problem, center_classes, cross_entropy  # noqa: E402
from setsens.report import write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--checkpoint", default=None, help="where the Gram matrix's panels are saved")
    parser.add_argument("--subsets", default=None, help="the m to study, comma-separated (default n/4, n/2, n)")
    args = parser.parse_args()
    subsets = [int(m) for m in args.subsets.split(",")] if args.subsets else [args.n // 4, args.n // 2, args.n]
    problem = Problem(load_cifar_resnet(DATA / "resnet56-cifar10.th", 56), cross_entropy, images(args.n),
                      batch_size=20)
    planned = resumable_plan(plan(args.n, 10, problem.p, 4), problem, args.checkpoint, 10, True, 0, 0, 0)
    full = center_gram(gram_matrix(problem, True, planned.panel, checkpoint=args.checkpoint), args.n)
    k = full.shape[0] // args.n
    out = {"model": "resnet56", "K": k, "p": problem.p, "rows": []}
    for m in subsets:
        N = m * k
        M = full[:N, :N]  # the first m images' Gram matrix (centred: the centring acts per point)
        rcond = max(N * torch.finfo(torch.float64).eps, (N * torch.finfo(torch.float32).eps) ** 2)  # GramFactor's
        lam, V = torch.linalg.eigh(M)
        keep = lam > rcond * lam[-1]
        basis = V[:, keep]  # M's range
        points = max(1, round(0.11 * m))
        chosen = torch.randperm(m, generator=torch.Generator().manual_seed(1))[:points]
        rows = (chosen[:, None] * k + torch.arange(k)).reshape(-1)
        rhs = torch.zeros(N, len(rows), dtype=torch.float64)
        rhs[rows, torch.arange(len(rows))] = 1.0
        rhs = center_classes(rhs.T.reshape(len(rows), m, k)).reshape(len(rows), N).T
        for rank in (min(500, N // 2), N // 20):
            P = sketch(M, m, k, rank, rcond)
            dense = P.apply(torch.eye(N, dtype=torch.float64))  # P, N × N
            mu, W = torch.linalg.eigh(basis.T @ dense @ basis)  # P on M's range, then P^½ M P^½ there
            root = basis @ (W * mu.clamp(min=0).sqrt()) @ W.T @ basis.T
            spectrum = torch.linalg.eigvalsh(basis.T @ root @ M @ root @ basis)
            iterations = {}
            for rtol in (0.5, 0.1):
                history = []
                block_pcg(lambda D: M @ D, lambda R: P.apply(R.T).T, rhs, rtol, 200, None,
                          lambda s: history.append(s["residual"]))
                iterations[str(rtol)] = len(history)
            row = {"m": m, "rows": N, "range": int(keep.sum()), "rank": rank, "columns": len(rows),
                   "gram_condition": float(lam[-1] / lam[keep][0]),
                   "preconditioned_condition": float(spectrum[-1] / spectrum[0]),
                   "outside_half_to_two": int(((spectrum < 0.5) | (spectrum > 2)).sum()),
                   "preconditioned_quantiles": [float(q) for q in
                                                spectrum.quantile(torch.tensor([0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0],
                                                                               dtype=torch.float64))],
                   "block_cg_iterations": iterations}
            out["rows"].append(row)
            print(row, flush=True)
            write_json(HERE / f"spectrum-{args.n}.json", out)


if __name__ == "__main__":
    main()
