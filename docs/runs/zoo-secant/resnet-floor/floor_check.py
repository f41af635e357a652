# run from the repository root: PYTHONPATH=src python docs/runs/zoo-secant/resnet-floor/floor_check.py
"""ResNet-56 seeds 0 and 2: the range's noise floor under the rule in force (measured at the largest step the
second-order ratio lets inside) and what the 0.03 % step's change is over it (the stored rows were graded against
the floor at 0.03 %/300)."""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
from zoo_tangent import load
from setsens.analysis import predicted_change, secant_floor
from setsens.finetune import Training, resolve_lr
from setsens.perturb import gradient_perturbation
from setsens.tangent import training_tangent
from setsens.verdict import VALIDITY_THRESHOLD

problem, test = load("resnet", Path("docs/runs/zoo-tangent"))
training = resolve_lr(problem, Training(steps=100))
out = []
for seed in (0, 2):
    row = json.loads(Path(f"docs/runs/zoo-secant/resnet-s{seed}/tangent.json").read_text())[0]
    idx = torch.randperm(problem.n, generator=torch.Generator().manual_seed(seed))[:3]
    unit = gradient_perturbation(problem, idx, 0.01)
    top = VALIDITY_THRESHOLD * row["step_percent"] / row["ratio"]
    t0 = time.perf_counter()
    at_top = secant_floor(problem, unit.scaled(top), training, test[0])
    change = float(predicted_change(training_tangent(problem, unit.scaled(row["step_percent"]), training, secant=True,
                                                     probes=0), test[0]).norm())
    r = {"seed": seed, "step_percent": row["step_percent"], "floor_step_percent": top, "change": change,
         "floor_at_top": at_top, "above_floor_stored": row["above_floor"],
         "range_above_floor": change / at_top,
         "seconds": time.perf_counter() - t0}
    print(r, flush=True)
    out.append(r)
    Path("docs/runs/zoo-secant/resnet-floor/floor.json").write_text(json.dumps(out, indent=2) + "\n")
