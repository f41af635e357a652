"""The poisoning audit's scan at ResNet scale: time and peak memory against n, the streamed (exact) Gram
factor against the dense one where G fits.

    python benchmarks/audit_scale.py --sizes 250,500,1000 --exact 200 --json docs/runs/audit-scale/audit_scale.json

Each size runs in its own process (so its peak resident memory is its own): the shared ResNet-56 on the
first n shared CIFAR-10 training images — beyond the 1000 shared images, horizontally flipped and
randomly shifted copies of them (timing only; said in the output) — and ``Audit(problem).scan()`` with
the factor path the memory plan picks.  At ``--exact`` images the dense factor (G held) is the reference
of the streamed one: Spearman of κ and the largest relative error on the top 20.  ``time_exponent`` is
the log–log slope of the scan's seconds against n.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def images(n: int, seed: int = 0):
    """The first n shared training images; past 1000, flipped and shifted copies (for timing)."""
    from setsens.data.cifar import load_cifar10_npz

    x, y = load_cifar10_npz(DATA / "cifar10-subset.npz")
    g = torch.Generator().manual_seed(seed)
    xs, ys = [x], [y]
    while sum(len(a) for a in xs) < n:
        flipped = x.flip(-1)
        dx, dy = torch.randint(-4, 5, (2,), generator=g).tolist()
        xs.append(torch.roll(flipped, shifts=(dy, dx), dims=(-2, -1)))
        ys.append(y)
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def one(n: int, path: str, memory: int, out: str) -> None:
    """Scan n images on ``path`` in this process; write seconds, peak RSS and κ to ``out`` (torch file)."""
    from setsens.audit import Audit, GramFactor
    from setsens.models.resnet import load_cifar_resnet
    from setsens.problem import Problem, cross_entropy

    model = load_cifar_resnet(DATA / "resnet56-cifar10.th", 56)
    problem = Problem(model, cross_entropy, images(n), batch_size=20)
    t0 = time.perf_counter()
    factor = GramFactor(problem, path=path, memory=memory,
                        progress=lambda e: print(f"  n={n}: {e.stage} {e.done}/{e.total}, "
                                                 f"{time.perf_counter() - t0:.0f} s", flush=True))
    result = Audit(problem, factor).scan()
    seconds = time.perf_counter() - t0
    torch.save({"n": n, "p": problem.p, "K": factor.k, "path": factor.plan.path, "panel": factor.plan.panel,
                "seconds": seconds, "factor_seconds": factor.seconds, "rank": factor.rank,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "kappa": result.kappa}, out)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def top20_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    top = exact.argsort(descending=True)[:20]
    return float(((approx[top] - exact[top]).abs() / exact[top]).max())


def run(n: int, path: str, memory: int, tmp: Path) -> dict:
    out = tmp / f"scan-{n}-{path}.pt"
    subprocess.run([sys.executable, __file__, "--one", str(n), "--path", path, "--memory", str(memory / 1e9),
                    "--out", str(out)], check=True)
    return torch.load(out, weights_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="250,500,1000")
    parser.add_argument("--exact", type=int, default=200, help="n at which the dense factor is the reference")
    parser.add_argument("--memory", type=float, default=12.0, help="GB the scan may hold")
    parser.add_argument("--json", default=str(ROOT / "docs/runs/audit-scale/audit_scale.json"))
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--path", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    memory = int(args.memory * 1e9)
    if args.one:
        return one(args.one, args.path, memory, args.out)
    tmp = Path(args.json).parent / "state"
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.exact:
        print(f"n={args.exact}: dense factor (G held) against the streamed one…", flush=True)
        dense, streamed = run(args.exact, "dense", 10**12, tmp), run(args.exact, "streamed", memory, tmp)
        rows.append({"model": "resnet56", "n": args.exact, "p": streamed["p"], "K": streamed["K"], "path": "streamed",
                     "seconds": streamed["seconds"], "peak_rss_bytes": streamed["peak_rss_bytes"],
                     "spearman_vs_exact": spearman(streamed["kappa"], dense["kappa"]),
                     "top20_max_relative_error": top20_error(streamed["kappa"], dense["kappa"]),
                     "exact_reference": f"dense factor (G held), {dense['seconds']:.0f} s, "
                                        f"{dense['peak_rss_bytes'] / 1e9:.1f} GB peak",
                     "peer": None, "peer_seconds": None})
    for n in [int(s) for s in args.sizes.split(",") if s]:
        print(f"n={n}…", flush=True)
        r = run(n, "auto", memory, tmp)
        rows.append({"model": "resnet56", "n": n, "p": r["p"], "K": r["K"], "path": r["path"], "panel": r["panel"],
                     "seconds": r["seconds"], "peak_rss_bytes": r["peak_rss_bytes"], "rank": r["rank"],
                     "data": "shared images" if n <= 1000 else "shared images + flipped/shifted copies (timing)",
                     "spearman_vs_exact": None, "top20_max_relative_error": None,
                     "exact_reference": "the streamed factor is exact (equal to the dense one to rounding: "
                                        "tests/core/test_gram.py, and the row at n = --exact)",
                     "peer": None, "peer_seconds": None})
        print(f"  {r['path']}: {r['seconds']:.0f} s, peak {r['peak_rss_bytes'] / 1e9:.1f} GB", flush=True)
    timed = sorted({(row["n"], row["seconds"]) for row in rows if row["path"] == "streamed"})
    exponent = None
    if len(timed) >= 2:
        xs, ys = [math.log(n) for n, _ in timed], [math.log(s) for _, s in timed]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        exponent = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    record = {"time_exponent": exponent, "threads": torch.get_num_threads(), "runs": rows}
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "runs"}), flush=True)


if __name__ == "__main__":
    main()
