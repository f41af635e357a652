"""Whether the sketch's preconditioner gains from exact blocks of groups of points instead of single points.

    PYTHONPATH=src python docs/runs/audit-scale/group_check.py 500   # the sketch's rank

On the exact centred Gram matrix M of the first 1000 shared CIFAR-10 images under the shared ResNet-56
(``spectrum_check.py``'s checkpoint, state/gram-1000.pt), the scan's preconditioner is (LLᵀ + E)⁺ with LLᵀ the
rank-r Nyström sketch and E the exact per-point K × K blocks of what it leaves, R = M − LLᵀ.  Here E is replaced by
R's blocks over groups of g points (consecutive points — by class, the images being ordered by class —, points
grouped by the residual's own coupling ‖R_ij‖, an oracle, and by the sketch's features), and block CG solves for
the centred columns of 110 random points (``spectrum_check.py``'s), to a reference solved to 1e-11.  After each
iteration: the largest relative residual and the largest relative rise left in a point's block
(:func:`setsens.gram.relative_rise`, a bound on every κ's error).  Prints; log-group.txt holds the run of
2026-12-07 (stopped after the g = 16 rows of the first three groupings).
"""

import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2] / "benchmarks"))
sys.path.insert(0, str(HERE))
from audit_scale import images  # noqa: E402
from block_cg_check import sketch  # noqa: E402

from setsens.gram import _pinv_psd, block_pcg, center_gram, point_blocks, relative_rise  # noqa: E402
from setsens.problem import center_classes  # noqa: E402


def grouped(R, L, groups, k, rcond, scale):
    """``(LLᵀ + E)⁺`` as a function, E the blocks of R over ``groups`` of points (Woodbury)."""
    N = R.shape[0]
    Einv = torch.zeros(N, N, dtype=torch.float64)
    for g in groups:
        rows = (g[:, None] * k + torch.arange(k)).reshape(-1)
        Q, inverse, _ = _pinv_psd(R[rows][:, rows], rcond, scale)
        Einv[rows[:, None], rows] = (Q * inverse) @ Q.T
    EiL = Einv @ L
    S = torch.linalg.inv(torch.eye(L.shape[1], dtype=torch.float64) + L.T @ EiL)
    return lambda X: Einv @ X - EiL @ (S @ (EiL.T @ X))


def greedy(similarity, n, g):
    """Groups of g points: each the first point left and the g − 1 left most similar to it."""
    left, groups = torch.ones(n, dtype=torch.bool), []
    similarity = similarity.clone().fill_diagonal_(float("inf"))
    while left.any():
        first = int(torch.nonzero(left)[0])
        take = torch.where(left, similarity[first], -float("inf")).topk(min(g, int(left.sum()))).indices
        left[take] = False
        groups.append(take)
    return groups


def main() -> None:
    n, k = 1000, 10
    N = n * k
    rank = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    M = center_gram(torch.load(HERE / "state/gram-1000.pt", weights_only=True)["M"], n)
    _, y = images(n)
    rcond = max(N * torch.finfo(torch.float64).eps, (N * torch.finfo(torch.float32).eps) ** 2)  # GramFactor's
    per_point = sketch(M, n, k, rank, rcond)
    omega = torch.randn(rank, N, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    omega = center_classes(omega.reshape(rank, n, k)).reshape(rank, N)
    omega = torch.linalg.qr((omega @ M).T)[0].T  # one power iteration, as block_cg_check.sketch
    Y = omega @ M
    V, inverse, _ = _pinv_psd(Y @ omega.T, rcond)
    L = Y.T @ (V * inverse.sqrt())  # the sketch's L (NystromInverse does not keep it)
    R = M - L @ L.T
    scale = float(torch.linalg.eigvalsh(point_blocks(M, k)).max())
    coupling = R.reshape(n, k, n, k).square().sum((1, 3)).sqrt()  # ‖R_ij‖_F
    coupling = coupling / (coupling.diagonal()[:, None] * coupling.diagonal()[None, :]).sqrt()
    features = torch.nn.functional.normalize(L.reshape(n, -1), dim=1)
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:round(0.11 * n)]
    rows = (chosen[:, None] * k + torch.arange(k)).reshape(-1)
    rhs = torch.zeros(N, len(rows), dtype=torch.float64)
    rhs[rows, torch.arange(len(rows))] = 1.0
    rhs = center_classes(rhs.T.reshape(len(rows), n, k)).reshape(len(rows), N).T
    reference = block_pcg(lambda D: M @ D, lambda X: per_point.apply(X.T).T, rhs, 1e-11, 300)
    exact = point_blocks(rhs.T @ reference.X, k)
    print("reference residual", reference.residual, reference.iterations, flush=True)

    def trial(name, precondition):
        history, t0 = [], time.time()

        def saved(state):
            rise = relative_rise(point_blocks(rhs.T @ state["X"], k), exact)
            history.append((state["done"], round(state["residual"], 4), float(rise.max())))

        block_pcg(lambda D: M @ D, precondition, rhs, 1e-3, 12, None, saved)
        print(name, history, f"{time.time() - t0:.0f}s", flush=True)

    trial("point (current)", lambda X: per_point.apply(X.T).T)
    for g in (16, 64):
        trial(f"order g={g}", grouped(R, L, [torch.arange(s, min(s + g, n)) for s in range(0, n, g)], k, rcond, scale))
        by_class = torch.argsort(y, stable=True)
        trial(f"class g={g}", grouped(R, L, [by_class[s:s + g] for s in range(0, n, g)], k, rcond, scale))
        trial(f"oracle-residual g={g}", grouped(R, L, greedy(coupling, n, g), k, rcond, scale))
        trial(f"sketch-feature g={g}", grouped(R, L, greedy(features @ features.T, n, g), k, rcond, scale))


if __name__ == "__main__":
    main()
