"""Weight-perturbation certificates side by side: the paper's bound, setsens's interval and linear-relaxation
bounds, and auto_LiRPA's IBP and CROWN, on the bias-free MLPs of the paper's experiment, in one run.

    python benchmarks/weights_peers.py --dataset digits --seeds 0,1,2 --json docs/runs/weights-peers/digits-128.json
    python benchmarks/weights_peers.py --hidden 256,256 --points 100 --lirpa-batch 4 --rhos 0.001,0.002,0.005,0.01 \
        --json docs/runs/weights-peers/digits-256-256.json

For every seed the experiment's models are trained as ``setsens weights`` trains them (``ExperimentConfig``:
bias-free ReLU MLP, hidden 128, Adam, 60 epochs; standard training, λ = 0, and the robust loss, λ = 0.1) and
every certificate is measured on the whole test split at relative budgets ε_l = ρ ‖Wˡ‖_∞ on a grid of ρ:
the certified fraction (certified *and* correct) and the wall time.

Two perturbation sets, each certificate only on a set it bounds:

* **operator** — the paper's set, ‖ΔWˡ‖_∞ ≤ ε_l (every row's ℓ1 norm): the paper's bound (Theorems 2–3),
  its ``clean`` form, setsens's interval bound and linear relaxation.  auto_LiRPA cannot express it.
* **entrywise** — |ΔWˡ_jk| ≤ ε_l / n_l (n_l the layer's input width: the largest entrywise box inside the
  operator ball, so a certificate on the operator set also certifies it): setsens's linear relaxation with
  ``budget="entrywise"`` against auto_LiRPA's IBP and CROWN (``PerturbationLpNorm(norm=∞)`` on each weight,
  the margins as its specification matrix C), the identical set for both.

auto_LiRPA is an optional peer, installed without its dependencies beside the pinned torch (its PyPI release
0.3 does not import with numpy 2):
``pip install --no-deps appdirs graphviz "auto_LiRPA @ git+https://github.com/Verified-Intelligence/auto_LiRPA@$C"``
with ``C=a050a3d61f4cb68b108fa7f07dcb3e4d7ef304df`` (its May 2026 release, 0.7.1).
A missing peer is reported, not fatal.  Its bounded layers carry zero, unperturbed biases (its CROWN fails
on a bias-free ``nn.Linear`` under torch 2.13: a transposed weight meets a sparse matrix); the networks
are the same functions.  auto_LiRPA computes in float32, so every certificate here runs in float32.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from setsens.report import write_text

RHOS = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2)


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _fraction(lower: torch.Tensor, y: torch.Tensor) -> float:
    """Certified fraction from (N, K) lower bounds of the margins m̂_{y i} (column y ignored)."""
    lower = lower.clone()
    lower[torch.arange(len(y)), y] = float("inf")
    return float((lower.amin(dim=1) > 0).double().mean())


def setsens_certificates(W, x, y, eps, eps_entry) -> dict:
    from setsens.weights import (certified_margin, interval_margin_bound, linear_relaxation_margin_bound)

    out = {}
    for name in ("paper", "clean"):
        cm, t = _timed(lambda: certified_margin(W, x, y, eps, hidden=name))
        out[f"operator/{name}"] = {"fraction": float((cm > 0).double().mean()), "seconds": t}
    for name, fn in (("interval", interval_margin_bound), ("linear", linear_relaxation_margin_bound)):
        low, t = _timed(lambda: fn(W, x, y, eps))
        out[f"operator/{name}"] = {"fraction": _fraction(low, y), "seconds": t}
    low, t = _timed(lambda: linear_relaxation_margin_bound(W, x, y, eps_entry, budget="entrywise"))
    out["entrywise/linear"] = {"fraction": _fraction(low, y), "seconds": t}
    return out


def lirpa_certificates(W, x, y, eps_entry, batch: int = 40) -> dict:
    """auto_LiRPA's IBP and CROWN on the entrywise box; ``{}`` if it is not installed."""
    try:
        from auto_LiRPA import BoundedModule, BoundedParameter
        from auto_LiRPA.perturbations import PerturbationLpNorm
    except ImportError:
        return {}

    class Bounded(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.ModuleList()
            for w, e in zip(W, eps_entry.tolist()):
                layer = nn.Linear(w.shape[1], w.shape[0])
                nn.init.zeros_(layer.bias)
                layer.weight = BoundedParameter(w.detach().clone(), PerturbationLpNorm(norm=float("inf"), eps=e))
                self.fc.append(layer)

        def forward(self, h):
            for layer in self.fc[:-1]:
                h = torch.relu(layer(h))
            return self.fc[-1](h)

    K = W[-1].shape[0]
    eye = torch.eye(K, dtype=x.dtype)
    C = eye[y].unsqueeze(1) - eye.unsqueeze(0)  # C[j, i] · f = f_y − f_i
    opts = {"sparse_intermediate_bounds": False, "sparse_conv_intermediate_bounds": False,
            "sparse_intermediate_bounds_with_ibp": False, "verbosity": 0}
    out = {}
    for method in ("IBP", "CROWN"):
        bounded = BoundedModule(Bounded(), (x[:batch],), device="cpu", bound_opts=copy.deepcopy(opts))
        # in batches: its CROWN holds (points, specs, width, width) matrices per weight (22 GB at once for 360
        # points of a 256-256 MLP)
        low, t = _timed(lambda: torch.cat([
            bounded.compute_bounds(x=(x[s:s + batch],), C=C[s:s + batch], method=method, bound_upper=False)[0]
            .detach() for s in range(0, len(x), batch)]))
        out[f"entrywise/auto_LiRPA {method}"] = {"fraction": _fraction(low, y), "seconds": t}
    return out


def models(dataset: str, seed: int, hidden: tuple):
    """The experiment's standard and robust models (trained once per seed) and its test split."""
    from setsens.experiments.weights import ExperimentConfig, load_split
    from setsens.weights import model_weights, train_mlp

    cfg = ExperimentConfig(dataset=dataset, seed=seed, hidden=hidden)
    (x, y, xt, yt), classes = load_split(cfg)
    trained = {}
    for name, lam in (("standard", 0.0), ("robust", cfg.lam)):
        model, _ = train_mlp(x, y, len(classes), cfg.train_config(lam, 0.0), seed=seed)
        trained[name] = [w.detach() for w in model_weights(model)]
    return trained, xt, yt


def run(dataset: str, seeds, rhos, hidden: tuple = (128,), points: int | None = None, lirpa_batch: int = 40) -> dict:
    from setsens.weights import forward, relative_budget

    rows = []
    for seed in seeds:
        trained, x, y = models(dataset, seed, hidden)
        x, y = x[:points], y[:points]
        for name, W in trained.items():
            with torch.no_grad():
                clean = float((forward(W, x).argmax(1) == y).double().mean())
            for rho in rhos:
                eps = relative_budget(W, rho)
                eps_entry = eps / torch.tensor([w.shape[1] for w in W], dtype=eps.dtype)
                with torch.no_grad():
                    cert = setsens_certificates(W, x, y, eps, eps_entry)
                cert.update(lirpa_certificates(W, x, y, eps_entry, lirpa_batch))
                rows.append({"seed": seed, "model": name, "rho": rho, "clean_accuracy": clean, **cert})
                print(f"seed {seed} {name} ρ = {rho:g}: " + ", ".join(
                    f"{k} {100 * v['fraction']:.1f} %" for k, v in cert.items()), flush=True)
    return {"dataset": dataset, "hidden": list(hidden), "seeds": list(seeds), "rhos": list(rhos), "points": len(y),
            "rows": rows, "headline": headline(rows)}


def headline(rows) -> list[dict]:
    """Per seed and model, at each ρ where the paper's bound certifies 10–50 %: linear ÷ paper, and
    setsens's linear against auto_LiRPA's CROWN on the entrywise set."""
    out = []
    for r in rows:
        paper = r["operator/paper"]["fraction"]
        if 0.10 <= paper <= 0.50:
            crown = r.get("entrywise/auto_LiRPA CROWN", {}).get("fraction")
            out.append({"seed": r["seed"], "model": r["model"], "rho": r["rho"], "paper": paper,
                        "linear": r["operator/linear"]["fraction"],
                        "linear_over_paper": r["operator/linear"]["fraction"] / paper,
                        "entrywise_linear": r["entrywise/linear"]["fraction"], "entrywise_auto_LiRPA_CROWN": crown})
    return out


COLUMNS = ("operator/paper", "operator/clean", "operator/interval", "operator/linear", "entrywise/linear",
           "entrywise/auto_LiRPA IBP", "entrywise/auto_LiRPA CROWN")


def markdown(result: dict) -> str:
    """Certified fraction (%) per model and ρ, median [min, max] over the seeds, and the median seconds."""
    rows = result["rows"]
    cols = [c for c in COLUMNS if c in rows[0]]
    L = [f"Bias-free MLPs of `setsens weights` ({result['dataset']}, hidden {result['hidden']}), seeds "
         f"{result['seeds']}, {result['points']} test points; certified fraction %, median [min, max] over the "
         "seeds.", "", "| model | ρ | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]

    def cell(values):
        v = [100 * x for x in values]
        return f"{statistics.median(v):.1f} [{min(v):.1f}, {max(v):.1f}]"

    for model in dict.fromkeys(r["model"] for r in rows):
        for rho in result["rhos"]:
            group = [r for r in rows if r["model"] == model and r["rho"] == rho]
            L.append(f"| {model} | {rho:g} | " + " | ".join(cell([r[c]["fraction"] for r in group]) for c in cols)
                     + " |")
    L += ["", "Median seconds for the whole test set: " + ", ".join(
        f"{c} {statistics.median(r[c]['seconds'] for r in rows):.3g}" for c in cols) + "."]
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits", choices=("digits", "cifar10"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rhos", default=",".join(f"{r:g}" for r in RHOS))
    ap.add_argument("--hidden", default="128", help="hidden widths of the MLPs (the experiment's: 128)")
    ap.add_argument("--points", type=int, default=None, help="the first POINTS test points (default all)")
    ap.add_argument("--lirpa-batch", type=int, default=40,
                    help="points per auto_LiRPA call (its CROWN memory grows with points × width²: 4 for 256-wide)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    a = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    result = run(a.dataset, [int(s) for s in a.seeds.split(",")], [float(r) for r in a.rhos.split(",")],
                 tuple(int(h) for h in a.hidden.split(",")), a.points, a.lirpa_batch)
    h = result["headline"]
    if h:
        ratios = [r["linear_over_paper"] for r in h]
        print(f"where the paper's bound certifies 10–50 % ({len(h)} rows): linear ÷ paper median "
              f"{statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        write_text(a.json, json.dumps(result, indent=1))
        write_text(a.json.with_suffix(".md"), markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
