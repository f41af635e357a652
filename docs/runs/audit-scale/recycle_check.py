"""Whether a second refinement round gains from the first's directions (block CG deflated by them), on ResNet-56's
exact Gram matrix.

    PYTHONPATH=src python docs/runs/audit-scale/recycle_check.py --n 1000 \
        --gram docs/runs/audit-scale/state/gram-1000.pt --scan docs/runs/audit-scale/state/scan-1000-nystrom.pt

The shared ResNet-56 on the first n shared CIFAR-10 training images, K = 10: the exact centred Gram matrix M = GGᵀ
(``spectrum_check.py``'s checkpoint, ``--gram``), the scan's rank-500 preconditioner built from it as
``nystrom_inverse`` builds it from Jacobian passes (``block_cg_check.sketch``), and two rounds of the refinement's
system (``GGᵀ X = the centred columns of the points' outputs``) solved by :func:`setsens.gram.block_pcg` with the
scan's stopping rule (:func:`setsens.gram.block_error` at 1 %): the first round the 110 points the benchmark's scan
refined (``--scan``: its ``exact_points``), the second the 20 points its sketch ranks highest among the others —
once afresh and once from the first round's directions (``basis``).  Products are with the held matrix, so the
iteration counts are the solver's; on the Jacobian path each costs two Jacobian passes.  Against the exact blocks (a
solve to residual 1e-11): the largest relative rise left in a point's block (:func:`setsens.gram.relative_rise`, a
bound on every κ's relative error).  Writes ``recycle-<n>.json`` beside this file.
"""

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from block_cg_check import sketch  # noqa: E402

from setsens.gram import REFINE_TOL, block_error, block_pcg, center_gram, point_blocks, relative_rise  # noqa: E402
from setsens.problem import center_classes  # noqa: E402
from setsens.report import write_json  # noqa: E402


def columns(points: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of the points' outputs and the centred unit columns on them, as ``GramFactor.refine`` builds them."""
    rows = (points[:, None] * k + torch.arange(k)).reshape(-1)
    rhs = torch.zeros(n * k, len(rows), dtype=torch.float64)
    rhs[rows, torch.arange(len(rows))] = 1.0
    return rows, center_classes(rhs.T.reshape(len(rows), n, k)).reshape(len(rows), n * k).T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--gram", required=True, help="the exact Gram matrix's checkpoint (spectrum_check.py's)")
    parser.add_argument("--scan", required=True, help="the benchmark's scan of the same n (audit_scale.py's .pt)")
    parser.add_argument("--rank", type=int, default=500)
    parser.add_argument("--second", type=int, default=20)
    args = parser.parse_args()
    n, k = args.n, 10
    M = center_gram(torch.load(args.gram, weights_only=True)["M"], n)
    N = n * k
    rcond = max(N * torch.finfo(torch.float64).eps, (N * torch.finfo(torch.float32).eps) ** 2)  # GramFactor's
    P = sketch(M, n, k, args.rank, rcond)
    scanned = torch.load(args.scan, weights_only=True)
    first = scanned["exact_points"].sort().values
    others = scanned["kappa_sketch"].argsort(descending=True)
    second = others[~torch.isin(others, first)][:args.second].sort().values
    gram, precondition = (lambda D: M @ D), (lambda R: P.apply(R.T).T)
    out = {"model": "resnet56", "n": n, "K": k, "rank": args.rank, "tol": REFINE_TOL, "rounds": []}

    def solve(points, basis=None, keep=0, label=""):
        rows, rhs = columns(points, n, k)
        own = point_blocks(rhs[rows], k).transpose(1, 2)
        exact = own @ point_blocks(block_pcg(gram, precondition, rhs, 1e-11, 300).X[rows], k)
        history = []

        def error(X, memory):
            estimate, memory = block_error(own @ point_blocks(X[rows], k), memory)
            true = float(relative_rise(own @ point_blocks(X[rows], k), exact).max())
            history.append({"estimate": estimate, "true": true})
            return estimate, memory

        result = block_pcg(gram, precondition, rhs, 1e-10, 50, error=error, tol=REFINE_TOL, basis=basis, keep=keep)
        row = {"round": label, "points": len(points), "recycled_columns": 0 if basis is None else basis[0].shape[1],
               "iterations": result.iterations, "residual": result.residual, "history": history}
        out["rounds"].append(row)
        print({key: value for key, value in row.items() if key != "history"}, history[-1], flush=True)
        write_json(HERE / f"recycle-{n}.json", out)
        return result

    earlier = solve(first, keep=n * k // 2, label="first (the scan's 110 points)")
    solve(second, label="second, afresh")
    solve(second, basis=earlier.basis, label="second, from the first's directions")


if __name__ == "__main__":
    main()
