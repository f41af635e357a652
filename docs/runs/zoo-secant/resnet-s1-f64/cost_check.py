"""What a float64 ResNet-56 chain costs on this CPU: seconds per fine-tuning step of the plain run, the tangent
(order 1), the secant tangent and the second-order tangent, in float32 and float64, on the zoo's ResNet-56
problem (50 CIFAR-10 images, seed 1's three moved points), one thread.

    PYTHONPATH=src OMP_NUM_THREADS=1 python docs/runs/zoo-secant/resnet-s1-f64/cost_check.py
"""

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT / "benchmarks"))

from zoo_tangent import load  # noqa: E402

from setsens.finetune import Training  # noqa: E402
from setsens.perturb import gradient_perturbation  # noqa: E402
from setsens.tangent import training_tangent  # noqa: E402


def per_step(fn, steps=(1, 2)) -> float:
    """Seconds per step: the difference of two run lengths (what a run costs besides its steps drops out)."""
    seconds = []
    for s in steps:
        t0 = time.perf_counter()
        fn(s)
        seconds.append(time.perf_counter() - t0)
    return (seconds[1] - seconds[0]) / (steps[1] - steps[0])


def main() -> None:
    rows = {}
    for dtype in ("float32", "float64"):
        problem, _ = load("resnet", ROOT / "docs/runs/zoo-secant/resnet-s1", dtype)
        idx = torch.randperm(problem.n, generator=torch.Generator().manual_seed(1))[:3]
        unit = gradient_perturbation(problem, idx, 0.01)
        kinds = {"tangent": dict(order=1), "secant": dict(order=1, secant=True), "second order": dict(order=2)}
        rows[dtype] = {kind: per_step(lambda s, kw=kw: training_tangent(problem, unit, Training(steps=s, lr=0.1),
                                                                        probes=0, **kw))
                       for kind, kw in kinds.items()}
        rows[dtype]["gradient"] = per_step(lambda s: [problem.gradient(problem.params) for _ in range(s)])
        print(dtype, {k: round(v, 2) for k, v in rows[dtype].items()}, flush=True)
    rows["float64 / float32"] = {k: rows["float64"][k] / rows["float32"][k] for k in rows["float32"]}
    rows["threads"] = torch.get_num_threads()
    print(json.dumps(rows, indent=2))
    (Path(__file__).parent / "cost.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
