"""The Nyström scan's refinement on ResNet-56 against the exact scan of the same images (issue #24's accuracy).

    PYTHONPATH=src python docs/runs/audit-scale/refine_check.py --n 200 --rank 500

The shared ResNet-56 on the first n shared CIFAR-10 training images, K = 10: the exact κ from the streamed Gram
matrix (``GramFactor(path="streamed")``, equal to the dense factor to rounding: tests/core/test_gram.py), then the
Nyström factor of rank ``--rank`` and its scan, before (``refine=0``) and after its refinement by preconditioned
CG (``scan``'s rounds: the sketch's top ``--refine`` points and ``--sample`` random ones, then any the rule names;
defaults ``scan``'s).  Writes ``refine-<n><--suffix>.json`` beside this file: Spearman and
the largest relative error on the exact top 20, for the sketch and for the refined scan, where the sketch ranks
the exact top 20 (how many points the refinement needs to hold them all), the CG residual, the seconds and both
κ (the sketch's figures first, with ``"refined": null``, so a run cut off while refining keeps them).
The exact κ is written to ``kappa-exact-<n>.json`` as soon as it is known and read back on a rerun, so a run cut
off during the sketch or the refinement does not repeat the exact scan.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2] / "benchmarks"))
from audit_scale import DATA, images, load_exact, save_exact, spearman, top20_error  # noqa: E402

from setsens.audit import GramFactor, scan  # noqa: E402
from setsens.gram import REFINE_POINTS, REFINE_SAMPLE  # noqa: E402
from setsens.models.resnet import load_cifar_resnet  # noqa: E402
from setsens.problem import Problem, cross_entropy  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--rank", type=int, default=500)
    parser.add_argument("--refine", type=int, default=REFINE_POINTS, help="the sketch's top points to refine first")
    parser.add_argument("--sample", type=int, default=REFINE_SAMPLE, help="random points refined with them")
    parser.add_argument("--suffix", default="", help="added to the JSON file's name (refine-<n><suffix>.json)")
    args = parser.parse_args()
    problem = Problem(load_cifar_resnet(DATA / "resnet56-cifar10.th", 56), cross_entropy, images(args.n),
                      batch_size=20)
    t0 = time.perf_counter()
    log = lambda e: print(f"{e.stage} {e.done}/{e.total} {dict(e.info)} {time.perf_counter() - t0:.0f} s",  # noqa: E731
                          flush=True)
    if saved := load_exact(HERE, args.n):
        exact, t_exact = saved["kappa"], saved["seconds"]
    else:
        exact = scan(problem, GramFactor(problem, path="streamed", progress=log)).kappa.double()
        t_exact = time.perf_counter() - t0
        save_exact(HERE, args.n, exact, t_exact)
    t0 = time.perf_counter()
    factor = GramFactor(problem, path="nystrom", rank=args.rank, progress=log)
    t_sketch = time.perf_counter() - t0
    sketch = scan(problem, factor, refine=0).kappa.double()
    top = exact.argsort(descending=True)[:20]
    places = (sketch.argsort(descending=True).argsort()[top] + 1).tolist()  # 1 = the sketch's highest
    out = {"model": "resnet56", "n": args.n, "K": factor.k, "p": problem.p, "sketch_rank": factor.plan.rank,
           "threads": torch.get_num_threads(), "exact_seconds": t_exact, "sketch_seconds": t_sketch,
           "sketch": {"spearman_vs_exact": spearman(sketch, exact),
                      "top20_max_relative_error": top20_error(sketch, exact),
                      "places_of_exact_top20": places, "refine_to_hold_exact_top20": max(places)},
           "refined": None, "exact_reference": "the streamed exact scan of the same images "
                                               f"(GramFactor(path='streamed'), kappa-exact-{args.n}.json)",
           "kappa": {"sketch": sketch.tolist(), "refined": None}}
    name = f"refine-{args.n}{args.suffix}.json"
    write = lambda: (HERE / name).write_text(json.dumps(out, indent=1) + "\n")  # noqa: E731
    write()  # the sketch's figures stand even if the refinement is cut off
    t0 = time.perf_counter()
    refined = scan(problem, factor, refine=args.refine, sample=args.sample, progress=log)
    kappa = refined.kappa.double()
    out.update({"refine_seconds": time.perf_counter() - t0, "refine_residual": refined.refine_residual,
                "refine": args.refine, "sample": args.sample, "refined_points": len(refined.exact_points),
                "unresolved": refined.unresolved.tolist(),
                "exact_top20_refined": len(set(top.tolist()) & set(refined.exact_points.tolist())),
                "refined": {"spearman_vs_exact": spearman(kappa, exact),
                            "top20_max_relative_error": top20_error(kappa, exact)}})
    out["kappa"]["refined"] = kappa.tolist()
    print(json.dumps({k: v for k, v in out.items() if k != "kappa"}, indent=1))
    write()

if __name__ == "__main__":
    main()
