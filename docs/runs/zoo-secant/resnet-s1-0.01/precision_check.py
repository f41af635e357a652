# run from the repository root: PYTHONPATH=src python docs/runs/zoo-secant/resnet-s1-0.01/precision_check.py
"""ResNet-56, seed 1 of the zoo's moved points, at 0.01 %: is the float32 secant tangent rounding there?  Its
predicted change of the held-out outputs against the same secant tangent in float64 (same points, direction,
training and lr as the zoo's float32 run)."""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
from zoo_tangent import load  # noqa: E402

from setsens.analysis import predicted_change  # noqa: E402
from setsens.finetune import Training  # noqa: E402
from setsens.perturb import gradient_perturbation  # noqa: E402
from setsens.tangent import training_tangent  # noqa: E402
from setsens.verdict import tangent_precision  # noqa: E402

STEP, SEED = 0.01, 1
out = Path(__file__).resolve().parent / "precision.json"
lr = json.loads(Path("docs/runs/zoo-secant/resnet-s1/tangent.json").read_text())[0]["lr"]
training = Training(steps=100, lr=lr)
changes, record = {}, {"step_percent": STEP, "seed": SEED, "lr": lr, "train_steps": 100}
for dtype in ("float32", "float64"):
    problem, test = load("resnet", Path("docs/runs/zoo-tangent"), dtype)
    idx = torch.randperm(problem.n, generator=torch.Generator().manual_seed(SEED))[:3]
    t0 = time.perf_counter()
    secant = training_tangent(problem, gradient_perturbation(problem, idx, 0.01).scaled(STEP), training, secant=True,
                              probes=0)
    changes[dtype] = predicted_change(secant, test[0]).double().flatten()
    record[dtype] = {"precision": tangent_precision(secant), "change_norm": float(changes[dtype].norm()),
                     "seconds": time.perf_counter() - t0}
    print(dtype, record[dtype], flush=True)
a, b = changes["float32"], changes["float64"]
record["pearson_float32_vs_float64"] = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
record["relative_difference"] = float((a - b).norm() / b.norm())
print(record, flush=True)
out.write_text(json.dumps(record, indent=2) + "\n")
