"""Block CG against per-column CG for the Nyström scan's refinement, on ResNet-56's exact Gram matrix.

    PYTHONPATH=src python docs/runs/audit-scale/block_cg_check.py --n 200 --checkpoint /tmp/gram-200.pt

The shared ResNet-56 on the first n shared CIFAR-10 training images, K = 10: the exact centred Gram matrix GGᵀ
(``gram_matrix``, streamed, resumable from ``--checkpoint``), then for each (sketch rank, points refined) the
Nyström preconditioner built from it as ``nystrom_inverse`` builds it from Jacobian passes (the same Ω, seed 0,
centred, one power iteration, the same ``rcond``, its exact diagonal blocks) and the refinement's system
``GGᵀ X = the centred columns of the points' outputs``, solved to relative residual 0.1 (the scan's) and 0.01 by
:func:`setsens.gram.block_pcg` and by per-column preconditioned CG (the solver ``gram_solve`` ran until 2026-12-06,
kept below as the comparison).  Products are with the held matrix (float64), so the iteration counts are the
solvers'; on the Jacobian path each iteration costs two Jacobian passes either way.  The configurations keep the
ratios of the n = 1000 run (refine-1000.json: rank 497 of 10 000 rows, 110 points = 1100 columns, 14 per-column
iterations) at n = 200: rank 100 and 22 points.  Writes ``block-cg-<n>.json`` beside this file.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2] / "benchmarks"))
from audit_scale import DATA, images  # noqa: E402

from setsens.gram import NystromInverse, _pinv_psd, block_pcg, center_gram, gram_matrix, plan  # noqa: E402
from setsens.models.resnet import load_cifar_resnet  # noqa: E402
from setsens.problem import Problem, center_classes, cross_entropy  # noqa: E402


def per_column_pcg(A, precondition, rhs, rtol, maxiter):
    """Independent preconditioned CG on every column (the refinement's solver before block CG)."""
    scale = rhs.norm(dim=0)
    X, R = torch.zeros_like(rhs), rhs.clone()
    Z = precondition(R)
    D, rz, history = Z.clone(), (R * Z).sum(0), []
    while (not history or history[-1] > rtol) and len(history) < maxiter:
        Q = A @ D
        curvature = (D * Q).sum(0)
        alpha = torch.where(curvature > 0, rz / curvature, 0.0)
        X, R = X + D * alpha, R - Q * alpha
        Z = precondition(R)
        rz, previous = (R * Z).sum(0), rz
        D = Z + D * torch.where(previous > 0, rz / previous, 0.0)
        history.append(float((R.norm(dim=0) / scale).max()))
    return history


def sketch(M, n, k, rank, rcond):
    """``nystrom_inverse``'s preconditioner, its products with G replaced by products with the held GGᵀ."""
    omega = torch.randn(rank, n * k, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    omega = center_classes(omega.reshape(rank, n, k)).reshape(rank, n * k)
    omega = torch.linalg.qr((omega @ M).T)[0].T  # one power iteration
    Y = omega @ M
    V, inv, _ = _pinv_psd(Y @ omega.T, rcond)
    blocks = torch.stack([M[i * k:(i + 1) * k, i * k:(i + 1) * k] for i in range(n)])
    return NystromInverse(blocks, Y.T @ (V * inv.sqrt()), rcond, centered=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--checkpoint", default=None, help="where the Gram matrix's panels are saved")
    parser.add_argument("--configs", default="500:40,200:22,100:22,50:11", help="rank:points, comma-separated")
    args = parser.parse_args()
    problem = Problem(load_cifar_resnet(DATA / "resnet56-cifar10.th", 56), cross_entropy, images(args.n),
                      batch_size=20)
    M = center_gram(gram_matrix(problem, True, plan(args.n, 10, problem.p, 4).panel, checkpoint=args.checkpoint),
                    args.n)
    n, N = args.n, M.shape[0]
    k = N // n
    rcond = max(N * torch.finfo(torch.float64).eps, (N * torch.finfo(torch.float32).eps) ** 2)  # GramFactor's
    eig = torch.linalg.eigvalsh(M)
    kept = eig[eig > rcond * eig[-1]]
    out = {"model": "resnet56", "n": n, "K": k, "p": problem.p, "rcond": rcond,
           "gram_eigenvalues": {"max": float(eig[-1]), "min_kept": float(kept[0]), "kept": len(kept)}, "runs": []}
    for config in args.configs.split(","):
        rank, points = map(int, config.split(":"))
        precondition = (lambda P: lambda R: P.apply(R.T).T)(sketch(M, n, k, rank, rcond))
        chosen = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:points]
        rows = (chosen[:, None] * k + torch.arange(k)).reshape(-1)
        rhs = torch.zeros(N, len(rows), dtype=torch.float64)
        rhs[rows, torch.arange(len(rows))] = 1.0
        rhs = center_classes(rhs.T.reshape(len(rows), n, k)).reshape(len(rows), N).T
        for rtol in (0.1, 0.01):
            block = []
            block_pcg(lambda D: M @ D, precondition, rhs, rtol, 100, None, lambda s: block.append(s["residual"]))
            column = per_column_pcg(M, precondition, rhs, rtol, 100)
            run = {"rank": rank, "points": points, "columns": len(rows), "rtol": rtol,
                   "block_iterations": len(block), "per_column_iterations": len(column),
                   "block_residuals": block, "per_column_residuals": column}
            out["runs"].append(run)
            print(f"rank {rank}, {points} points, rtol {rtol}: block {len(block)} iterations, per column "
                  f"{len(column)}", flush=True)
    (HERE / f"block-cg-{n}.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
