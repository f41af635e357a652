"""Are the 2000-image run's flipped/shifted copies near-duplicates of their originals in gradient space?

    PYTHONPATH=src python docs/runs/audit-scale/copies_check.py > docs/runs/audit-scale/log-copies.txt

Reads the first refinement round's iterate of ``audit_scale.py --sizes 2000 --path nystrom --rank 500`` (its
resumable state, ``state/scan-2000-nystrom.state-refine1``, gitignored: X ≈ the 110 points' 1100 columns of
``(GGᵀ)⁺`` at residual 0.057).  For each refined point k (images k and k ± 1000 are an original and its copy): the
squared mass of its K columns on its own K rows, on its copy's, and on the most coupled other point's.  Where
copies were near-duplicates, the copy's share would rival the point's own.
"""

from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
state = torch.load(HERE / "state" / "scan-2000-nystrom.state-refine1", weights_only=False)
X, n, K = state["X"], 2000, 10
points = (X.abs().argmax(0) // K).reshape(-1, K)
assert bool((points == points[:, :1]).all()), "each point's K columns peak on its own rows"
points = points[:, 0]
mass = X.reshape(n, K, len(points), K).pow(2).sum((1, 3))  # (n, points): each point's columns' mass on every point
own, twin, other = [], [], []
for c, k in enumerate(points.tolist()):
    copy = k + 1000 if k < 1000 else k - 1000
    column = mass[:, c].clone()
    own.append(float(column[k]))
    twin.append(float(column[copy]))
    column[[k, copy]] = 0
    other.append(float(column.max()))
own, twin, other = map(torch.tensor, (own, twin, other))
total = mass.sum(0)
print(f"{len(points)} refined points (residual {state['residual']:.3g} after {state['done']} iterations)")
print(f"copy / own: median {float((twin / own).median()):.3g}, max {float((twin / own).max()):.3g}")
print(f"most coupled other / own: median {float((other / own).median()):.3g}, max {float((other / own).max()):.3g}")
print(f"own / all: median {float((own / total).median()):.3g}; copy / all: median {float((twin / total).median()):.3g}")
